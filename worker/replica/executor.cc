#include "worker/replica/executor.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <optional>
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

// After a step whose plan asked for a vote, every rank of the group sums its PlacementLoader
// vote over the control group. Returns the sum (0: all ready).
absl::StatusOr<int64_t> GroupVote(PlacementLoader& loader, parallel::Communicator* control) {
  int64_t vote = loader.Vote();
  if (control != nullptr && control->world_size() > 1) {
    RETURN_IF_ERROR(control->AllReduce(&vote, 1, DType::kI64));
  }
  return vote;
}

}  // namespace

LeaderExecutor::LeaderExecutor(gemma4::Model* model, parallel::Communicator* group_control,
                               std::chrono::milliseconds load_delay)
    : model_(model), group_control_(group_control), loader_(model, load_delay) {
  if (group_control != nullptr && group_control->world_size() > 1) {
    channel_ = std::make_unique<parallel::StepPlanChannel>(group_control);
  }
  absl::MutexLock lock(&mutex_);
  active_ = model->placement();
}

void LeaderExecutor::OfferPlacement(eplb::Placement placement) {
  absl::MutexLock lock(&mutex_);
  // An epoch seen before (switched to, or abandoned after a failed load) is not tried again.
  if (placement.epoch <= std::max(active_.epoch, highest_seen_)) return;
  if (incoming_.has_value() && placement.epoch <= incoming_->epoch) return;
  incoming_ = std::move(placement);
}

eplb::Placement LeaderExecutor::ActivePlacement() const {
  absl::MutexLock lock(&mutex_);
  return active_;
}

bool LeaderExecutor::placement_pending() const {
  absl::MutexLock lock(&mutex_);
  return incoming_.has_value() || candidate_.has_value() || offered_.has_value();
}

void LeaderExecutor::PlacementState(int64_t mine[4]) {
  const uint64_t known = std::max(ActivePlacement().epoch, offered_ ? offered_->epoch : 0);
  {
    absl::MutexLock lock(&mutex_);
    if (incoming_.has_value() && (!candidate_ || incoming_->epoch > candidate_->epoch)) {
      candidate_ = std::move(incoming_);
    }
    incoming_.reset();
  }
  if (candidate_ && candidate_->epoch <= known) candidate_.reset();
  mine[0] = 0;
  mine[1] = candidate_ ? static_cast<int64_t>(candidate_->epoch) : 0;
  mine[2] = offered_ && group_ready_ ? static_cast<int64_t>(offered_->epoch) : 0;
  mine[3] = offered_ ? static_cast<int64_t>(offered_->epoch) : 0;
}

absl::Status LeaderExecutor::AgreeOnPlacement(const std::vector<int64_t>& all,
                                              parallel::Communicator* leaders) {
  const size_t n = all.size() / 4;
  int64_t newest = 0;
  size_t root = 0;
  for (size_t i = 0; i < n; ++i) {
    if (all[4 * i + 1] > newest) {
      newest = all[4 * i + 1];
      root = i;
    }
  }
  if (newest > 0) {
    // A newer offer: the first leader holding it hands it to the others.
    std::string bytes;
    const bool mine = leaders == nullptr || static_cast<int>(root) == leaders->rank();
    if (mine) {
      if (!candidate_ || static_cast<int64_t>(candidate_->epoch) != newest) {
        return absl::InternalError("expert placement agreement: this leader lost its offer");
      }
      bytes = eplb::SerializePlacement(*candidate_);
    }
    if (leaders != nullptr && leaders->world_size() > 1) {
      int64_t size = static_cast<int64_t>(bytes.size());
      RETURN_IF_ERROR(leaders->Broadcast(&size, 1, DType::kI64, static_cast<int>(root)));
      std::vector<int64_t> words((size + 7) / 8, 0);
      if (mine) std::memcpy(words.data(), bytes.data(), bytes.size());
      RETURN_IF_ERROR(
          leaders->Broadcast(words.data(), words.size(), DType::kI64, static_cast<int>(root)));
      bytes.assign(reinterpret_cast<const char*>(words.data()), static_cast<size_t>(size));
    }
    absl::StatusOr<eplb::Placement> parsed = eplb::ParsePlacement(bytes);
    if (!parsed.ok()) return parsed.status();
    if (candidate_ && candidate_->epoch <= parsed->epoch) candidate_.reset();
    LOG(INFO) << "expert placement epoch " << parsed->epoch << " offered; loading it";
    {
      absl::MutexLock lock(&mutex_);
      highest_seen_ = std::max(highest_seen_, parsed->epoch);
    }
    offered_ = *std::move(parsed);
    forward_ = true;
    group_ready_ = false;
    switch_now_ = false;
    return absl::OkStatus();
  }
  // Every leader's group has loaded the same offer: the coming step switches.
  if (offered_ && !forward_) {
    bool all_ready = true;
    for (size_t i = 0; i < n; ++i) {
      all_ready = all_ready && all[4 * i + 2] == static_cast<int64_t>(offered_->epoch);
    }
    switch_now_ = all_ready;
  }
  return absl::OkStatus();
}

