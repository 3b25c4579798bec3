// Single-sequence driving of the model: prefill a prompt (whole or in chunks), read logits, and
// decode token by token through the paged cache. Used by gemma-forward, gemma-generate and the
// tests; the batching engine loop is built on the same Model::Forward.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/backend/backend.h"
#include "worker/model/gemma4/kv_cache.h"
#include "worker/model/gemma4/model.h"

namespace gemma {

struct GenerateOptions {
  int64_t max_new_tokens = 16;
  SamplingParams sampling;       // temperature 0: greedy
  int64_t prefill_chunk = 0;     // tokens per prefill step; 0 = the whole prompt in one step
  std::vector<int32_t> stop_ids; // generation ends after emitting one of these
};

// Logits [prompt.size(), vocab] of every prompt position (row-major), computed in prefill
// steps of `prefill_chunk` tokens (0 = one step). The sequence's pages are released afterwards.
absl::StatusOr<std::vector<float>> PromptLogits(gemma4::Model& model, KvCache& cache,
                                                std::span<const int32_t> prompt,
                                                int64_t prefill_chunk = 0);

// Generates up to max_new_tokens tokens after `prompt`. Pages are released afterwards.
absl::StatusOr<std::vector<int32_t>> Generate(gemma4::Model& model, KvCache& cache,
                                              std::span<const int32_t> prompt,
                                              const GenerateOptions& options);

// Reads `rows` x vocab logits from a device buffer.
absl::StatusOr<std::vector<float>> ReadLogits(Backend& backend, const Buffer& logits,
                                              int64_t rows, int64_t vocab);

}  // namespace gemma
