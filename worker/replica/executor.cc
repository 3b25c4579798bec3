#include "worker/replica/executor.h"

#include <algorithm>
#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "glog/logging.h"

namespace gemma::replica {
namespace {

// Forward over `steps`, then sampling of the rows in `params` (if any).
absl::StatusOr<std::vector<int32_t>> RunStep(gemma4::Model& model, KvCache& cache,
                                             const std::vector<gemma4::SequenceStep>& steps,
                                             const std::vector<SamplingParams>& params) {
  RETURN_IF_ERROR(model.Forward(steps, cache).status());
  for (const gemma4::SequenceStep& step : steps) cache.TrimSliding(*step.kv);
  if (params.empty()) return std::vector<int32_t>();
  return model.Sample(params);
}

}  // namespace

LeaderExecutor::LeaderExecutor(gemma4::Model* model, parallel::Communicator* group_control)
    : model_(model) {
  if (group_control != nullptr && group_control->world_size() > 1) {
    channel_ = std::make_unique<parallel::StepPlanChannel>(group_control);
  }
}

absl::Status LeaderExecutor::Send(parallel::StepPlan plan) {
  if (channel_ == nullptr) return absl::OkStatus();
  plan.sequence_number = channel_->last_sequence_number() + 1;
  return channel_->Send(plan);
}

absl::StatusOr<std::vector<int32_t>> LeaderExecutor::Execute(const StepBatch& batch,
                                                             KvCache& cache) {
  parallel::StepPlan plan;
  plan.finished = batch.released;
  std::vector<gemma4::SequenceStep> steps;
  std::vector<SamplingParams> params;
  for (const StepEntry& entry : batch.entries) {
    parallel::StepEntry e;
    e.sequence_id = entry.sequence_id;
    e.num_new_tokens = static_cast<int32_t>(entry.tokens.size());
    e.start_position = static_cast<int32_t>(entry.kv->length);
    e.token_ids.assign(entry.tokens.begin(), entry.tokens.end());
    e.sample = entry.sample;
    e.all_logits = entry.all_logits;
    e.sampling = entry.sampling;
    plan.entries.push_back(std::move(e));
    steps.push_back({entry.tokens, entry.kv, entry.logits_mode()});
    if (entry.sample) params.push_back(entry.sampling);
  }
  RETURN_IF_ERROR(Send(std::move(plan)));
  ++steps_executed_;
  return RunStep(*model_, cache, steps, params);
}

absl::Status LeaderExecutor::ExecuteEmpty(KvCache& cache) {
  RETURN_IF_ERROR(Send(parallel::StepPlan{}));
  ++steps_executed_;
  return RunStep(*model_, cache, {}, {}).status();
}

absl::Status LeaderExecutor::Stop() {
  parallel::StepPlan plan;
  plan.stop = true;
  return Send(std::move(plan));
}

absl::Status FollowPlans(gemma4::Model& model, KvCache& cache,
                         parallel::Communicator* group_control) {
  parallel::StepPlanChannel channel(group_control);
  std::map<uint64_t, SequenceKv> sequences;
  auto release_all = [&] {
    for (auto& [id, kv] : sequences) cache.Release(kv);
    sequences.clear();
  };
  while (true) {
    absl::StatusOr<parallel::StepPlan> plan = channel.Receive();
    if (!plan.ok()) {
      release_all();
      return plan.status();
    }
    if (plan->stop) break;
    for (uint64_t id : plan->finished) {
      auto it = sequences.find(id);
      if (it == sequences.end()) continue;
      cache.Release(it->second);
      sequences.erase(it);
    }
    std::vector<gemma4::SequenceStep> steps;
    std::vector<SamplingParams> params;
    for (const parallel::StepEntry& e : plan->entries) {
      SequenceKv& kv = sequences[e.sequence_id];
      if (kv.length != e.start_position) {
        release_all();
        return absl::FailedPreconditionError(absl::StrCat(
            "step plan ", plan->sequence_number, ": sequence ", e.sequence_id, " starts at ",
            e.start_position, " but this rank holds ", kv.length, " positions"));
      }
      absl::Status grown = cache.Grow(kv, kv.length + e.num_new_tokens);
      if (!grown.ok()) {
        release_all();
        return absl::Status(grown.code(), absl::StrCat("step plan ", plan->sequence_number,
                                                       ": ", grown.message()));
      }
      steps.push_back({e.token_ids, &kv, gemma4::LogitsModeOf(e.sample, e.all_logits)});
      if (e.sample) params.push_back(e.sampling);
    }
    absl::StatusOr<std::vector<int32_t>> sampled = RunStep(model, cache, steps, params);
    // A step that keeps every position's logits is read by the leader with LogitsToHost, which
    // gathers the vocabulary shards from every rank of the group: take part.
    const bool gathers = std::any_of(plan->entries.begin(), plan->entries.end(),
                                     [](const parallel::StepEntry& e) { return e.all_logits; });
    absl::Status status = sampled.status();
    if (status.ok() && gathers) status = model.LogitsToHost().status();
    if (!status.ok()) {
      release_all();
      return status;
    }
  }
  release_all();
  return absl::OkStatus();
}

absl::StatusOr<bool> LockstepStep(Engine& engine, LeaderExecutor& executor, KvCache& cache,
                                  parallel::Communicator* leaders) {
  int64_t busy = engine.HasWork() ? 1 : 0;
  if (leaders != nullptr) RETURN_IF_ERROR(leaders->AllReduce(&busy, 1, DType::kI64));
  if (busy == 0) return false;
  const uint64_t before = executor.steps_executed();
  if (engine.HasWork()) RETURN_IF_ERROR(engine.Step().status());
  // The engine may have had nothing to schedule this time (or no work at all): the group still
  // takes part in the step's collectives.
  if (executor.steps_executed() == before) RETURN_IF_ERROR(executor.ExecuteEmpty(cache));
  return true;
}

absl::Status RunLeaderLoop(Engine& engine, LeaderExecutor& executor, KvCache& cache,
                           parallel::Communicator* leaders, const std::atomic<bool>* stop) {
  if (leaders == nullptr) return engine.Run(stop);
  // Every expert all-to-all needs every rank: the groups step together, an idle group with an
  // empty step.
  std::chrono::milliseconds idle_wait{1};
  while (!stop->load()) {
    ASSIGN_OR_RETURN(const bool ran, LockstepStep(engine, executor, cache, leaders));
    if (ran) {
      idle_wait = std::chrono::milliseconds(1);
    } else {
      std::this_thread::sleep_for(idle_wait);
      idle_wait = std::min(idle_wait * 2, std::chrono::milliseconds(16));
    }
  }
  return absl::OkStatus();
}

}  // namespace gemma::replica
