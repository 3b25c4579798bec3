// Expert-load windows of a replica leader: the engine thread, after a step, takes the model's
// counters once a window has elapsed and queues them as a window with the step range it
// covers; the heartbeat thread drains the queue into its heartbeat, and puts the windows back
// when the heartbeat did not reach the coordinator, so none is lost while it is away (the queue
// keeps the newest kMaxQueued).
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "gemma/v1/cluster.pb.h"
#include "worker/model/gemma4/model.h"

namespace gemma::service {

class ExpertLoadRecorder {
 public:
  static constexpr int kMaxQueued = 600;
  using Clock = std::chrono::steady_clock;

  explicit ExpertLoadRecorder(std::chrono::milliseconds window) : window_(window) {}

  // Engine thread, after step `step` ran, which recomputed `recomputed_tokens` positions
  // dropped by a preemption. Takes the model's counters when the window has elapsed (or always
  // with `force`); an error of the read is returned (the counters are then left as they were).
  absl::Status OnStep(gemma4::Model& model, uint64_t step, int64_t recomputed_tokens,
                      bool force = false);
  // Heartbeat thread.
  std::vector<gemma::v1::ExpertLoad> Drain();
  void Requeue(std::vector<gemma::v1::ExpertLoad> windows);

 private:
  const std::chrono::milliseconds window_;
  // Engine thread only.
  Clock::time_point next_take_ = Clock::now();
  uint64_t first_step_ = 0;  // first step of the window being counted (0: none yet)
  int64_t recomputed_ = 0;   // recomputed tokens in the window being counted
  absl::Mutex mutex_;
  std::deque<gemma::v1::ExpertLoad> queue_ ABSL_GUARDED_BY(mutex_);
};

}  // namespace gemma::service
