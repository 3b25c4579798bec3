// Running the engine's steps on a replica of several ranks. The group leader (tp rank 0) turns
// each StepBatch into a StepPlan, sends it over the group's CPU control communicator, then runs
// the step itself; the other ranks of the group follow the plans (FollowPlans) on their own
// model shard and KV cache. In dp-ep mode each data-parallel group has its own engine, and the
// groups step in lockstep (LockstepStep): a group with nothing to do runs an empty step, since
// every expert all-to-all needs every rank.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/engine/engine.h"
#include "worker/engine/step_executor.h"
#include "worker/parallel/communicator.h"
#include "worker/parallel/step_plan.h"

namespace gemma::replica {

using engine::Engine;
using engine::StepBatch;
using engine::StepEntry;
using engine::StepExecutor;

class LeaderExecutor : public StepExecutor {
 public:
  // `group_control` spans the ranks of this tensor-parallel group (null: no followers).
  LeaderExecutor(gemma4::Model* model, parallel::Communicator* group_control);

  absl::StatusOr<std::vector<int32_t>> Execute(const StepBatch& batch, KvCache& cache) override;
  // A step with no sequences (the group is idle while others are not), followers included.
  absl::Status ExecuteEmpty(KvCache& cache);
  // Tells the followers to leave FollowPlans.
  absl::Status Stop();
  // Steps executed so far (empty ones included).
  uint64_t steps_executed() const { return steps_executed_; }

 private:
  absl::Status Send(parallel::StepPlan plan);

  gemma4::Model* model_;
  std::unique_ptr<parallel::StepPlanChannel> channel_;
  uint64_t steps_executed_ = 0;
};

// A follower rank: applies the leader's plans to this rank's model and cache until a stop plan.
// Sequences are tracked by id; a released id gives back its pages.
absl::Status FollowPlans(gemma4::Model& model, KvCache& cache,
                         parallel::Communicator* group_control);

// dp-ep: one lockstep iteration of a group leader. All group leaders of the replica sum
// "has work" flags over `leaders` (a communicator of the group leaders); if any group has work,
// this group runs a step: the engine's step when it has work, an empty one otherwise. Returns
// false when no group had work (nothing ran).
absl::StatusOr<bool> LockstepStep(Engine& engine, LeaderExecutor& executor, KvCache& cache,
                                  parallel::Communicator* leaders);

// The leader's engine loop until *stop: Engine::Run, or in dp-ep (leaders not null) the
// lockstep iterations, polling while no group has work with a wait backing off from 1 to
// 16 ms so an idle replica does not spin on its collectives. Returns the first error.
absl::Status RunLeaderLoop(Engine& engine, LeaderExecutor& executor, KvCache& cache,
                           parallel::Communicator* leaders, const std::atomic<bool>* stop);

}  // namespace gemma::replica
