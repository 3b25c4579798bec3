// Driving one sequence through a model spread over ranks: rank 0 runs the single-sequence
// driver of worker/engine/generate.h through the replica's LeaderExecutor, which sends each
// step's plan over the control group; every other rank follows those plans
// (replica::FollowPlans) on its own shard and cache. On one rank it is the plain driver.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/cli/parallel_ranks.h"
#include "worker/engine/generate.h"

namespace gemma::cli {

// Logits [prompt.size(), vocab] of every prompt position, on rank 0; the other ranks follow
// the leader's plans (their own `prompt` is ignored) and return an empty vector.
absl::StatusOr<std::vector<float>> RankPromptLogits(RankEnv& env, gemma4::Model& model,
                                                    KvCache& cache, std::span<const int32_t> prompt,
                                                    int64_t prefill_chunk);

// Generated ids on rank 0; the other ranks follow and return an empty vector.
absl::StatusOr<std::vector<int32_t>> RankGenerate(RankEnv& env, gemma4::Model& model,
                                                  KvCache& cache, std::span<const int32_t> prompt,
                                                  const GenerateOptions& options);

}  // namespace gemma::cli
