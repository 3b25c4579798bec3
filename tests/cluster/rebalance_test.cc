// Live expert rebalancing on a real cluster: a dp-ep replica of four rank processes over Gloo
// with spare expert slots serves a steady stream of greedy requests while `gemmactl rebalance
// --wait` (the real client) fits a new placement to its measured load and the replica switches
// to it. No request fails, every output equals gemma-generate's, the replica reports the new
// epoch and the coordinator records the switch. With every load stalled 2 s, tokens keep
// arriving while the replica loads: steps never wait for the weights.
#include <atomic>
#include <chrono>
#include <functional>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/cluster/cluster_harness.h"

namespace gemma::testing::cluster {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

std::vector<int32_t> Prompt(uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> tokens = {2};
  const int length = 6 + static_cast<int>(rng() % 20);
  while (static_cast<int>(tokens.size()) < length) tokens.push_back(5 + rng() % 500);
  return tokens;
}

class RebalanceTest : public ::testing::TestWithParam<int> {};

TEST_P(RebalanceTest, RebalanceUnderStreamingChangesNoOutputAndFailsNothing) {
  const int load_delay_ms = GetParam();
  Cluster cluster("rebalance");
  std::string error;
  // Only on request here; the replica's heartbeats (and load windows) come every 200 ms.
  ASSERT_TRUE(cluster.StartCoordinator({"--rebalance-threshold", "0"}, &error)) << error;
  cluster.StartWorker(kTinyMoe, {"--cpu-ranks", "4", "--mode", "dp-ep", "--tp", "1",
                                 "--redundant-experts", "4", "--heartbeat-ms", "200",
                                 "--placement-load-delay-ms", absl::StrCat(load_delay_ms)});
  ASSERT_TRUE(cluster.WaitHealthy(4, Clock::now() + seconds(60))) << cluster.Log("worker0");

  constexpr int kPrompts = 16;
  constexpr int64_t kMaxTokens = 24;
  std::vector<std::vector<int32_t>> prompts, expected;
  for (int i = 0; i < kPrompts; ++i) {
    prompts.push_back(Prompt(100 + i));
    expected.push_back(GemmaGenerate(kTinyMoe, prompts.back(), kMaxTokens));
  }

  // Eight clients send requests one after another until the switch has happened and each has
  // finished two more after it.
  std::atomic<bool> switched{false};
  std::atomic<int> sent{0}, failed{0}, mismatched{0}, finished_after_switch{0};
  std::mutex mutex;
  Clock::time_point last_token = Clock::now();
  milliseconds longest_gap{0};  // between two responses of any stream, while loading
  std::atomic<bool> loading{false};
  std::vector<std::thread> clients;
  ThreadJoiner joiner([&] { switched.store(true); }, &clients);
  for (int c = 0; c < 8; ++c) {
    clients.emplace_back([&, c] {
      int after = 0;
      for (int n = 0; after < 2 && n < 400; ++n) {
        const int p = (c * 7 + n) % kPrompts;
        ++sent;
        const bool switched_before = switched.load();
        StreamResult r = Generate(cluster.inference(), TokenRequest(prompts[p], kMaxTokens),
                                  seconds(60), [&](const StreamResult&) {
                                    std::lock_guard<std::mutex> lock(mutex);
                                    const Clock::time_point now = Clock::now();
                                    if (loading.load()) {
                                      longest_gap = std::max(
                                          longest_gap, std::chrono::duration_cast<milliseconds>(
                                                           now - last_token));
                                    }
                                    last_token = now;
                                  });
        if (!r.status.ok()) {
          ++failed;
          ADD_FAILURE() << "client " << c << " request " << n << ": " << r.status.error_message();
        } else if (r.ids != expected[p]) {
          ++mismatched;
          ADD_FAILURE() << "client " << c << " prompt " << p << " differs from gemma-generate";
        }
        if (switched_before) {
          ++finished_after_switch;
          ++after;
        }
      }
    });
  }
  // Windows under the starting placement first; then the real client asks for the switch and
  // waits for it. (Until a window has come in, rebalance says there is no load yet.)
  ToolRun rebalance;
  const Clock::time_point give_up = Clock::now() + seconds(60);
  do {
    std::this_thread::sleep_for(milliseconds(300));
    loading.store(true);
    {
      std::lock_guard<std::mutex> lock(mutex);
      last_token = Clock::now();
    }
    rebalance = RunWithStdin({"gemmactl", "--coordinator", cluster.coordinator_address(),
                              "rebalance", "--wait"},
                             "", seconds(60));
  } while (absl::StrContains(rebalance.out, "no expert load") && Clock::now() < give_up);
  loading.store(false);
  switched.store(true);
  for (std::thread& t : clients) t.join();

  EXPECT_EQ(rebalance.exit_code, 0) << rebalance.out << rebalance.err << cluster.Log("worker0");
  EXPECT_TRUE(absl::StrContains(rebalance.out, "offered")) << rebalance.out;
  EXPECT_TRUE(absl::StrContains(rebalance.out, "switched to placement epoch 1")) << rebalance.out;
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(mismatched.load(), 0);
  EXPECT_GT(sent.load(), 16);
  if (load_delay_ms > 0) {
    // The 2 s load ran beside the steps: no pause near its length between tokens.
    EXPECT_LT(longest_gap.count(), load_delay_ms / 2) << "steps stalled while loading";
  }

  grpc::ClientContext context;
  gemma::v1::GetExpertLoadResponse load;
  ASSERT_TRUE(cluster.cluster().GetExpertLoad(&context, {}, &load).ok());
  ASSERT_EQ(load.replicas_size(), 4);
  for (const gemma::v1::ReplicaExpertLoad& r : load.replicas()) {
    EXPECT_EQ(r.placement().epoch(), 1u) << r.replica_id();
    EXPECT_EQ(r.placement().num_ranks(), 4);
    EXPECT_EQ(r.placement().slots_per_rank(), 5);  // (16 experts + 4 spares) / 4 ranks
    ASSERT_GE(r.switches_size(), 1) << r.replica_id();
    const gemma::v1::RebalanceRecord& s = r.switches(r.switches_size() - 1);
    EXPECT_EQ(s.state(), "active");
    EXPECT_EQ(s.reason(), "requested");
    EXPECT_GE(s.balancedness_predicted(), s.balancedness_before());
  }
  // gemmactl experts shows the placement and the switch.
  ToolRun experts = RunWithStdin(
      {"gemmactl", "--coordinator", cluster.coordinator_address(), "experts", "--replica",
       load.replicas(0).replica_id()},
      "");
  EXPECT_EQ(experts.exit_code, 0) << experts.err;
  EXPECT_TRUE(absl::StrContains(experts.out, "placement epoch 1, 4 ranks x 5 slots (4 redundant)"))
      << experts.out;
  EXPECT_TRUE(absl::StrContains(experts.out, "last switch: epoch 1 (requested, active)"))
      << experts.out;
  EXPECT_TRUE(absl::StrContains(cluster.Log("worker0"), "expert placement epoch 1 in use"))
      << cluster.Log("worker0");
}

INSTANTIATE_TEST_SUITE_P(LoadDelays, RebalanceTest, ::testing::Values(0, 2000),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return info.param == 0 ? std::string("Immediate")
                                                  : std::string("SlowLoad");
                         });

