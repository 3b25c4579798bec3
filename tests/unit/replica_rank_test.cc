// Process ranks agree on their data plane through the rendezvous store before joining groups:
// real TCP store, real Gloo groups, ranks as threads of this test. Without a GPU (CI) every
// rank publishes no device; on a one-GPU machine both publish the same one. Either way NCCL
// cannot serve two ranks, so auto takes Gloo and an explicit nccl is refused at start-up.
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/parallel/tcp_store.h"
#include "worker/replica/rank.h"

namespace gemma::replica {
namespace {

using ::testing::HasSubstr;

struct RankOutcome {
  absl::Status status;
  parallel::DataPlane plane = parallel::DataPlane::kAuto;
  float reduced = 0.0f;
};

std::vector<RankOutcome> RunTwoRanks(parallel::DataPlane asked) {
  auto server = parallel::TcpStoreServer::Start("127.0.0.1", 0);
  EXPECT_TRUE(server.ok()) << server.status();
  if (!server.ok()) return {};
  std::vector<RankOutcome> outcomes(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      auto store = parallel::TcpStoreClient::Connect("127.0.0.1", (*server)->port());
      if (!store.ok()) {
        outcomes[r].status = store.status();
        return;
      }
      ProcessRankOptions options;
      options.world.world_size = 2;
      options.world.rank = r;
      options.hostname = "127.0.0.1";
      options.timeout = std::chrono::seconds(20);
      options.control_timeout = std::chrono::seconds(20);
      options.data_plane = asked;
      outcomes[r].status = RunProcessRank(options, **store, [&](RankEnv& env) {
        outcomes[r].plane = env.data_plane;
        // The data plane carries a reduction between the ranks.
        float value = static_cast<float>(r + 1);
        absl::Status s = env.parallel.tp_comm->AllReduce(&value, 1, DType::kF32);
        outcomes[r].reduced = value;
        return s;
      });
    });
  }
  for (std::thread& t : threads) t.join();
  return outcomes;
}

TEST(ProcessRankTest, AutoDataPlaneIsGlooWhenRanksHaveNoGpuOfTheirOwn) {
  std::vector<RankOutcome> outcomes = RunTwoRanks(parallel::DataPlane::kAuto);
  ASSERT_EQ(outcomes.size(), 2u);
  for (const RankOutcome& o : outcomes) {
    EXPECT_TRUE(o.status.ok()) << o.status;
    EXPECT_EQ(o.plane, parallel::DataPlane::kGloo);
    EXPECT_EQ(o.reduced, 3.0f);
  }
}

TEST(ProcessRankTest, NcclForRanksThatCannotHaveItIsRefusedAtStartUp) {
  std::vector<RankOutcome> outcomes = RunTwoRanks(parallel::DataPlane::kNccl);
  ASSERT_EQ(outcomes.size(), 2u);
  for (const RankOutcome& o : outcomes) {
    EXPECT_EQ(o.status.code(), absl::StatusCode::kFailedPrecondition) << o.status;
    EXPECT_THAT(o.status.message(), HasSubstr("--data-plane nccl cannot serve this replica"));
    EXPECT_THAT(o.status.message(), HasSubstr("--data-plane gloo"));
  }
}

}  // namespace
}  // namespace gemma::replica