absl::Status LeaderExecutor::PreparePlacement(parallel::StepPlan& plan) {
  if (switch_now_) {
    RETURN_IF_ERROR(loader_.Install(offered_->epoch));
    LOG(INFO) << "expert placement epoch " << offered_->epoch << " in use from step "
              << steps_executed_ + 1;
    {
      absl::MutexLock lock(&mutex_);
      active_ = *std::move(offered_);
    }
    offered_.reset();
    switch_now_ = false;
    group_ready_ = false;
  }
  {
    absl::MutexLock lock(&mutex_);
    plan.placement_epoch = active_.epoch;
  }
  if (forward_) {
    plan.offered_placement = eplb::SerializePlacement(*offered_);
    forward_ = false;
    loader_.Start(*offered_);
  }
  plan.vote_placement = offered_.has_value() && !group_ready_;
  return absl::OkStatus();
}

absl::Status LeaderExecutor::VoteOnPlacement(const parallel::StepPlan& plan) {
  if (!plan.vote_placement) return absl::OkStatus();
  ASSIGN_OR_RETURN(const int64_t vote, GroupVote(loader_, group_control_));
  if (vote >= PlacementLoader::kFailed) {
    LOG(ERROR) << "expert placement epoch " << offered_->epoch
               << " abandoned: a rank of this group could not load it"
               << (loader_.Vote() >= PlacementLoader::kFailed
                       ? absl::StrCat(" (this rank: ", loader_.error().ToString(), ")")
                       : std::string());
    loader_.Drop();
    offered_.reset();
    group_ready_ = false;
  } else {
    group_ready_ = vote == 0;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> LeaderExecutor::RunPlan(
    parallel::StepPlan plan, const std::vector<gemma4::SequenceStep>& steps,
    const std::vector<SamplingParams>& params, KvCache& cache) {
  RETURN_IF_ERROR(PreparePlacement(plan));
  const bool vote = plan.vote_placement;
  RETURN_IF_ERROR(Send(std::move(plan)));
  ++steps_executed_;
  ASSIGN_OR_RETURN(std::vector<int32_t> sampled, RunStep(*model_, cache, steps, params));
  parallel::StepPlan voted;
  voted.vote_placement = vote;
  RETURN_IF_ERROR(VoteOnPlacement(voted));
  return sampled;
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
  return RunPlan(std::move(plan), steps, params, cache);
}

absl::Status LeaderExecutor::ExecuteEmpty(KvCache& cache) {
  return RunPlan(parallel::StepPlan{}, {}, {}, cache).status();
}

absl::Status LeaderExecutor::Stop() {
  parallel::StepPlan plan;
  plan.stop = true;
  return Send(std::move(plan));
}

absl::Status FollowPlans(gemma4::Model& model, KvCache& cache,
                         parallel::Communicator* group_control,
                         std::chrono::milliseconds load_delay) {
  parallel::StepPlanChannel channel(group_control);
  PlacementLoader loader(&model, load_delay);
  uint64_t active_epoch = model.placement().epoch;
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
    if (!plan->offered_placement.empty()) {
      absl::StatusOr<eplb::Placement> offered = eplb::ParsePlacement(plan->offered_placement);
      if (!offered.ok()) {
        release_all();
        return offered.status();
      }
      loader.Start(*std::move(offered));
    }
    if (plan->placement_epoch != active_epoch) {
      if (absl::Status installed = loader.Install(plan->placement_epoch); !installed.ok()) {
        release_all();
        return installed;
      }
      active_epoch = plan->placement_epoch;
    }
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
    if (status.ok() && plan->vote_placement) {
      absl::StatusOr<int64_t> vote = GroupVote(loader, group_control);
      status = vote.status();
      if (vote.ok() && *vote >= PlacementLoader::kFailed) loader.Drop();  // the leader abandons it
    }
    if (!status.ok()) {
      release_all();
      return status;
    }
  }
  release_all();
  return absl::OkStatus();
}

absl::StatusOr<bool> LockstepStep(Engine& engine, LeaderExecutor& executor, KvCache& cache,
                                  parallel::Communicator* leaders, bool stop_wanted,
                                  bool* all_stop) {
  int64_t mine[4];
  executor.PlacementState(mine);
  // Bit 0: this group has work; bit 1: its leader wants to stop.
  mine[0] = (engine.HasWork() ? 1 : 0) | (stop_wanted ? 2 : 0);
  std::vector<int64_t> all(mine, mine + 4);
  if (leaders != nullptr && leaders->world_size() > 1) {
    all.resize(4 * leaders->world_size());
    RETURN_IF_ERROR(leaders->AllGather(mine, all.data(), 4, DType::kI64));
  }
  RETURN_IF_ERROR(executor.AgreeOnPlacement(all, leaders));
  bool any_work = false, every_stop = true;
  for (size_t i = 0; i < all.size(); i += 4) {
    any_work = any_work || (all[i] & 1) != 0;
    every_stop = every_stop && (all[i] & 2) != 0;
  }
  executor.set_replica_idle(!any_work);
  if (all_stop != nullptr) *all_stop = every_stop;
  if (every_stop) return false;
  const bool busy = any_work || executor.placement_pending();
  if (!busy) return false;
  const uint64_t before = executor.steps_executed();
  if (engine.HasWork()) RETURN_IF_ERROR(engine.Step().status());
  // The engine may have had nothing to schedule this time (or no work at all): the group still
  // takes part in the step's collectives.
  if (executor.steps_executed() == before) RETURN_IF_ERROR(executor.ExecuteEmpty(cache));
  return true;
}

absl::Status RunLeaderLoop(Engine& engine, LeaderExecutor& executor, KvCache& cache,
                           parallel::Communicator* leaders, const std::atomic<bool>* stop,
                           std::chrono::milliseconds stop_wait) {
  if (leaders == nullptr) {
    while (!stop->load()) {
      if (executor.placement_pending()) {
        ASSIGN_OR_RETURN(const bool ran, LockstepStep(engine, executor, cache, nullptr));
        // An idle replica steps (empty) only to move the switch on: not flat out.
        if (ran && !engine.HasWork()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
      } else if (engine.WaitForWork(absl::Milliseconds(20))) {
        RETURN_IF_ERROR(engine.Step().status());
      }
    }
    return absl::OkStatus();
  }
  // Every expert all-to-all needs every rank: the groups step together, an idle group with an
  // empty step.
  std::chrono::milliseconds idle_wait{1};
  std::optional<std::chrono::steady_clock::time_point> stop_by;
  while (true) {
    if (stop->load() && !stop_by.has_value()) {
      stop_by = std::chrono::steady_clock::now() + stop_wait;
    }
    if (stop_by.has_value() && std::chrono::steady_clock::now() >= *stop_by) {
      LOG(WARNING) << "leaving without the other groups' leaders after " << stop_wait.count()
                   << " ms: their collectives will fail";
      break;
    }
    bool all_stop = false;
    ASSIGN_OR_RETURN(const bool ran, LockstepStep(engine, executor, cache, leaders,
                                                  stop_by.has_value(), &all_stop));
    if (all_stop) break;
    if (ran && !engine.HasWork() && executor.placement_pending()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    } else if (ran) {
      idle_wait = std::chrono::milliseconds(1);
    } else {
      std::this_thread::sleep_for(idle_wait);
      idle_wait = std::min(idle_wait * 2, std::chrono::milliseconds(16));
    }
  }
  return absl::OkStatus();
}

}  // namespace gemma::replica
