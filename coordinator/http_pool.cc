#include "coordinator/http_pool.h"

#include <chrono>
#include <utility>

#include "glog/logging.h"

namespace gemma::coordinator {
namespace {
thread_local bool t_overflow = false;
}  // namespace

HttpConnectionPool::HttpConnectionPool(int threads, int max_overflow)
    : max_overflow_(max_overflow) {
  for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { Work(); });
}

HttpConnectionPool::~HttpConnectionPool() { shutdown(); }

bool HttpConnectionPool::OnOverflowThread() { return t_overflow; }

int64_t HttpConnectionPool::overflowed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return overflowed_;
}

void HttpConnectionPool::enqueue(std::function<void()> fn) {
  std::unique_lock<std::mutex> lock(mutex_);
  // A worker is (or will be) free for it: the common case.
  if (idle_ > static_cast<int>(jobs_.size()) || overflow_running_ >= max_overflow_ || shutdown_) {
    jobs_.push_back(std::move(fn));
    work_cv_.notify_one();
    return;
  }
  ++overflow_running_;
  if (overflowed_++ == 0) {
    LOG(WARNING) << "HTTP: every one of " << workers_.size() << " threads (--http-threads) is "
                 << "busy; connections beyond them are answered 429 at once";
  }
  lock.unlock();
  std::thread([this, fn = std::move(fn)] {
    t_overflow = true;
    fn();
    std::lock_guard<std::mutex> done(mutex_);
    --overflow_running_;
    overflow_done_cv_.notify_all();
  }).detach();
}

void HttpConnectionPool::shutdown() {
  std::vector<std::thread> workers;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    if (shutdown_ && workers_.empty()) return;
    shutdown_ = true;
    work_cv_.notify_all();
    workers.swap(workers_);
  }
  for (std::thread& t : workers) t.join();
  std::unique_lock<std::mutex> lock(mutex_);
  // Overflow threads hold `this`: wait for them (each answers one refusal and closes).
  if (!overflow_done_cv_.wait_for(lock, std::chrono::seconds(10),
                                  [this] { return overflow_running_ == 0; })) {
    LOG(ERROR) << "HTTP: " << overflow_running_ << " overflow connection(s) still open at "
               << "shutdown";
  }
}

void HttpConnectionPool::Work() {
  for (;;) {
    std::function<void()> fn;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      ++idle_;
      work_cv_.wait(lock, [this] { return shutdown_ || !jobs_.empty(); });
      --idle_;
      if (jobs_.empty()) return;  // shut down with nothing left
      fn = std::move(jobs_.front());
      jobs_.pop_front();
    }
    fn();
  }
}

}  // namespace gemma::coordinator
