// Gloo communicator with ranks as separate processes (parallel_gloo_rank) on loopback TCP:
// every collective at W = 2 and 3, a rank SIGKILLed or frozen mid-run, a peer that never joins.
#include "worker/parallel/gloo_communicator.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "glog/logging.h"
#include "gtest/gtest.h"
#include "tests/testing/child_process.h"
#include "worker/parallel/tcp_store.h"

namespace gemma::parallel {
namespace {

using Clock = std::chrono::steady_clock;

const char kRankBinary[] = GEMMA_BINARY_DIR "/bin/parallel_gloo_rank";

using testing::ChildProcess;

struct RankResult {
  absl::StatusCode code;
  std::string message;
};

RankResult ReadResult(TcpStoreClient& store, int rank) {
  absl::StatusOr<std::string> value =
      store.Get(absl::StrCat("result/", rank), std::chrono::seconds(5));
  if (!value.ok()) {
    ADD_FAILURE() << "rank " << rank << " published no result: " << value.status();
    return {absl::StatusCode::kUnknown, std::string(value.status().message())};
  }
  const size_t bar = value->find('|');
  return {static_cast<absl::StatusCode>(std::stoi(value->substr(0, bar))), value->substr(bar + 1)};
}

class GlooProcessTest : public ::testing::TestWithParam<int> {};

TEST_P(GlooProcessTest, EveryCollectiveMatchesTheReferenceAcrossProcesses) {
  const int world_size = GetParam();
  absl::StatusOr<std::unique_ptr<TcpStoreServer>> server = TcpStoreServer::Start("127.0.0.1", 0);
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string port = std::to_string((*server)->port());
  std::vector<std::unique_ptr<ChildProcess>> ranks;
  for (int r = 0; r < world_size; ++r) {
    ranks.push_back(std::make_unique<ChildProcess>(
        std::vector<std::string>{kRankBinary, port, std::to_string(r), std::to_string(world_size),
                                 "10000", "collectives", "all"}));
  }
  const Clock::time_point deadline = Clock::now() + std::chrono::seconds(30);
  for (int r = 0; r < world_size; ++r) {
    std::optional<int> status = ranks[r]->WaitUntil(deadline);
    ASSERT_TRUE(status.has_value()) << "rank " << r << " did not finish within 30 s";
    EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0)
        << "rank " << r << " status " << *status;
  }
  absl::StatusOr<std::unique_ptr<TcpStoreClient>> store =
      TcpStoreClient::Connect("127.0.0.1", (*server)->port());
  ASSERT_TRUE(store.ok());
  for (int r = 0; r < world_size; ++r) {
    RankResult result = ReadResult(**store, r);
    EXPECT_EQ(result.code, absl::StatusCode::kOk) << "rank " << r << ": " << result.message;
  }
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, GlooProcessTest, ::testing::Values(2, 3));

TEST(GlooCommunicatorTest, SurvivorFailsWithinTheTimeoutWhenAPeerIsKilled) {
  constexpr int kTimeoutMs = 2000;
  absl::StatusOr<std::unique_ptr<TcpStoreServer>> server = TcpStoreServer::Start("127.0.0.1", 0);
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string port = std::to_string((*server)->port());
  ChildProcess survivor(
      {kRankBinary, port, "0", "2", std::to_string(kTimeoutMs), "until_error", "kill"});
  ChildProcess victim(
      {kRankBinary, port, "1", "2", std::to_string(kTimeoutMs), "until_error", "kill"});
  absl::StatusOr<std::unique_ptr<TcpStoreClient>> store =
      TcpStoreClient::Connect("127.0.0.1", (*server)->port());
  ASSERT_TRUE(store.ok());
  // Both ranks are in the collective loop once both ready keys exist.
  ASSERT_TRUE((*store)->Wait({"ready/0", "ready/1"}, std::chrono::seconds(20)).ok());
  victim.Kill();
  const Clock::time_point killed = Clock::now();
  std::optional<int> status =
      survivor.WaitUntil(killed + std::chrono::milliseconds(kTimeoutMs + 3000));
  ASSERT_TRUE(status.has_value()) << "survivor hung after its peer was killed";
  const auto elapsed = Clock::now() - killed;
  EXPECT_LT(elapsed, std::chrono::milliseconds(kTimeoutMs + 3000));
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 1) << "status " << *status;
  RankResult result = ReadResult(**store, 0);
  EXPECT_TRUE(result.code == absl::StatusCode::kUnavailable ||
              result.code == absl::StatusCode::kDeadlineExceeded)
      << static_cast<int>(result.code) << " " << result.message;
  EXPECT_TRUE(absl::StrContains(result.message, "rank 0 of 2")) << result.message;
}

