// The coordinator's rendezvous store (coordinator/store.h) and its timer (coordinator/timer.h):
// set/get, gets that wait and are completed by a set, an add or their timeout, cancellation,
// counters and their text encoding, prefix deletion, and every bound.
#include "coordinator/store.h"

#include <atomic>
#include <chrono>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "coordinator/timer.h"
#include "gtest/gtest.h"

namespace gemma::coordinator {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

// Collects the one result of a Get.
class GetResult {
 public:
  Store::GetCallback Callback() {
    return [this](absl::StatusOr<std::string> value) {
      absl::MutexLock lock(&mutex_);
      ++calls_;
      result_ = std::move(value);
      done_.Notify();
    };
  }
  // The result after at most `timeout`; nullopt when the callback has not run.
  std::optional<absl::StatusOr<std::string>> Wait(milliseconds timeout = milliseconds(5000)) {
    if (!done_.WaitForNotificationWithTimeout(absl::FromChrono(timeout))) return std::nullopt;
    absl::MutexLock lock(&mutex_);
    return result_;
  }
  bool done() const { return done_.HasBeenNotified(); }
  int calls() {
    absl::MutexLock lock(&mutex_);
    return calls_;
  }

 private:
  absl::Mutex mutex_;
  absl::Notification done_;
  int calls_ = 0;
  absl::StatusOr<std::string> result_;
};

TEST(CoordinatorTimerTest, RunsCallbacksInDeadlineOrderAndCancels) {
  Timer timer;
  absl::Mutex mutex;
  std::vector<int> order;
  absl::Notification last;
  const Clock::time_point now = Clock::now();
  auto record = [&](int i) {
    return [&, i] {
      absl::MutexLock lock(&mutex);
      order.push_back(i);
    };
  };
  timer.Schedule(now + milliseconds(60), record(3));
  timer.Schedule(now + milliseconds(20), record(1));
  const uint64_t cancelled = timer.Schedule(now + milliseconds(30), record(99));
  timer.Schedule(now + milliseconds(40), record(2));
  timer.Schedule(now + milliseconds(80), [&] { last.Notify(); });
  EXPECT_TRUE(timer.Cancel(cancelled));
  EXPECT_FALSE(timer.Cancel(cancelled));
  EXPECT_FALSE(timer.Cancel(12345));
  ASSERT_TRUE(last.WaitForNotificationWithTimeout(absl::Seconds(5)));
  absl::MutexLock lock(&mutex);
  EXPECT_EQ(order, (std::vector<int>{1, 2, 3}));
  EXPECT_GE(Clock::now() - now, milliseconds(80));
}

TEST(CoordinatorTimerTest, PastDeadlineRunsAtOnceAndCallbacksMaySchedule) {
  Timer timer;
  absl::Notification second;
  timer.Schedule(Clock::now() - milliseconds(10),
                 [&] { timer.Schedule(Clock::now(), [&] { second.Notify(); }); });
  EXPECT_TRUE(second.WaitForNotificationWithTimeout(absl::Seconds(5)));
}

TEST(CoordinatorTimerTest, DestroyedWithPendingCallbacksRunsNone) {
  std::atomic<int> runs{0};
  {
    Timer timer;
    for (int i = 0; i < 10; ++i) {
      timer.Schedule(Clock::now() + std::chrono::hours(1), [&] { ++runs; });
    }
    EXPECT_EQ(timer.pending(), 10u);
  }
  EXPECT_EQ(runs.load(), 0);
}

TEST(CoordinatorStoreTest, SetThenGetAnswersAtOnce) {
  Store store;
  ASSERT_TRUE(store.Set("replica/a/rank0", std::string("addr\0bytes", 10)).ok());
  GetResult result;
  EXPECT_EQ(store.Get("replica/a/rank0", milliseconds(1000), result.Callback()), 0u);
  ASSERT_TRUE(result.done());
  auto value = result.Wait();
  ASSERT_TRUE(value.has_value() && value->ok());
  EXPECT_EQ(**value, std::string("addr\0bytes", 10));
  // Replacing a value.
  ASSERT_TRUE(store.Set("replica/a/rank0", "other").ok());
  GetResult again;
  store.Get("replica/a/rank0", milliseconds(0), again.Callback());
  EXPECT_EQ(**again.Wait(), "other");
  EXPECT_EQ(store.num_keys(), 1u);
}

TEST(CoordinatorStoreTest, WaitingGetIsCompletedBySet) {
  Store store;
  GetResult first;
  GetResult second;
  EXPECT_NE(store.Get("k", milliseconds(5000), first.Callback()), 0u);
  EXPECT_NE(store.Get("k", milliseconds(5000), second.Callback()), 0u);
  GetResult other;
  store.Get("other", milliseconds(5000), other.Callback());
  EXPECT_EQ(store.num_waiters(), 3u);
  EXPECT_FALSE(first.done());
  std::thread setter([&] {
    std::this_thread::sleep_for(milliseconds(30));
    ASSERT_TRUE(store.Set("k", "v").ok());
  });
  const Clock::time_point start = Clock::now();
  auto a = first.Wait();
  auto b = second.Wait();
  setter.join();
  ASSERT_TRUE(a.has_value() && a->ok()) << (a.has_value() ? a->status().ToString() : "no call");
  ASSERT_TRUE(b.has_value() && b->ok());
  EXPECT_EQ(**a, "v");
  EXPECT_EQ(**b, "v");
  EXPECT_LT(Clock::now() - start, milliseconds(4000));
  EXPECT_EQ(store.num_waiters(), 1u);
  EXPECT_FALSE(other.done());
  EXPECT_EQ(first.calls(), 1);
}

TEST(CoordinatorStoreTest, GetTimesOutNamingTheKey) {
  Store store;
  GetResult result;
  const Clock::time_point start = Clock::now();
  store.Get("job/7/nccl_id", milliseconds(80), result.Callback());
  auto value = result.Wait();
  ASSERT_TRUE(value.has_value());
  EXPECT_GE(Clock::now() - start, milliseconds(80));
  EXPECT_EQ(value->status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(absl::StrContains(value->status().message(), "job/7/nccl_id"))
      << value->status();
  EXPECT_TRUE(absl::StrContains(value->status().message(), "80 ms")) << value->status();
  EXPECT_EQ(store.num_waiters(), 0u);
  // A set after the timeout does not call it again.
  ASSERT_TRUE(store.Set("job/7/nccl_id", "x").ok());
  EXPECT_EQ(result.calls(), 1);
}

TEST(CoordinatorStoreTest, ZeroTimeoutDoesNotWait) {
  Store store;
  GetResult result;
  EXPECT_EQ(store.Get("missing", milliseconds(0), result.Callback()), 0u);
  ASSERT_TRUE(result.done());
  EXPECT_EQ(result.Wait()->status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(absl::StrContains(result.Wait()->status().message(), "missing"));
}

TEST(CoordinatorStoreTest, CancelledGetIsCompletedOnce) {
  Store store;
  GetResult result;
  const uint64_t id = store.Get("k", milliseconds(60000), result.Callback());
  ASSERT_NE(id, 0u);
  store.CancelGet(id);
  ASSERT_TRUE(result.done());
  EXPECT_EQ(result.Wait()->status().code(), absl::StatusCode::kCancelled);
  store.CancelGet(id);  // nothing
  ASSERT_TRUE(store.Set("k", "v").ok());
  EXPECT_EQ(result.calls(), 1);
  EXPECT_EQ(store.num_waiters(), 0u);
}

TEST(CoordinatorStoreTest, CountersAreDecimalTextAndWakeWaiters) {
  Store store;
  GetResult waiting;
  store.Get("barrier", milliseconds(5000), waiting.Callback());
  absl::StatusOr<int64_t> value = store.Add("barrier", 1);
  ASSERT_TRUE(value.ok()) << value.status();
  EXPECT_EQ(*value, 1);
  auto woken = waiting.Wait();
  ASSERT_TRUE(woken.has_value() && woken->ok());
  EXPECT_EQ(**woken, "1");
  EXPECT_EQ(*store.Add("barrier", 41), 42);
  EXPECT_EQ(*store.Add("barrier", -50), -8);
  GetResult read;
  store.Get("barrier", milliseconds(0), read.Callback());
  EXPECT_EQ(**read.Wait(), "-8");
  // A counter set as text by Set counts too.
  ASSERT_TRUE(store.Set("set_counter", "10").ok());
  EXPECT_EQ(*store.Add("set_counter", 5), 15);
}

TEST(CoordinatorStoreTest, AddToANonCounterOrPastInt64IsInvalid) {
  Store store;
  ASSERT_TRUE(store.Set("address", "10.0.0.1:5000").ok());
  absl::StatusOr<int64_t> bad = store.Add("address", 1);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(bad.status().message(), "address")) << bad.status();
  EXPECT_TRUE(absl::StrContains(bad.status().message(), "not a decimal int64")) << bad.status();
  ASSERT_TRUE(store.Add("big", INT64_MAX).ok());
  absl::StatusOr<int64_t> overflow = store.Add("big", 1);
  EXPECT_EQ(overflow.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(overflow.status().message(), "overflows")) << overflow.status();
  EXPECT_EQ(*store.Add("big", 0), INT64_MAX);
}

TEST(CoordinatorStoreTest, DeletePrefixRemovesOnlyThatPrefix) {
  Store store;
  for (const char* key : {"r1/a", "r1/b", "r1/c/d", "r10/a", "r2/a", "r"}) {
    ASSERT_TRUE(store.Set(key, "v").ok());
  }
  absl::StatusOr<int64_t> deleted = store.DeletePrefix("r1/");
  ASSERT_TRUE(deleted.ok());
  EXPECT_EQ(*deleted, 3);
  EXPECT_EQ(store.num_keys(), 3u);
  EXPECT_EQ(*store.DeletePrefix("r1/"), 0);
  EXPECT_EQ(*store.DeletePrefix("r"), 3);
  EXPECT_EQ(store.num_keys(), 0u);
  absl::StatusOr<int64_t> everything = store.DeletePrefix("");
  EXPECT_EQ(everything.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(everything.status().message(), "prefix is empty"));
}

TEST(CoordinatorStoreTest, BadKeysValuesAndTimeoutsAreInvalidArgument) {
  StoreLimits limits;
  limits.max_key_bytes = 8;
  limits.max_value_bytes = 16;
  limits.max_timeout_ms = 1000;
  Store store(limits);
  absl::Status empty = store.Set("", "v");
  EXPECT_EQ(empty.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(empty.message(), "key is empty")) << empty;
  absl::Status long_key = store.Set("123456789", "v");
  EXPECT_EQ(long_key.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(long_key.message(), "9 bytes")) << long_key;
  EXPECT_TRUE(absl::StrContains(long_key.message(), "8 bytes")) << long_key;
  absl::Status big = store.Set("k", std::string(17, 'x'));
  EXPECT_EQ(big.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(big.message(), "17 bytes")) << big;
  EXPECT_TRUE(store.Set("k", std::string(16, 'x')).ok());
  EXPECT_EQ(store.Add("", 1).status().code(), absl::StatusCode::kInvalidArgument);
  for (int64_t timeout : {-1, 1001}) {
    GetResult result;
    EXPECT_EQ(store.Get("k", milliseconds(timeout), result.Callback()), 0u);
    ASSERT_TRUE(result.done());
    EXPECT_EQ(result.Wait()->status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(result.Wait()->status().message(), "timeout_ms"));
  }
  GetResult no_key;
  store.Get("", milliseconds(10), no_key.Callback());
  EXPECT_EQ(no_key.Wait()->status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(CoordinatorStoreTest, FullStoreIsResourceExhausted) {
  StoreLimits limits;
  limits.max_keys = 3;
  limits.max_total_bytes = 40;
  limits.max_waiters = 2;
  Store store(limits);
  ASSERT_TRUE(store.Set("a", "1").ok());
  ASSERT_TRUE(store.Set("b", "1").ok());
  ASSERT_TRUE(store.Set("c", "1").ok());
  absl::Status full = store.Set("d", "1");
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(full.message(), "3 keys")) << full;
  EXPECT_TRUE(store.Set("a", "replaced").ok());  // an existing key can change
  absl::Status bytes = store.Set("b", std::string(40, 'x'));
  EXPECT_EQ(bytes.code(), absl::StatusCode::kResourceExhausted);
  ASSERT_EQ(*store.DeletePrefix("a"), 1);
  EXPECT_TRUE(store.Set("d", "1").ok());
  GetResult one;
  GetResult two;
  GetResult three;
  store.Get("w", milliseconds(5000), one.Callback());
  store.Get("w", milliseconds(5000), two.Callback());
  store.Get("w", milliseconds(5000), three.Callback());
  ASSERT_TRUE(three.done());
  EXPECT_EQ(three.Wait()->status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_FALSE(one.done());
}

TEST(CoordinatorStoreTest, ManyThreadsRendezvous) {
  // Eight "ranks" publish their address and read everyone else's, as Gloo does.
  Store store;
  constexpr int kRanks = 8;
  std::vector<std::thread> ranks;
  std::atomic<int> failures{0};
  for (int rank = 0; rank < kRanks; ++rank) {
    ranks.emplace_back([&, rank] {
      std::this_thread::sleep_for(milliseconds(5 * (kRanks - rank)));
      if (!store.Set("p/addr" + std::to_string(rank), "host:" + std::to_string(rank)).ok()) {
        ++failures;
      }
      for (int other = 0; other < kRanks; ++other) {
        GetResult result;
        store.Get("p/addr" + std::to_string(other), milliseconds(5000), result.Callback());
        auto value = result.Wait();
        if (!value.has_value() || !value->ok() || **value != "host:" + std::to_string(other)) {
          ++failures;
        }
      }
      if (!store.Add("p/done", 1).ok()) ++failures;
    });
  }
  for (std::thread& t : ranks) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(*store.Add("p/done", 0), kRanks);
  EXPECT_EQ(store.num_waiters(), 0u);
}

TEST(CoordinatorStoreTest, DestroyedWithWaitingGets) {
  GetResult result;
  {
    Store store;
    store.Get("never", milliseconds(60000), result.Callback());
  }
  EXPECT_FALSE(result.done());
}

}  // namespace
}  // namespace gemma::coordinator
