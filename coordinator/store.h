// The rendezvous key-value store of the coordinator: the rank processes of a replica meet here
// (Gloo addresses, the NCCL unique id) through gemma.internal.v1.Coordinator's Store* calls,
// under a key prefix their worker's supervisor picks. In memory, bounded (key and value sizes,
// number of keys, total bytes), thread-safe. A Get waits for its key without holding a thread:
// it is a waiter completed by the Set (or Add) that creates the key, or by the store's timer.
//
// Counters: Add keeps a key's value as the decimal ASCII text of an int64 ("-3", "12"), the
// encoding torch's and Gloo's stores use, so a Get of a counter key returns that text; an Add to
// a key whose value is not such text is INVALID_ARGUMENT.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "coordinator/timer.h"

namespace gemma::coordinator {

struct StoreLimits {
  size_t max_key_bytes = 4096;
  size_t max_value_bytes = 1 << 20;  // 1 MiB: rendezvous values are addresses and ids
  size_t max_keys = 65536;
  size_t max_total_bytes = 256 << 20;  // keys and values together
  int64_t max_timeout_ms = 3600 * 1000;
  size_t max_waiters = 65536;
};

class Store {
 public:
  // Called exactly once: the value, DEADLINE_EXCEEDED naming the key after the timeout,
  // CANCELLED after CancelGet, INVALID_ARGUMENT for a bad request, RESOURCE_EXHAUSTED when too
  // many Gets wait. Never called with the store's lock held.
  using GetCallback = std::function<void(absl::StatusOr<std::string>)>;

  explicit Store(StoreLimits limits = StoreLimits()) : limits_(limits) {}
  // Waiters still waiting are dropped without their callback; destroy the store after the
  // server whose calls wait on it.
  ~Store() = default;
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  // Creates or replaces `key` and completes the Gets waiting for it. INVALID_ARGUMENT for an
  // empty or too-long key or a too-large value; RESOURCE_EXHAUSTED when the store is full.
  absl::Status Set(const std::string& key, std::string value);
  // The value of `key`, at once when it is there, else once a Set or Add creates it within
  // `timeout` (0: do not wait). The id is for CancelGet (0 when `done` has been called already).
  uint64_t Get(const std::string& key, std::chrono::milliseconds timeout, GetCallback done);
  // Completes a waiting Get with CANCELLED (its call was cancelled); nothing if it is done.
  void CancelGet(uint64_t id);
  // Adds `delta` to the counter at `key` (a missing key counts as 0); the value after the add.
  // INVALID_ARGUMENT when the key holds something else than a decimal int64 and on overflow.
  absl::StatusOr<int64_t> Add(const std::string& key, int64_t delta);
  // Removes every key starting with `prefix`; how many. INVALID_ARGUMENT for an empty prefix
  // (it would remove every replica's keys).
  absl::StatusOr<int64_t> DeletePrefix(const std::string& prefix);

  size_t num_keys() const;
  size_t num_waiters() const;

 private:
  struct Waiter {
    std::string key;
    GetCallback done;
    uint64_t timer_id = 0;
  };
  absl::Status CheckKey(const std::string& key) const;
  // Stores `value` at `key` (sizes checked) and takes the waiters of `key` out into `ready`.
  absl::Status PutLocked(const std::string& key, std::string value,
                         std::vector<std::pair<Waiter, std::string>>* ready)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  void Complete(std::vector<std::pair<Waiter, std::string>> ready);

  const StoreLimits limits_;
  mutable absl::Mutex mutex_;
  std::map<std::string, std::string> values_ ABSL_GUARDED_BY(mutex_);
  size_t total_bytes_ ABSL_GUARDED_BY(mutex_) = 0;
  std::map<uint64_t, Waiter> waiters_ ABSL_GUARDED_BY(mutex_);
  std::multimap<std::string, uint64_t> waiters_by_key_ ABSL_GUARDED_BY(mutex_);
  uint64_t next_waiter_ ABSL_GUARDED_BY(mutex_) = 1;
  // Last: destroyed (its thread stopped) before the maps its callbacks use.
  Timer timer_;
};

}  // namespace gemma::coordinator