TEST(GlooCommunicatorTest, SurvivorTimesOutWhenAPeerFreezes) {
  constexpr int kTimeoutMs = 1500;
  absl::StatusOr<std::unique_ptr<TcpStoreServer>> server = TcpStoreServer::Start("127.0.0.1", 0);
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string port = std::to_string((*server)->port());
  ChildProcess survivor(
      {kRankBinary, port, "0", "2", std::to_string(kTimeoutMs), "until_error", "freeze"});
  ChildProcess frozen(
      {kRankBinary, port, "1", "2", std::to_string(kTimeoutMs), "until_error", "freeze"});
  absl::StatusOr<std::unique_ptr<TcpStoreClient>> store =
      TcpStoreClient::Connect("127.0.0.1", (*server)->port());
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE((*store)->Wait({"ready/0", "ready/1"}, std::chrono::seconds(20)).ok());
  // A stopped process keeps its sockets open: only the collective timeout can end the wait.
  frozen.Signal(SIGSTOP);
  const Clock::time_point stopped = Clock::now();
  std::optional<int> status =
      survivor.WaitUntil(stopped + std::chrono::milliseconds(kTimeoutMs + 3000));
  ASSERT_TRUE(status.has_value()) << "survivor hung past its timeout";
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 1) << "status " << *status;
  RankResult result = ReadResult(**store, 0);
  EXPECT_EQ(result.code, absl::StatusCode::kDeadlineExceeded) << result.message;
  frozen.Kill();
}

TEST(GlooCommunicatorTest, PeerThatNeverJoinsFailsTheRendezvousWithinTheTimeout) {
  absl::StatusOr<std::unique_ptr<TcpStoreServer>> server = TcpStoreServer::Start("127.0.0.1", 0);
  ASSERT_TRUE(server.ok()) << server.status();
  TcpStoreClient::Options store_options;
  store_options.timeout = std::chrono::milliseconds(1000);
  absl::StatusOr<std::unique_ptr<TcpStoreClient>> store =
      TcpStoreClient::Connect("127.0.0.1", (*server)->port(), store_options);
  ASSERT_TRUE(store.ok());
  GlooOptions options;
  options.rank = 0;
  options.world_size = 2;
  options.hostname = "127.0.0.1";
  options.timeout = std::chrono::milliseconds(1000);
  const Clock::time_point start = Clock::now();
  absl::StatusOr<std::unique_ptr<Communicator>> comm = CreateGlooCommunicator(options, **store);
  const auto elapsed = Clock::now() - start;
  ASSERT_FALSE(comm.ok());
  EXPECT_TRUE(comm.status().code() == absl::StatusCode::kDeadlineExceeded ||
              comm.status().code() == absl::StatusCode::kUnavailable)
      << comm.status();
  EXPECT_TRUE(absl::StrContains(comm.status().message(), "rank 0 of 2")) << comm.status();
  EXPECT_LT(elapsed, std::chrono::milliseconds(4000));
}

TEST(GlooCommunicatorTest, RejectsOptionsWithoutAnAddress) {
  absl::StatusOr<std::unique_ptr<TcpStoreServer>> server = TcpStoreServer::Start("127.0.0.1", 0);
  ASSERT_TRUE(server.ok());
  absl::StatusOr<std::unique_ptr<TcpStoreClient>> store =
      TcpStoreClient::Connect("127.0.0.1", (*server)->port());
  ASSERT_TRUE(store.ok());
  GlooOptions options;
  EXPECT_EQ(CreateGlooCommunicator(options, **store).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(GlooCommunicatorTest, SingleRankGroupOverLoopbackInterface) {
  absl::StatusOr<std::unique_ptr<TcpStoreServer>> server = TcpStoreServer::Start("127.0.0.1", 0);
  ASSERT_TRUE(server.ok());
  absl::StatusOr<std::unique_ptr<TcpStoreClient>> store =
      TcpStoreClient::Connect("127.0.0.1", (*server)->port());
  ASSERT_TRUE(store.ok());
  GlooOptions options;
  options.interface = "lo";
  options.timeout = std::chrono::seconds(5);
  absl::StatusOr<std::unique_ptr<Communicator>> comm = CreateGlooCommunicator(options, **store);
  ASSERT_TRUE(comm.ok()) << comm.status();
  float x = 2.5f;
  EXPECT_TRUE((*comm)->AllReduce(&x, 1, DType::kF32).ok());
  EXPECT_EQ(x, 2.5f);
  EXPECT_EQ((*comm)->traffic().TotalBytesSent(), 0u);
}

}  // namespace
}  // namespace gemma::parallel
