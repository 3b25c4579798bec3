#include "worker/cli/rank_driver.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/parallel/step_plan.h"
#include "worker/replica/executor.h"

namespace gemma::cli {
namespace {

using gemma4::LogitsMode;
using gemma4::SequenceStep;
using parallel::StepPlan;

constexpr uint64_t kSequenceId = 1;

// Leader: sends `plan` (numbered); followers: receive the leader's.
absl::StatusOr<StepPlan> Exchange(parallel::StepPlanChannel& channel, const RankEnv& env,
                                  StepPlan plan) {
  if (env.world.rank() == 0) {
    plan.sequence_number = channel.last_sequence_number() + 1;
    RETURN_IF_ERROR(channel.Send(plan));
    return plan;
  }
  return channel.Receive();
}

StepPlan JoinPlan(std::span<const int32_t> prompt, const SamplingParams& sampling) {
  StepPlan plan;
  parallel::JoinedSequence joined;
  joined.sequence_id = kSequenceId;
  joined.token_ids.assign(prompt.begin(), prompt.end());
  for (size_t i = 0; i < prompt.size(); ++i) joined.positions.push_back(static_cast<int32_t>(i));
  joined.sampling = replica::ToPlanSampling(sampling);
  plan.joined.push_back(joined);
  return plan;
}

absl::Status CheckJoin(const StepPlan& plan) {
  if (plan.joined.size() != 1 || plan.joined[0].token_ids.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("step plan ", plan.sequence_number,
                                                      " should add one sequence, it adds ",
                                                      plan.joined.size()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<float>> RankPromptLogits(RankEnv& env, gemma4::Model& model,
                                                    KvCache& cache, std::span<const int32_t> prompt,
                                                    int64_t prefill_chunk) {
  if (env.world.world_size() == 1) return PromptLogits(model, cache, prompt, prefill_chunk);
  parallel::StepPlanChannel channel(env.control);
  ASSIGN_OR_RETURN(StepPlan plan, Exchange(channel, env, JoinPlan(prompt, SamplingParams{})));
  RETURN_IF_ERROR(CheckJoin(plan));
  return PromptLogits(model, cache, plan.joined[0].token_ids, prefill_chunk);
}

absl::StatusOr<std::vector<int32_t>> RankGenerate(RankEnv& env, gemma4::Model& model,
                                                  KvCache& cache, std::span<const int32_t> prompt,
                                                  const GenerateOptions& options) {
  if (env.world.world_size() == 1) return Generate(model, cache, prompt, options);
  parallel::StepPlanChannel channel(env.control);
  const bool leader = env.world.rank() == 0;
  SequenceKv kv;
  std::vector<int32_t> output;
  auto run = [&]() -> absl::Status {
    ASSIGN_OR_RETURN(StepPlan plan, Exchange(channel, env, JoinPlan(prompt, options.sampling)));
    RETURN_IF_ERROR(CheckJoin(plan));
    const parallel::JoinedSequence joined = plan.joined[0];
    // The leader's parameters, every field (the request key included).
    SamplingParams sampling = replica::FromPlanSampling(joined.sampling, 0);
    std::vector<int32_t> pending = joined.token_ids;
    int64_t max_new = options.max_new_tokens;
    // The first plan carries the join; each later plan one decode entry, or the finish.
    bool first = true;
    while (true) {
      if (!first) {
        StepPlan next;
        const bool stop =
            leader &&
            (static_cast<int64_t>(output.size()) >= max_new ||
             (!output.empty() && std::find(options.stop_ids.begin(), options.stop_ids.end(),
                                           output.back()) != options.stop_ids.end()));
        if (stop) {
          next.finished.push_back(kSequenceId);
        } else {
          parallel::StepEntry entry;
          entry.sequence_id = kSequenceId;
          entry.num_new_tokens = 1;
          entry.start_position = static_cast<int32_t>(kv.length);
          entry.token_ids = pending;
          next.entries.push_back(entry);
        }
        ASSIGN_OR_RETURN(plan, Exchange(channel, env, next));
        if (!plan.finished.empty()) break;
        if (plan.entries.size() != 1 || plan.entries[0].start_position != kv.length) {
          return absl::FailedPreconditionError(
              absl::StrCat("step plan ", plan.sequence_number,
                           " disagrees with this rank's state at position ", kv.length));
        }
      } else if (max_new == 0) {
        first = false;
        continue;
      }
      first = false;
      RETURN_IF_ERROR(cache.Grow(kv, kv.length + static_cast<int64_t>(pending.size())));
      SequenceStep step{pending, &kv, LogitsMode::kLast};
      RETURN_IF_ERROR(model.Forward({&step, 1}, cache).status());
      cache.TrimSliding(kv);
      SamplingParams params = sampling;
      params.position = kv.length;
      ASSIGN_OR_RETURN(std::vector<int32_t> next, model.Sample({params}));
      output.push_back(next[0]);
      pending = {next[0]};
    }
    return absl::OkStatus();
  };
  absl::Status status = run();
  cache.Release(kv);
  RETURN_IF_ERROR(status);
  return output;
}

}  // namespace gemma::cli
