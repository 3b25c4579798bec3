#include "coordinator/store.h"

#include <utility>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace gemma::coordinator {
namespace {

// A key as shown in messages: escaped, and cut after 200 characters.
std::string ShowKey(const std::string& key) {
  std::string shown = absl::CHexEscape(key);
  if (shown.size() > 200) shown = absl::StrCat(shown.substr(0, 200), "...");
  return absl::StrCat("'", shown, "'");
}

}  // namespace

absl::Status Store::CheckKey(const std::string& key) const {
  if (key.empty()) return absl::InvalidArgumentError("the store key is empty");
  if (key.size() > limits_.max_key_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("the store key of ", key.size(),
                                                   " bytes is longer than the limit of ",
                                                   limits_.max_key_bytes, " bytes"));
  }
  return absl::OkStatus();
}

absl::Status Store::PutLocked(const std::string& key, std::string value,
                              std::vector<std::pair<Waiter, std::string>>* ready) {
  if (value.size() > limits_.max_value_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the value of ", value.size(), " bytes for store key ", ShowKey(key),
        " is larger than the limit of ", limits_.max_value_bytes, " bytes"));
  }
  auto it = values_.find(key);
  const size_t old_bytes = it == values_.end() ? 0 : key.size() + it->second.size();
  const size_t new_total = total_bytes_ - old_bytes + key.size() + value.size();
  if (it == values_.end() && values_.size() >= limits_.max_keys) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the rendezvous store holds its limit of ", limits_.max_keys,
        " keys; stale replicas' keys are removed by StoreDeletePrefix"));
  }
  if (new_total > limits_.max_total_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the rendezvous store would hold ", new_total, " bytes, more than its limit of ",
        limits_.max_total_bytes));
  }
  total_bytes_ = new_total;
  if (it == values_.end()) {
    it = values_.emplace(key, std::move(value)).first;
  } else {
    it->second = std::move(value);
  }
  auto [first, last] = waiters_by_key_.equal_range(key);
  for (auto w = first; w != last; ++w) {
    auto waiter = waiters_.find(w->second);
    ready->emplace_back(std::move(waiter->second), it->second);
    waiters_.erase(waiter);
  }
  waiters_by_key_.erase(first, last);
  return absl::OkStatus();
}

void Store::Complete(std::vector<std::pair<Waiter, std::string>> ready) {
  for (auto& [waiter, value] : ready) {
    timer_.Cancel(waiter.timer_id);
    waiter.done(std::move(value));
  }
}

absl::Status Store::Set(const std::string& key, std::string value) {
  if (absl::Status status = CheckKey(key); !status.ok()) return status;
  std::vector<std::pair<Waiter, std::string>> ready;
  {
    absl::MutexLock lock(&mutex_);
    if (absl::Status status = PutLocked(key, std::move(value), &ready); !status.ok()) {
      return status;
    }
  }
  Complete(std::move(ready));
  return absl::OkStatus();
}

