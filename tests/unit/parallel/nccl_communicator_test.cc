// NCCL communicator: created through the TCP store when a GPU is present; skipped visibly
// otherwise (and in builds without NCCL).
#include "worker/parallel/nccl_communicator.h"

#include "gtest/gtest.h"
#include "worker/parallel/tcp_store.h"

namespace gemma::parallel {
namespace {

TEST(NcclCommunicatorTest, SingleRankCommunicatorJoinsAndRunsBarrier) {
  std::string why_not;
  if (!NcclAvailable(&why_not)) GTEST_SKIP() << "NCCL test skipped: " << why_not;
  absl::StatusOr<std::unique_ptr<TcpStoreServer>> server = TcpStoreServer::Start("127.0.0.1", 0);
  ASSERT_TRUE(server.ok()) << server.status();
  absl::StatusOr<std::unique_ptr<TcpStoreClient>> store =
      TcpStoreClient::Connect("127.0.0.1", (*server)->port());
  ASSERT_TRUE(store.ok()) << store.status();
  NcclOptions options;
  options.device = 0;
  options.timeout = std::chrono::seconds(30);
  absl::StatusOr<std::unique_ptr<Communicator>> comm = CreateNcclCommunicator(options, **store);
  ASSERT_TRUE(comm.ok()) << comm.status();
  EXPECT_STREQ((*comm)->backend_name(), "nccl");
  EXPECT_TRUE((*comm)->Barrier().ok());
  EXPECT_TRUE((*comm)->healthy());
  EXPECT_EQ((*comm)->traffic().Calls(CollectiveOp::kBarrier), 1u);
}

TEST(NcclCommunicatorTest, CreationWithoutAGpuFailsCleanly) {
  std::string why_not;
  if (NcclAvailable(&why_not)) GTEST_SKIP() << "a GPU is present; this checks the no-GPU path";
  absl::StatusOr<std::unique_ptr<TcpStoreServer>> server = TcpStoreServer::Start("127.0.0.1", 0);
  ASSERT_TRUE(server.ok()) << server.status();
  absl::StatusOr<std::unique_ptr<TcpStoreClient>> store =
      TcpStoreClient::Connect("127.0.0.1", (*server)->port());
  ASSERT_TRUE(store.ok()) << store.status();
  absl::StatusOr<std::unique_ptr<Communicator>> comm =
      CreateNcclCommunicator(NcclOptions(), **store);
  EXPECT_FALSE(comm.ok());
}

}  // namespace
}  // namespace gemma::parallel
