// A small fork-join thread pool for the CPU backend's loops. A loop is cut into a few chunks
// per thread, which the caller and the workers claim one at a time, so a thread that the OS
// deschedules (a shared machine, more runnable threads than cores) holds up at most the chunk it
// is running, and the caller never waits for a worker that has not started: it runs the
// remaining chunks itself.
// Between loops a worker spins for a short, bounded time (at most tens of microseconds, less
// when spins keep failing) watching for the next one, then blocks on a condition variable; the
// caller likewise spins briefly for the last chunks to finish before it blocks. Back-to-back
// loops (decode runs hundreds of small products per token) so skip the sleep and wake-up, while
// idle workers never spin for long, so pools of several processes or libraries on few cores do
// not starve each other.
// Thread-safe: concurrent ParallelFor calls are serialised. fn must not call ParallelFor on the
// same pool.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace gemma {

class ThreadPool {
 public:
  // `num_threads` counts the calling thread; 1 runs everything inline.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls fn(begin, end) over disjoint ranges covering [0, n), each of at least `min_per_part`
  // items, on at most num_threads() threads at a time; returns when all have run. The ranges
  // depend only on n, min_per_part and num_threads(), not on which thread runs which.
  void ParallelFor(int64_t n, int64_t min_per_part,
                   const std::function<void(int64_t, int64_t)>& fn);

 private:
  using Fn = std::function<void(int64_t, int64_t)>;

  void WorkerLoop(int index);
  // Claims and runs chunks of the loop of generation `generation` until none are left.
  void RunChunks(uint64_t generation);

  std::vector<std::thread> workers_;
  std::mutex run_mutex_;  // one ParallelFor at a time
  std::mutex mutex_;      // guards the sleeps below
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  // The current loop: generation, chunk count and next unclaimed chunk packed in one word (see
  // thread_pool.cc), and its function, length and wanted thread count.
  alignas(64) std::atomic<uint64_t> claim_{0};
  std::atomic<const Fn*> fn_{nullptr};
  std::atomic<int64_t> n_{0};
  std::atomic<int> threads_wanted_{0};
  alignas(64) std::atomic<int64_t> chunks_done_{0};
  std::atomic<int> sleeping_workers_{0};
  std::atomic<bool> caller_sleeping_{false};
  std::atomic<bool> stop_{false};
  uint64_t generation_ = 0;              // under run_mutex_
  std::chrono::nanoseconds caller_spin_;  // under run_mutex_; see thread_pool.cc
};

}  // namespace gemma
