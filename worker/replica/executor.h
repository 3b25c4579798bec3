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
#include <optional>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "eplb/placement.h"
#include "worker/engine/engine.h"
#include "worker/engine/step_executor.h"
#include "worker/parallel/communicator.h"
#include "worker/parallel/step_plan.h"
#include "worker/replica/placement_loader.h"

namespace gemma::replica {

using engine::Engine;
using engine::StepBatch;
using engine::StepEntry;
using engine::StepExecutor;

// Live expert-placement switches (eplb::Placement, design in docs/architecture.md): a placement
// offered by the coordinator (OfferPlacement, any thread) is agreed on by the group leaders at
// the start of a lockstep iteration (AgreeOnPlacement: in dp-ep one leader broadcasts it to the
// others), forwarded to each group's followers in the next step plan, loaded by every rank in
// the background, and voted on after each step (one small all-reduce per group while loading);
// when every group has voted ready, every rank installs it before the same step, whose plan
// carries the new epoch. Steps never wait for a load; a failed load abandons the offer.
class LeaderExecutor : public StepExecutor {
 public:
  // `group_control` spans the ranks of this tensor-parallel group (null: no followers).
  // `load_delay` stalls every placement load (a test of loads slower than steps).
  LeaderExecutor(gemma4::Model* model, parallel::Communicator* group_control,
                 std::chrono::milliseconds load_delay = std::chrono::milliseconds(0));

  absl::StatusOr<std::vector<int32_t>> Execute(const StepBatch& batch, KvCache& cache) override;
  // A step with no sequences (the group is idle while others are not), followers included.
  absl::Status ExecuteEmpty(KvCache& cache);
  // Tells the followers to leave FollowPlans.
  absl::Status Stop();
  // Steps executed so far (empty ones included).
  uint64_t steps_executed() const { return steps_executed_; }

  // A placement to switch to; ignored unless its epoch is above every one seen. Thread-safe.
  void OfferPlacement(eplb::Placement placement);
  // The placement the model runs with now. Thread-safe.
  eplb::Placement ActivePlacement() const;
  // An offer is waiting, being agreed on or loaded: the loop keeps stepping (empty steps)
  // until the switch. Step thread.
  bool placement_pending() const;
  // Start of a lockstep iteration (step thread): `mine` is this leader's [has work, incoming
  // epoch, ready epoch, offered epoch]; `all` the same for every leader (in leader order, this
  // one included; `leaders` null with one group). Adopts the newest offer (broadcast from the
  // first leader that has it) and decides whether this iteration's step switches.
  void PlacementState(int64_t mine[4]);
  absl::Status AgreeOnPlacement(const std::vector<int64_t>& all, parallel::Communicator* leaders);
  // dp-ep: whether no group had work at the last lockstep iteration (a draining leader leaves
  // only then, since every group's steps need every leader). Thread-safe.
  bool replica_idle() const { return replica_idle_.load(); }
  void set_replica_idle(bool idle) { replica_idle_.store(idle); }

 private:
  absl::Status Send(parallel::StepPlan plan);
  // Before a step's plan is sent: the switch, the forwarded offer and the vote flag.
  absl::Status PreparePlacement(parallel::StepPlan& plan);
  // After the step: the group's vote.
  absl::Status VoteOnPlacement(const parallel::StepPlan& plan);
  absl::StatusOr<std::vector<int32_t>> RunPlan(parallel::StepPlan plan,
                                               const std::vector<gemma4::SequenceStep>& steps,
                                               const std::vector<SamplingParams>& params,
                                               KvCache& cache);

  gemma4::Model* model_;
  parallel::Communicator* group_control_;
  std::unique_ptr<parallel::StepPlanChannel> channel_;
  uint64_t steps_executed_ = 0;
  PlacementLoader loader_;
  mutable absl::Mutex mutex_;
  std::optional<eplb::Placement> incoming_ ABSL_GUARDED_BY(mutex_);
  eplb::Placement active_ ABSL_GUARDED_BY(mutex_);
  uint64_t highest_seen_ ABSL_GUARDED_BY(mutex_) = 0;  // the newest epoch adopted
  // Step thread.
  std::optional<eplb::Placement> candidate_;  // taken from incoming_, not yet agreed
  std::optional<eplb::Placement> offered_;    // agreed, being loaded
  bool forward_ = false;                      // offered_ not yet sent to the followers
  bool group_ready_ = false;                  // every rank of the group has loaded offered_
  bool switch_now_ = false;                   // the next step runs with offered_
  std::atomic<bool> replica_idle_{true};
};

// A follower rank: applies the leader's plans to this rank's model and cache until a stop plan.
// Sequences are tracked by id; a released id gives back its pages.
absl::Status FollowPlans(gemma4::Model& model, KvCache& cache,
                         parallel::Communicator* group_control,
                         std::chrono::milliseconds load_delay = std::chrono::milliseconds(0));

// dp-ep: one lockstep iteration of a group leader. All group leaders of the replica gather
// their "has work" flags and placement states over `leaders` (a communicator of the group
// leaders; null with one group); if any group has work or a placement switch is under way,
// this group runs a step: the engine's step when it has work, an empty one otherwise. Returns
// false when nothing ran. `stop_wanted` is gathered with the flags: when every leader wants
// to stop, *all_stop (if given) is set and nothing runs, so that the groups leave at the same
// iteration (one leaving alone would break the others' collectives).
absl::StatusOr<bool> LockstepStep(Engine& engine, LeaderExecutor& executor, KvCache& cache,
                                  parallel::Communicator* leaders, bool stop_wanted = false,
                                  bool* all_stop = nullptr);

// The leader's engine loop until *stop: in tp mode the engine's steps, waiting (not spinning)
// while there is no work, and lockstep iterations of its own while a placement switch is under
// way; in dp-ep (leaders not null) the lockstep iterations, polling while no group has work
// with a wait backing off from 1 to 16 ms so an idle replica does not spin on its
// collectives. In dp-ep, after *stop the leader keeps stepping until every leader wants to
// stop (a drained replica's groups leave together) or `stop_wait` has passed. Returns the
// first error.
absl::Status RunLeaderLoop(Engine& engine, LeaderExecutor& executor, KvCache& cache,
                           parallel::Communicator* leaders, const std::atomic<bool>* stop,
                           std::chrono::milliseconds stop_wait = std::chrono::seconds(10));

}  // namespace gemma::replica
