// Driving one sequence through a model spread over ranks, with the leader (rank 0) sending each
// step's plan over the control group and the other ranks following it. On one rank it is the
// plain single-sequence driver of worker/engine/generate.h.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/cli/parallel_ranks.h"
#include "worker/engine/generate.h"

namespace gemma::cli {

// Logits [prompt.size(), vocab] of every prompt position; followers take the prompt from the
// leader's plan (their own `prompt` is ignored).
absl::StatusOr<std::vector<float>> RankPromptLogits(RankEnv& env, gemma4::Model& model,
                                                    KvCache& cache, std::span<const int32_t> prompt,
                                                    int64_t prefill_chunk);

// Generated ids (identical on every rank).
absl::StatusOr<std::vector<int32_t>> RankGenerate(RankEnv& env, gemma4::Model& model,
                                                  KvCache& cache, std::span<const int32_t> prompt,
                                                  const GenerateOptions& options);

}  // namespace gemma::cli
