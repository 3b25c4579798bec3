// A timer thread for the coordinator's waits: callbacks scheduled at steady-clock deadlines run
// one at a time on the timer's own thread, so that a call waiting for something (a store key, a
// replica to take a request over) pins no gRPC thread. Thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <thread>
#include <utility>

#include "absl/synchronization/mutex.h"

namespace gemma::coordinator {

class Timer {
 public:
  using Clock = std::chrono::steady_clock;

  Timer();
  // Stops the thread; callbacks still scheduled never run. One that is running finishes first.
  ~Timer();
  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;

  // Runs `callback` on the timer thread at `when` (at once if it is past). The id, never 0, is
  // for Cancel. A callback may schedule or cancel others.
  uint64_t Schedule(Clock::time_point when, std::function<void()> callback);
  // True when the callback was still scheduled and now never runs; false when it has run, is
  // running now, or `id` is unknown. Never waits.
  bool Cancel(uint64_t id);
  // Callbacks scheduled and not yet started.
  size_t pending() const;

 private:
  void Loop();

  mutable absl::Mutex mutex_;
  bool stop_ ABSL_GUARDED_BY(mutex_) = false;
  uint64_t next_id_ ABSL_GUARDED_BY(mutex_) = 1;
  // Ordered by deadline, then by id (scheduling order).
  std::map<std::pair<Clock::time_point, uint64_t>, std::function<void()>> queue_
      ABSL_GUARDED_BY(mutex_);
  std::map<uint64_t, Clock::time_point> deadlines_ ABSL_GUARDED_BY(mutex_);
  std::thread thread_;  // last: starts once the rest is built
};

}  // namespace gemma::coordinator
