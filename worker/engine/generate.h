// Single-sequence driving: prefill a prompt (whole or in chunks), read logits, and decode token
// by token through the paged cache. Each step goes through a StepExecutor, so the same driver
// runs on one rank (SingleRankExecutor) and as the leader of several ranks (the replica's
// LeaderExecutor, whose followers apply the same step plans). Used by gemma-forward,
// gemma-generate and the tests; the batching engine loop is built on the same executors.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "common/request_defaults.h"
#include "worker/backend/backend.h"
#include "worker/engine/step_executor.h"
#include "worker/model/gemma4/kv_cache.h"
#include "worker/model/gemma4/model.h"

namespace gemma {

struct GenerateOptions {
  int64_t max_new_tokens = kDefaultMaxTokens;
  SamplingParams sampling;       // temperature 0: greedy; the position is set per token
  int64_t prefill_chunk = 0;     // tokens per prefill step; 0 = the whole prompt in one step
  std::vector<int32_t> stop_ids; // generation ends after emitting one of these
};

// Logits [prompt.size(), vocab] of every prompt position (row-major), computed in prefill
// steps of `prefill_chunk` tokens (0 = one step) run by `executor` over `model` (whose logits
// are read after each step). The sequence's pages are released afterwards.
absl::StatusOr<std::vector<float>> PromptLogits(engine::StepExecutor& executor,
                                                gemma4::Model& model, KvCache& cache,
                                                std::span<const int32_t> prompt,
                                                int64_t prefill_chunk = 0);
absl::StatusOr<std::vector<float>> PromptLogits(gemma4::Model& model, KvCache& cache,
                                                std::span<const int32_t> prompt,
                                                int64_t prefill_chunk = 0);

// Generates up to max_new_tokens tokens after `prompt`. Pages are released afterwards.
absl::StatusOr<std::vector<int32_t>> Generate(engine::StepExecutor& executor, KvCache& cache,
                                              std::span<const int32_t> prompt,
                                              const GenerateOptions& options);
absl::StatusOr<std::vector<int32_t>> Generate(gemma4::Model& model, KvCache& cache,
                                              std::span<const int32_t> prompt,
                                              const GenerateOptions& options);

// Reads `rows` x vocab logits from a device buffer.
absl::StatusOr<std::vector<float>> ReadLogits(Backend& backend, const Buffer& logits,
                                              int64_t rows, int64_t vocab);

}  // namespace gemma
