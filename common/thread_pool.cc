#include "common/thread_pool.h"

#include <algorithm>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace gemma {
namespace {

// How long a worker watches for the next loop after finishing one, and how long the caller
// watches for the last chunks to finish, before blocking: at most kMaxSpin, short enough that
// an idle pool costs nothing noticeable to other processes, long enough to cover the gaps
// between the small products of one decode step. Each waiting side adapts its own budget: a
// spin that ends in a block halves it (down to kMinSpin), one that succeeds doubles it. On a
// machine with more runnable threads than cores spins often fail, and the pool degrades to
// plain blocking instead of burning the time slices it shares.
constexpr std::chrono::nanoseconds kMaxSpin = std::chrono::microseconds(50);
constexpr std::chrono::nanoseconds kMinSpin = std::chrono::microseconds(2);

// Chunks per thread of one loop (fewer when min_per_part allows fewer).
constexpr int64_t kChunksPerThread = 4;

// The claim word: generation in the high 40 bits, chunk count and next unclaimed chunk in two
// 12-bit fields. A thread claims a chunk by a compare-and-swap that checks the generation, so a
// worker that wakes late for a finished loop can never claim a chunk of the next one.
constexpr int kCountBits = 12;
constexpr uint64_t kCountMask = (uint64_t{1} << kCountBits) - 1;
constexpr int64_t kMaxChunks = static_cast<int64_t>(kCountMask);
constexpr uint64_t kGenerationMask = (uint64_t{1} << (64 - 2 * kCountBits)) - 1;

uint64_t Pack(uint64_t generation, uint64_t chunks, uint64_t next) {
  return ((generation & kGenerationMask) << (2 * kCountBits)) | (chunks << kCountBits) | next;
}
uint64_t GenerationOf(uint64_t w) { return w >> (2 * kCountBits); }
uint64_t ChunksOf(uint64_t w) { return (w >> kCountBits) & kCountMask; }
uint64_t NextOf(uint64_t w) { return w & kCountMask; }

std::chrono::nanoseconds AdaptSpin(std::chrono::nanoseconds budget, bool succeeded) {
  return succeeded ? std::min(kMaxSpin, budget * 2) : std::max(kMinSpin, budget / 2);
}

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

// Polls done() with a pause between polls for at most `budget`; returns its last value.
template <typename Done>
bool SpinFor(Done done, std::chrono::nanoseconds budget) {
  const auto start = std::chrono::steady_clock::now();
  for (uint32_t i = 1;; ++i) {
    if (done()) return true;
    CpuRelax();
    if ((i & 31) == 0 && std::chrono::steady_clock::now() - start > budget) return done();
  }
}

}  // namespace

ThreadPool::ThreadPool(int num_threads) : caller_spin_(kMaxSpin) {
  for (int i = 1; i < std::max(1, num_threads); ++i) {
    workers_.emplace_back([this, i] { WorkerLoop(i); });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_.store(true);
  }
  work_cv_.notify_all();
  for (auto& w : workers_) w.join();
}

void ThreadPool::RunChunks(uint64_t generation) {
  uint64_t w = claim_.load(std::memory_order_acquire);
  // Read after seeing the generation and before claiming: a successful claim proves the loop
  // was unfinished, so the caller had not yet started writing the next loop's fields.
  const Fn* fn = fn_.load(std::memory_order_relaxed);
  const int64_t n = n_.load(std::memory_order_relaxed);
  while (GenerationOf(w) == generation && NextOf(w) < ChunksOf(w)) {
    if (!claim_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel,
                                      std::memory_order_acquire)) {
      continue;  // w reloaded
    }
    const int64_t chunks = static_cast<int64_t>(ChunksOf(w));
    const int64_t c = static_cast<int64_t>(NextOf(w));
    (*fn)(n * c / chunks, n * (c + 1) / chunks);
    if (chunks_done_.fetch_add(1) + 1 == chunks && caller_sleeping_.load()) {
      std::lock_guard<std::mutex> lock(mutex_);
      done_cv_.notify_one();
    }
    w = claim_.load(std::memory_order_acquire);
  }
}

void ThreadPool::WorkerLoop(int index) {
  uint64_t seen = 0;
  std::chrono::nanoseconds spin = kMaxSpin;
  while (true) {
    auto has_work = [&] { return GenerationOf(claim_.load()) != seen || stop_.load(); };
    const bool spun = SpinFor(has_work, spin);
    spin = AdaptSpin(spin, spun);
    if (!spun) {
      std::unique_lock<std::mutex> lock(mutex_);
      // Announced before the final check (both sequentially consistent), so a caller that
      // publishes a loop either is seen here or sees this worker asleep and notifies it.
      sleeping_workers_.fetch_add(1);
      work_cv_.wait(lock, has_work);
      sleeping_workers_.fetch_sub(1);
    }
    const uint64_t generation = GenerationOf(claim_.load());
    if (generation == seen) return;  // stop_ with no loop pending
    seen = generation;
    if (index < threads_wanted_.load(std::memory_order_relaxed)) RunChunks(generation);
  }
}

void ThreadPool::ParallelFor(int64_t n, int64_t min_per_part,
                             const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  const int64_t max_chunks = n / std::max<int64_t>(1, min_per_part);
  const int64_t threads = std::min<int64_t>(num_threads(), max_chunks);
  if (threads <= 1) {
    fn(0, n);
    return;
  }
  const int64_t chunks = std::min({max_chunks, threads * kChunksPerThread, kMaxChunks});
  std::lock_guard<std::mutex> run_lock(run_mutex_);
  generation_ = (generation_ + 1) & kGenerationMask;
  if (generation_ == 0) generation_ = 1;  // 0 is the idle word's generation
  fn_.store(&fn, std::memory_order_relaxed);
  n_.store(n, std::memory_order_relaxed);
  threads_wanted_.store(static_cast<int>(threads), std::memory_order_relaxed);
  chunks_done_.store(0, std::memory_order_relaxed);
  claim_.store(Pack(generation_, static_cast<uint64_t>(chunks), 0));  // publishes the above
  if (sleeping_workers_.load() > 0) {
    // Taking the mutex orders this after any worker's check-then-wait.
    { std::lock_guard<std::mutex> lock(mutex_); }
    work_cv_.notify_all();
  }
  RunChunks(generation_);
  auto done = [&] { return chunks_done_.load() == chunks; };
  const bool spun = SpinFor(done, caller_spin_);
  caller_spin_ = AdaptSpin(caller_spin_, spun);
  if (!spun) {
    std::unique_lock<std::mutex> lock(mutex_);
    caller_sleeping_.store(true);
    done_cv_.wait(lock, done);
    caller_sleeping_.store(false);
  }
}

}  // namespace gemma
