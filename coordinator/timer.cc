#include "coordinator/timer.h"

#include "absl/time/time.h"

namespace gemma::coordinator {

Timer::Timer() : thread_([this] { Loop(); }) {}

Timer::~Timer() {
  {
    absl::MutexLock lock(&mutex_);
    stop_ = true;
  }
  thread_.join();
}

uint64_t Timer::Schedule(Clock::time_point when, std::function<void()> callback) {
  absl::MutexLock lock(&mutex_);
  const uint64_t id = next_id_++;
  queue_.emplace(std::make_pair(when, id), std::move(callback));
  deadlines_.emplace(id, when);
  return id;
}

bool Timer::Cancel(uint64_t id) {
  absl::MutexLock lock(&mutex_);
  auto it = deadlines_.find(id);
  if (it == deadlines_.end()) return false;
  queue_.erase(std::make_pair(it->second, id));
  deadlines_.erase(it);
  return true;
}

size_t Timer::pending() const {
  absl::MutexLock lock(&mutex_);
  return queue_.size();
}

void Timer::Loop() {
  mutex_.Lock();
  while (!stop_) {
    if (queue_.empty()) {
      // Woken by Schedule or the destructor through the condition.
      auto wake = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
        return stop_ || !queue_.empty();
      };
      mutex_.Await(absl::Condition(&wake));
      continue;
    }
    auto first = queue_.begin();
    const Clock::time_point when = first->first.first;
    const Clock::time_point now = Clock::now();
    if (when > now) {
      // Wait for the first deadline, or for an earlier one, or for the destructor.
      const uint64_t first_id = first->first.second;
      auto changed = [this, when, first_id]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
        return stop_ || queue_.empty() || queue_.begin()->first.first != when ||
               queue_.begin()->first.second != first_id;
      };
      mutex_.AwaitWithTimeout(absl::Condition(&changed),
                              absl::FromChrono(when - now) + absl::Microseconds(50));
      continue;
    }
    std::function<void()> callback = std::move(first->second);
    deadlines_.erase(first->first.second);
    queue_.erase(first);
    mutex_.Unlock();
    callback();
    mutex_.Lock();
  }
  mutex_.Unlock();
}

}  // namespace gemma::coordinator
