#include "worker/cli/rank_driver.h"

#include <functional>

#include "common/status_macros.h"
#include "worker/replica/executor.h"

namespace gemma::cli {
namespace {

// Rank 0 runs `lead` through a LeaderExecutor and then releases the followers, also after an
// error (a broken control group fails the stop plan within its timeout); the other ranks
// follow until that stop plan and return `T{}`.
template <typename T>
absl::StatusOr<T> LeadOrFollow(RankEnv& env, gemma4::Model& model, KvCache& cache,
                               const std::function<absl::StatusOr<T>(engine::StepExecutor&)>& lead) {
  if (env.world.rank() != 0) {
    RETURN_IF_ERROR(replica::FollowPlans(model, cache, env.control));
    return T{};
  }
  replica::LeaderExecutor executor(&model, env.control);
  absl::StatusOr<T> result = lead(executor);
  absl::Status stopped = executor.Stop();
  if (!result.ok()) return result.status();
  RETURN_IF_ERROR(stopped);
  return result;
}

}  // namespace

absl::StatusOr<std::vector<float>> RankPromptLogits(RankEnv& env, gemma4::Model& model,
                                                    KvCache& cache, std::span<const int32_t> prompt,
                                                    int64_t prefill_chunk) {
  if (env.world.world_size() == 1) return PromptLogits(model, cache, prompt, prefill_chunk);
  return LeadOrFollow<std::vector<float>>(
      env, model, cache, [&](engine::StepExecutor& executor) {
        return PromptLogits(executor, model, cache, prompt, prefill_chunk);
      });
}

absl::StatusOr<std::vector<int32_t>> RankGenerate(RankEnv& env, gemma4::Model& model,
                                                  KvCache& cache, std::span<const int32_t> prompt,
                                                  const GenerateOptions& options) {
  if (env.world.world_size() == 1) return Generate(model, cache, prompt, options);
  return LeadOrFollow<std::vector<int32_t>>(
      env, model, cache, [&](engine::StepExecutor& executor) {
        return Generate(executor, cache, prompt, options);
      });
}

}  // namespace gemma::cli