uint64_t Store::Get(const std::string& key, std::chrono::milliseconds timeout, GetCallback done) {
  absl::Status invalid = CheckKey(key);
  if (invalid.ok() && (timeout.count() < 0 || timeout.count() > limits_.max_timeout_ms)) {
    invalid = absl::InvalidArgumentError(absl::StrCat("timeout_ms must be in [0, ",
                                                      limits_.max_timeout_ms, "], got ",
                                                      timeout.count()));
  }
  if (!invalid.ok()) {
    done(invalid);
    return 0;
  }
  absl::StatusOr<std::string> now_result;
  {
    absl::MutexLock lock(&mutex_);
    auto it = values_.find(key);
    if (it != values_.end()) {
      now_result = it->second;
    } else if (timeout.count() == 0) {
      now_result = absl::DeadlineExceededError(
          absl::StrCat("store key ", ShowKey(key), " is not set (timeout_ms 0: no wait)"));
    } else if (waiters_.size() >= limits_.max_waiters) {
      now_result = absl::ResourceExhaustedError(absl::StrCat(
          "the rendezvous store already has ", waiters_.size(), " waiting gets (the limit)"));
    } else {
      const uint64_t id = next_waiter_++;
      Waiter& waiter = waiters_[id];
      waiter.key = key;
      waiter.done = std::move(done);
      waiters_by_key_.emplace(key, id);
      // The timer's callback takes mutex_, held here until timer_id is set.
      waiter.timer_id =
          timer_.Schedule(Timer::Clock::now() + timeout, [this, id, timeout] {
            absl::StatusOr<std::string> result;
            Waiter expired;
            {
              absl::MutexLock lock(&mutex_);
              auto it = waiters_.find(id);
              if (it == waiters_.end()) return;  // set or cancelled meanwhile
              expired = std::move(it->second);
              waiters_.erase(it);
              auto [first, last] = waiters_by_key_.equal_range(expired.key);
              for (auto w = first; w != last; ++w) {
                if (w->second == id) {
                  waiters_by_key_.erase(w);
                  break;
                }
              }
            }
            expired.done(absl::DeadlineExceededError(
                absl::StrCat("store key ", ShowKey(expired.key), " was not set within ",
                             timeout.count(), " ms")));
          });
      return id;
    }
  }
  done(std::move(now_result));
  return 0;
}

void Store::CancelGet(uint64_t id) {
  if (id == 0) return;
  Waiter cancelled;
  {
    absl::MutexLock lock(&mutex_);
    auto it = waiters_.find(id);
    if (it == waiters_.end()) return;
    cancelled = std::move(it->second);
    waiters_.erase(it);
    auto [first, last] = waiters_by_key_.equal_range(cancelled.key);
    for (auto w = first; w != last; ++w) {
      if (w->second == id) {
        waiters_by_key_.erase(w);
        break;
      }
    }
  }
  timer_.Cancel(cancelled.timer_id);
  cancelled.done(absl::CancelledError(
      absl::StrCat("the wait for store key ", ShowKey(cancelled.key), " was cancelled")));
}

absl::StatusOr<int64_t> Store::Add(const std::string& key, int64_t delta) {
  if (absl::Status status = CheckKey(key); !status.ok()) return status;
  std::vector<std::pair<Waiter, std::string>> ready;
  int64_t result = 0;
  {
    absl::MutexLock lock(&mutex_);
    int64_t value = 0;
    auto it = values_.find(key);
    if (it != values_.end() && !absl::SimpleAtoi(it->second, &value)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "store key ", ShowKey(key), " holds ", it->second.size(),
          " bytes that are not a decimal int64, so it is no counter for StoreAdd"));
    }
    if (__builtin_add_overflow(value, delta, &result)) {
      return absl::InvalidArgumentError(absl::StrCat("adding ", delta, " to the counter ",
                                                     ShowKey(key), " at ", value,
                                                     " overflows int64"));
    }
    if (absl::Status status = PutLocked(key, absl::StrCat(result), &ready); !status.ok()) {
      return status;
    }
  }
  Complete(std::move(ready));
  return result;
}

absl::StatusOr<int64_t> Store::DeletePrefix(const std::string& prefix) {
  if (prefix.empty()) {
    return absl::InvalidArgumentError(
        "the prefix is empty; it would remove every replica's keys");
  }
  if (prefix.size() > limits_.max_key_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("the prefix of ", prefix.size(),
                                                   " bytes is longer than the key limit of ",
                                                   limits_.max_key_bytes, " bytes"));
  }
  absl::MutexLock lock(&mutex_);
  int64_t deleted = 0;
  auto it = values_.lower_bound(prefix);
  while (it != values_.end() && absl::string_view(it->first).substr(0, prefix.size()) == prefix) {
    total_bytes_ -= it->first.size() + it->second.size();
    it = values_.erase(it);
    ++deleted;
  }
  return deleted;
}

size_t Store::num_keys() const {
  absl::MutexLock lock(&mutex_);
  return values_.size();
}

size_t Store::num_waiters() const {
  absl::MutexLock lock(&mutex_);
  return waiters_.size();
}

}  // namespace gemma::coordinator
