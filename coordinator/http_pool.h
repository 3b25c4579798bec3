// The HTTP port's connection pool. cpp-httplib hands each accepted connection to a task queue;
// its own ThreadPool queues a connection that finds every thread busy (with streams, a thread
// is busy for a whole generation) behind all the others, unbounded, so its client waits
// seconds for anything, even a refusal. Here such a connection is served at once on a
// short-lived overflow thread instead, where OnOverflowThread() is true and the coordinator
// answers 429 with Retry-After straight away and closes it. Only past `max_overflow` overflow
// threads do connections queue.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "httplib.h"

namespace gemma::coordinator {

class HttpConnectionPool : public httplib::TaskQueue {
 public:
  HttpConnectionPool(int threads, int max_overflow);
  ~HttpConnectionPool() override;

  void enqueue(std::function<void()> fn) override;
  // Stops the workers after the queued connections, and waits (a few seconds at most) for the
  // overflow threads, which each answer one refusal and close.
  void shutdown() override;

  // True on an overflow thread: the connection it serves found every pool thread busy.
  static bool OnOverflowThread();

  // Connections served on overflow threads so far (for logs and tests).
  int64_t overflowed() const;

 private:
  void Work();

  const int max_overflow_;
  mutable std::mutex mutex_;
  std::condition_variable work_cv_;
  std::condition_variable overflow_done_cv_;
  std::deque<std::function<void()>> jobs_;
  std::vector<std::thread> workers_;
  int idle_ = 0;
  int overflow_running_ = 0;
  int64_t overflowed_ = 0;
  bool shutdown_ = false;
};

}  // namespace gemma::coordinator
