// InProcessGroup: every collective at W = 1, 2, 4 against a serial reference, exact traffic
// counters, timeouts when a rank never joins, and mismatched collectives.
#include "worker/parallel/in_process_communicator.h"

#include <chrono>
#include <functional>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "common/status_macros.h"
#include "gtest/gtest.h"
#include "tests/unit/parallel/collective_checks.h"

namespace gemma::parallel {
namespace {

using Clock = std::chrono::steady_clock;

// Runs fn(rank, comm) on one thread per rank and returns each rank's status.
std::vector<absl::Status> RunRanks(InProcessGroup& group,
                                   const std::function<absl::Status(int, Communicator&)>& fn,
                                   int num_ranks_to_run = -1) {
  const int n = num_ranks_to_run < 0 ? group.world_size() : num_ranks_to_run;
  std::vector<std::unique_ptr<Communicator>> comms;
  for (int r = 0; r < group.world_size(); ++r) comms.push_back(group.communicator(r));
  std::vector<absl::Status> statuses(n);
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] { statuses[r] = fn(r, *comms[r]); });
  }
  for (std::thread& t : threads) t.join();
  return statuses;
}

class InProcessCollectivesTest : public ::testing::TestWithParam<int> {};

TEST_P(InProcessCollectivesTest, AllCollectivesMatchSerialReferenceWithExactCounters) {
  InProcessGroup group(GetParam(), std::chrono::seconds(10));
  for (uint64_t seed : {1u, 2u}) {
    std::vector<absl::Status> statuses = RunRanks(group, [&](int, Communicator& comm) {
      return testing::RunAllCollectiveChecks(comm, seed, /*exact_f32=*/true);
    });
    for (size_t r = 0; r < statuses.size(); ++r) {
      EXPECT_TRUE(statuses[r].ok()) << "rank " << r << ": " << statuses[r];
    }
  }
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, InProcessCollectivesTest, ::testing::Values(1, 2, 4));

TEST(InProcessCommunicatorTest, AllReduceBf16SumsInRankOrder) {
  InProcessGroup group(2, std::chrono::seconds(10));
  std::vector<absl::Status> statuses = RunRanks(group, [](int rank, Communicator& comm) {
    std::vector<uint16_t> data = {F32ToBf16(1.5f + rank), F32ToBf16(-0.25f * (rank + 1))};
    RETURN_IF_ERROR(comm.AllReduce(data.data(), data.size(), DType::kBF16));
    if (Bf16ToF32(data[0]) != 4.0f || Bf16ToF32(data[1]) != -0.75f) {
      return absl::InternalError("wrong bf16 sum");
    }
    return absl::OkStatus();
  });
  for (const absl::Status& s : statuses) EXPECT_TRUE(s.ok()) << s;
}

TEST(InProcessCommunicatorTest, AllToAllVSelfSendIsNotCountedAsTraffic) {
  InProcessGroup group(2, std::chrono::seconds(10));
  std::vector<absl::Status> statuses = RunRanks(group, [](int rank, Communicator& comm) {
    // Each rank keeps 4 elements for itself and sends nothing to the other.
    std::vector<int32_t> send = {rank, rank + 1, rank + 2, rank + 3};
    std::vector<int32_t> recv(4, -1);
    std::vector<int64_t> counts =
        rank == 0 ? std::vector<int64_t>{4, 0} : std::vector<int64_t>{0, 4};
    RETURN_IF_ERROR(comm.AllToAllV(send.data(), counts, recv.data(), counts, DType::kI32));
    if (recv != send) return absl::InternalError("self block not copied");
    if (comm.traffic().BytesSent(CollectiveOp::kAllToAllV) != 0 ||
        comm.traffic().TotalBytesSent() != 0) {
      return absl::InternalError("self-send counted as traffic");
    }
    return absl::OkStatus();
  });
  for (const absl::Status& s : statuses) EXPECT_TRUE(s.ok()) << s;
}

TEST(InProcessCommunicatorTest, RankThatNeverJoinsTimesOutTheOthers) {
  const auto timeout = std::chrono::milliseconds(1000);
  InProcessGroup group(3, timeout);
  std::vector<std::unique_ptr<Communicator>> comms;
  for (int r = 0; r < 3; ++r) comms.push_back(group.communicator(r));
  std::vector<absl::Status> statuses(2);
  std::vector<Clock::duration> elapsed(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {  // rank 2 never calls
    threads.emplace_back([&, r] {
      const Clock::time_point start = Clock::now();
      std::vector<float> data(8, 1.0f);
      statuses[r] = comms[r]->AllReduce(data.data(), data.size(), DType::kF32);
      elapsed[r] = Clock::now() - start;
    });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(statuses[r].code(), absl::StatusCode::kDeadlineExceeded) << statuses[r];
    EXPECT_TRUE(absl::StrContains(statuses[r].message(), "AllReduce")) << statuses[r];
    EXPECT_TRUE(absl::StrContains(statuses[r].message(), "rank(s) [2]")) << statuses[r];
    EXPECT_GE(elapsed[r], timeout - std::chrono::milliseconds(50));
    EXPECT_LT(elapsed[r], timeout + std::chrono::milliseconds(1500));
    EXPECT_FALSE(comms[r]->healthy());
    // Dead: the next call fails fast.
    const Clock::time_point start = Clock::now();
    absl::Status again = comms[r]->Barrier();
    EXPECT_EQ(again.code(), absl::StatusCode::kUnavailable) << again;
    EXPECT_LT(Clock::now() - start, std::chrono::milliseconds(100));
  }
  // The late rank finds the group aborted instead of hanging.
  absl::Status late = comms[2]->Barrier();
  EXPECT_FALSE(late.ok());
}

TEST(InProcessCommunicatorTest, MismatchedCollectivesFailOnEveryRank) {
  InProcessGroup group(2, std::chrono::seconds(10));
  std::vector<absl::Status> statuses = RunRanks(group, [](int rank, Communicator& comm) {
    if (rank == 0) {
      float x = 1.0f;
      return comm.AllReduce(&x, 1, DType::kF32);
    }
    return comm.Barrier();
  });
  for (const absl::Status& s : statuses) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "collective mismatch")) << s;
  }
}

TEST(InProcessCommunicatorTest, InvalidArgumentsAreRejectedWithoutCommunicating) {
  InProcessGroup group(1);
  std::unique_ptr<Communicator> comm = group.communicator(0);
  uint16_t h = 0;
  EXPECT_EQ(comm->AllReduce(&h, 1, DType::kF16).code(), absl::StatusCode::kInvalidArgument);
  float x = 0;
  EXPECT_EQ(comm->Broadcast(&x, 1, DType::kF32, 3).code(), absl::StatusCode::kInvalidArgument);
  std::vector<int64_t> counts = {1, 2};
  EXPECT_EQ(comm->AllToAllV(&x, counts, &x, counts, DType::kF32).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(comm->healthy());
}

}  // namespace
}  // namespace gemma::parallel