TEST(RebalanceErrorsTest, RefusedWhereItCannotApply) {
  Cluster cluster("rebalance_errors");
  std::string error;
  ASSERT_TRUE(cluster.StartCoordinator({}, &error)) << error;
  // A spare count that does not divide over the ranks: the worker says so and exits.
  cluster.StartWorker(kTinyMoe, {"--cpu-ranks", "2", "--redundant-experts", "3"});
  EXPECT_NE(cluster.worker(0).WaitForExitCode(milliseconds(20000)), 0);
  EXPECT_TRUE(absl::StrContains(cluster.Log("worker0"), "--redundant-experts 3 over 2 ranks"))
      << cluster.Log("worker0");
  EXPECT_TRUE(absl::StrContains(cluster.Log("worker0"), "multiple of 2")) << cluster.Log("worker0");
  // A dense replica: nothing to balance, said plainly; an unknown replica is NOT_FOUND.
  Cluster dense("rebalance_dense");
  ASSERT_TRUE(dense.StartCoordinator({}, &error)) << error;
  dense.StartWorker(kTinyDense, {});
  ASSERT_TRUE(dense.WaitHealthy(1, Clock::now() + seconds(30))) << dense.Log("worker0");
  ToolRun none = RunWithStdin(
      {"gemmactl", "--coordinator", dense.coordinator_address(), "rebalance"}, "");
  EXPECT_EQ(none.exit_code, 0) << none.err;
  EXPECT_TRUE(absl::StrContains(none.out, "nothing to balance")) << none.out;
  ToolRun unknown = RunWithStdin({"gemmactl", "--coordinator", dense.coordinator_address(),
                                  "rebalance", "--replica", "r99"},
                                 "");
  EXPECT_NE(unknown.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(unknown.err, "replica r99 is not known")) << unknown.err;
  // The dense replica named: said to have no experts to move, not to be missing.
  const gemma::v1::GetStatusResponse status = dense.Status();
  ASSERT_EQ(status.replicas_size(), 1);
  ToolRun named = RunWithStdin({"gemmactl", "--coordinator", dense.coordinator_address(),
                                "rebalance", "--replica", status.replicas(0).id()},
                               "");
  EXPECT_NE(named.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(named.err, "has no experts spread over ranks to move"))
      << named.err;
}

}  // namespace
}  // namespace gemma::testing::cluster
