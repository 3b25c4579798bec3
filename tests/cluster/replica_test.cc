// Multi-rank replicas behind the coordinator, with the real binaries on loopback: a tp=2
// replica of two rank processes gives exactly gemma-generate's ids; 64 concurrent streams over
// two replicas equal their single results; a SIGKILLed rank's streams continue on the other
// replica without a token lost or repeated, the dead replica is marked unhealthy and a
// restarted worker rejoins; the same with the supervisor SIGKILLed (no rank outlives it) and
// with the replica frozen by SIGSTOP (it rejoins once resumed); a cancelled stream's KV pages
// are freed (seen in GetStatus).
#include <signal.h>
#include <sys/wait.h>

#include <atomic>
#include <algorithm>
#include <chrono>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "glog/logging.h"
#include "gtest/gtest.h"
#include "tests/cluster/cluster_harness.h"

namespace gemma::testing::cluster {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
namespace v1 = gemma::v1;

std::vector<int32_t> Prompt(int i) { return {2, 20 + 5 * i, 100 + 3 * i, 410 - 2 * i, 7 + i}; }

const v1::ReplicaStatus* FindReplica(const v1::GetStatusResponse& status, int world_size) {
  for (const v1::ReplicaStatus& r : status.replicas()) {
    if (r.healthy() && r.world_size() == world_size) return &r;
  }
  return nullptr;
}

// Polls the status until no healthy replica is at `address` (true) or `deadline` (false).
bool WaitUnhealthy(Cluster& cluster, const std::string& address, Clock::time_point deadline) {
  while (true) {
    bool unhealthy = true;
    const v1::GetStatusResponse status = cluster.Status();
    for (const v1::ReplicaStatus& r : status.replicas()) {
      if (r.address() == address && r.healthy()) unhealthy = false;
    }
    if (unhealthy) return true;
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(milliseconds(10));
  }
}

TEST(ReplicaTest, TpReplicaOfTwoProcessesEqualsGemmaGenerate) {
  for (const std::string& model : {kTinyMoe, kTinyDense}) {
    SCOPED_TRACE(model);
    Cluster cluster("tp2");
    std::string error;
    ASSERT_TRUE(cluster.StartCoordinator({}, &error)) << error;
    cluster.StartWorker(model, {"--cpu-ranks", "2"});
    ASSERT_TRUE(cluster.WaitHealthy(1, Clock::now() + seconds(60))) << cluster.Log("worker0");
    const v1::GetStatusResponse status = cluster.Status();
    ASSERT_EQ(status.replicas_size(), 1);
    EXPECT_EQ(status.replicas(0).world_size(), 2);
    EXPECT_EQ(status.replicas(0).parallel(), "tp=2");
    EXPECT_EQ(cluster.RankPids(0).size(), 2u) << "one process per rank under the supervisor";
    for (int i = 0; i < 3; ++i) {
      const std::vector<int32_t> expected = GemmaGenerate(model, Prompt(i), 16);
      ASSERT_FALSE(expected.empty());
      StreamResult result = Generate(cluster.inference(), TokenRequest(Prompt(i), 16));
      ASSERT_TRUE(result.status.ok()) << result.status.error_message() << cluster.Log("worker0");
      EXPECT_EQ(result.ids, expected) << "prompt " << i;
      EXPECT_GE(result.num_responses, static_cast<int>(expected.size())) << "streamed";
    }
  }
}

// A replica spanning two workers (nodes), one rank process each.
TEST(ReplicaTest, TwoWorkersFormOneTpReplica) {
  Cluster cluster("two_nodes");
  std::string error;
  ASSERT_TRUE(cluster.StartCoordinator({}, &error)) << error;
  cluster.StartWorker(kTinyMoe, {"--replica", "r0", "--nodes", "2", "--node-rank", "1"});
  cluster.StartWorker(kTinyMoe, {"--replica", "r0", "--nodes", "2", "--node-rank", "0"});
  ASSERT_TRUE(cluster.WaitHealthy(1, Clock::now() + seconds(60)))
      << cluster.Log("worker0") << cluster.Log("worker1");
  const v1::GetStatusResponse status = cluster.Status();
  ASSERT_EQ(status.replicas_size(), 1);
  EXPECT_EQ(status.replicas(0).world_size(), 2);
  const std::vector<int32_t> expected = GemmaGenerate(kTinyMoe, Prompt(1), 16);
  StreamResult result = Generate(cluster.inference(), TokenRequest(Prompt(1), 16));
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  EXPECT_EQ(result.ids, expected);
}

TEST(ReplicaTest, WorkersDisagreeingOnTheReplicaSizeAreRefused) {
  Cluster cluster("bad_nodes");
  std::string error;
  ASSERT_TRUE(cluster.StartCoordinator({}, &error)) << error;
  cluster.StartWorker(kTinyMoe, {"--replica", "r1", "--nodes", "2", "--node-rank", "0"});
  cluster.StartWorker(kTinyMoe, {"--replica", "r1", "--nodes", "2", "--node-rank", "1",
                                 "--cpu-ranks", "2"});
  const std::optional<int> exit = cluster.worker(1).WaitUntil(Clock::now() + seconds(30));
  ASSERT_TRUE(exit.has_value()) << cluster.Log("worker1");
  EXPECT_TRUE(WIFEXITED(*exit) && WEXITSTATUS(*exit) != 0);
  EXPECT_NE(cluster.Log("worker1").find("every worker of a replica needs the same --nodes"),
            std::string::npos)
      << cluster.Log("worker1");
  // Flags that cannot form a replica are refused before any rank starts.
  int code = 0;
  const std::string out = RunTool({"gemma-worker", "--coordinator", cluster.coordinator_address(),
                                   "--model", kTinyMoe, "--nodes", "2", "--node-rank", "1"},
                                  &code);
  EXPECT_EQ(code, 1);
  EXPECT_NE(out.find("--nodes > 1 needs --replica NAME"), std::string::npos) << out;
}

// dp-ep: two data-parallel groups, the experts split over all ranks; each group leader is its
// own routing entry, and the groups step in lockstep (an idle one with empty steps).
struct DpEpCase {
  std::string ranks, tp, parallel;
};

class DpEpReplicaTest : public ::testing::TestWithParam<DpEpCase> {};

TEST_P(DpEpReplicaTest, ServesFromEachGroup) {
  const DpEpCase& c = GetParam();
  Cluster cluster("dp_ep");
  std::string error;
  ASSERT_TRUE(cluster.StartCoordinator({}, &error)) << error;
  // A fixed port, as in a pod: the second group serves on the next one, and advertises it.
  const int port = FreeLocalPort();
  cluster.StartWorker(kTinyMoe, {"--cpu-ranks", c.ranks, "--mode", "dp-ep", "--tp", c.tp,
                                 "--listen", absl::StrCat("127.0.0.1:", port)});
  ASSERT_TRUE(cluster.WaitHealthy(2, Clock::now() + seconds(60))) << cluster.Log("worker0");
  const v1::GetStatusResponse status = cluster.Status();
  std::vector<std::string> addresses;
  for (const v1::ReplicaStatus& r : status.replicas()) {
    EXPECT_EQ(r.world_size(), std::stoi(c.ranks));
    EXPECT_NE(r.parallel().find(c.parallel), std::string::npos) << r.parallel();
    addresses.push_back(r.address());
  }
  std::sort(addresses.begin(), addresses.end());
  EXPECT_EQ(addresses, (std::vector<std::string>{absl::StrCat("127.0.0.1:", port),
                                                 absl::StrCat("127.0.0.1:", port + 1)}));
  constexpr int kStreams = 8;
  std::vector<StreamResult> results(kStreams);
  std::vector<std::thread> threads;
  for (int i = 0; i < kStreams; ++i) {
    threads.emplace_back([&, i] {
      results[i] = Generate(cluster.inference(), TokenRequest(Prompt(i), 16));
    });
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < kStreams; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << results[i].status.error_message();
    EXPECT_EQ(results[i].ids, GemmaGenerate(kTinyMoe, Prompt(i), 16)) << "stream " << i;
  }
  // One group alone busy: the other runs empty steps for the experts' exchange.
  StreamResult alone = Generate(cluster.inference(), TokenRequest(Prompt(9), 16));
  ASSERT_TRUE(alone.status.ok()) << alone.status.error_message();
  EXPECT_EQ(alone.ids, GemmaGenerate(kTinyMoe, Prompt(9), 16));
  // SIGTERM stops every group and rank; the supervisor exits cleanly.
  cluster.worker(0).Signal(SIGTERM);
  EXPECT_EQ(cluster.worker(0).WaitForExitCode(milliseconds(15000)), 0) << cluster.Log("worker0");
}

// Two groups of one rank (ep=2), and two groups of tp=2 (ep=4).
INSTANTIATE_TEST_SUITE_P(Layouts, DpEpReplicaTest,
                         ::testing::Values(DpEpCase{"2", "1", "dp-ep ep=2 tp=1"},
                                           DpEpCase{"4", "2", "dp-ep ep=4 tp=2"}),
                         [](const ::testing::TestParamInfo<DpEpCase>& info) {
                           return "ep" + info.param.ranks + "_tp" + info.param.tp;
                         });

class TwoReplicasTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string error;
    ASSERT_TRUE(cluster_.StartCoordinator({"--heartbeat-timeout-ms", "1500"}, &error)) << error;
    cluster_.StartWorker(kTinyMoe, {});
    cluster_.StartWorker(kTinyMoe, {"--cpu-ranks", "2"});
    ASSERT_TRUE(cluster_.WaitHealthy(2, Clock::now() + seconds(60)))
        << cluster_.Log("worker0") << cluster_.Log("worker1");
  }

  // Each prompt's ids when it runs alone.
  std::vector<std::vector<int32_t>> AloneResults(int n, int64_t max_tokens) {
    std::vector<std::vector<int32_t>> results(n);
    for (int i = 0; i < n; ++i) {
      StreamResult result = Generate(cluster_.inference(), TokenRequest(Prompt(i), max_tokens));
      EXPECT_TRUE(result.status.ok()) << result.status.error_message();
      results[i] = result.ids;
    }
    return results;
  }

  Cluster cluster_{"two_replicas"};
};

TEST_F(TwoReplicasTest, SixtyFourConcurrentStreamsEqualTheirSingleResults) {
  constexpr int kStreams = 64;
  constexpr int64_t kTokens = 12;
  const std::vector<std::vector<int32_t>> alone = AloneResults(kStreams, kTokens);
  std::vector<StreamResult> results(kStreams);
  std::vector<std::thread> threads;
  for (int i = 0; i < kStreams; ++i) {
    threads.emplace_back([&, i] {
      results[i] = Generate(cluster_.inference(), TokenRequest(Prompt(i), kTokens));
    });
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < kStreams; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
    EXPECT_EQ(results[i].ids, alone[i]) << "stream " << i;
  }
}

TEST_F(TwoReplicasTest, KilledRankRequeuesStreamsAndRestartedWorkerRejoins) {
  constexpr int kStreams = 16;
  // Long enough that the tp=2 replica (a Gloo step costs milliseconds on loopback) is mid-stream.
  constexpr int64_t kTokens = 120;
  std::vector<std::vector<int32_t>> alone(kStreams);
  for (int i = 0; i < kStreams; ++i) alone[i] = GemmaGenerate(kTinyMoe, Prompt(i), kTokens);

  std::vector<StreamResult> results(kStreams);
  std::atomic<int> started{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kStreams; ++i) {
    threads.emplace_back([&, i] {
      grpc::ClientContext context;
      context.set_deadline(In(seconds(120)));
      auto reader = cluster_.inference().Generate(&context, TokenRequest(Prompt(i), kTokens));
      v1::GenerateResponse response;
      bool counted = false;
      while (reader->Read(&response)) {
        results[i].ids.insert(results[i].ids.end(), response.token_ids().begin(),
                              response.token_ids().end());
        if (!counted) {
          counted = true;
          started.fetch_add(1);
        }
      }
      results[i].status = reader->Finish();
    });
  }
  // Every stream is under way: kill the follower rank of the tp=2 replica.
  const Clock::time_point deadline = Clock::now() + seconds(30);
  while (started.load() < kStreams && Clock::now() < deadline) {
    std::this_thread::sleep_for(milliseconds(1));
  }
  ASSERT_EQ(started.load(), kStreams);
  const pid_t follower = cluster_.RankPid(1, 1);
  ASSERT_GT(follower, 0);
  const std::string dead_address = FindReplica(cluster_.Status(), 2)->address();
  ASSERT_EQ(kill(follower, SIGKILL), 0);
  const Clock::time_point killed_at = Clock::now();

  // The dead replica is marked unhealthy within the heartbeat timeout.
  EXPECT_TRUE(WaitUnhealthy(cluster_, dead_address, killed_at + seconds(5)));
  EXPECT_LE(Clock::now() - killed_at, milliseconds(1500 + 500));

  for (std::thread& t : threads) t.join();
  for (int i = 0; i < kStreams; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
    EXPECT_EQ(results[i].ids, alone[i]) << "stream " << i << ": lost or repeated tokens";
  }
  EXPECT_GT(cluster_.Status().requests_requeued(), 0) << cluster_.Log("coordinator");
  // The supervisor stopped the replica's other rank and exited.
  EXPECT_NE(cluster_.worker(1).WaitUntil(Clock::now() + seconds(15)), std::nullopt);

  // A restarted worker rejoins; with the other worker gone, it serves alone.
  cluster_.RestartWorker(1);
  ASSERT_TRUE(cluster_.WaitHealthy(2, Clock::now() + seconds(60))) << cluster_.Log("worker1");
  cluster_.worker(0).Kill();
  StreamResult after = Generate(cluster_.inference(), TokenRequest(Prompt(3), kTokens));
  ASSERT_TRUE(after.status.ok()) << after.status.error_message() << cluster_.Log("coordinator");
  EXPECT_EQ(after.ids, alone[3]);
}

// Streams of `kTokens` ids on every prompt, started on threads; returns once each has its
// first ids. Join `threads` before reading `results`.
void StartStreams(Cluster& cluster, int n, int64_t tokens, std::vector<StreamResult>* results,
                  std::vector<std::thread>* threads) {
  results->assign(n, StreamResult());
  auto started = std::make_shared<std::atomic<int>>(0);
  for (int i = 0; i < n; ++i) {
    threads->emplace_back([&cluster, results, started, tokens, i] {
      grpc::ClientContext context;
      context.set_deadline(In(seconds(120)));
      auto reader = cluster.inference().Generate(&context, TokenRequest(Prompt(i), tokens));
      v1::GenerateResponse response;
      bool counted = false;
      while (reader->Read(&response)) {
        (*results)[i].ids.insert((*results)[i].ids.end(), response.token_ids().begin(),
                                 response.token_ids().end());
        if (!counted) {
          counted = true;
          started->fetch_add(1);
        }
      }
      (*results)[i].status = reader->Finish();
    });
  }
  const Clock::time_point deadline = Clock::now() + seconds(30);
  while (started->load() < n && Clock::now() < deadline) {
    std::this_thread::sleep_for(milliseconds(1));
  }
  EXPECT_EQ(started->load(), n) << "streams under way";
}

// Whether `pid` is gone (or a zombie nobody reaped yet).
bool ProcessGone(pid_t pid) {
  if (kill(pid, 0) != 0) return true;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  std::getline(stat, line);
  const size_t paren = line.rfind(')');
  return paren == std::string::npos || line.substr(paren + 2, 1) == "Z";
}

// The failure matrix's worker cells: the supervisor of the tp=2 replica SIGKILLed mid-stream.
// Its streams move to the other replica with nothing lost or repeated, and its rank processes
// do not outlive it.
TEST_F(TwoReplicasTest, KilledSupervisorMovesItsStreamsAndLeavesNoRankBehind) {
  constexpr int kStreams = 12;
  constexpr int64_t kTokens = 120;
  std::vector<std::vector<int32_t>> alone(kStreams);
  for (int i = 0; i < kStreams; ++i) alone[i] = GemmaGenerate(kTinyMoe, Prompt(i), kTokens);
  const std::vector<pid_t> ranks = cluster_.RankPids(1);
  ASSERT_EQ(ranks.size(), 2u);
  std::vector<StreamResult> results;
  std::vector<std::thread> threads;
  StartStreams(cluster_, kStreams, kTokens, &results, &threads);
  cluster_.worker(1).Kill();
  const Clock::time_point killed_at = Clock::now();
  for (std::thread& t : threads) t.join();
  LOG(INFO) << "killed supervisor: all " << kStreams << " streams done "
            << std::chrono::duration_cast<milliseconds>(Clock::now() - killed_at).count()
            << " ms after the kill; " << cluster_.Status().requests_requeued() << " requeued";
  for (int i = 0; i < kStreams; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
    EXPECT_EQ(results[i].ids, alone[i]) << "stream " << i << ": lost or repeated tokens";
  }
  const Clock::time_point deadline = Clock::now() + seconds(10);
  for (pid_t pid : ranks) {
    while (!ProcessGone(pid) && Clock::now() < deadline) std::this_thread::sleep_for(milliseconds(20));
    EXPECT_TRUE(ProcessGone(pid)) << "rank process " << pid << " outlived its supervisor";
  }
}

// A replica frozen (SIGSTOP on its supervisor and ranks) mid-stream: its heartbeats stop, it is
// marked unhealthy within the heartbeat timeout, and its streams move on with nothing lost or
// repeated; resumed (SIGCONT), it registers again and serves.
TEST_F(TwoReplicasTest, FrozenReplicaIsMovedOffAndRejoinsWhenResumed) {
  constexpr int kStreams = 12;
  constexpr int64_t kTokens = 120;
  std::vector<std::vector<int32_t>> alone(kStreams);
  for (int i = 0; i < kStreams; ++i) alone[i] = GemmaGenerate(kTinyMoe, Prompt(i), kTokens);
  std::vector<pid_t> frozen = cluster_.RankPids(1);
  frozen.push_back(cluster_.worker(1).pid());
  const std::string frozen_address = FindReplica(cluster_.Status(), 2)->address();
  std::vector<StreamResult> results;
  std::vector<std::thread> threads;
  StartStreams(cluster_, kStreams, kTokens, &results, &threads);
  for (pid_t pid : frozen) ASSERT_EQ(kill(pid, SIGSTOP), 0);
  const Clock::time_point frozen_at = Clock::now();
  EXPECT_TRUE(WaitUnhealthy(cluster_, frozen_address, frozen_at + seconds(10)));
  const auto detected = std::chrono::duration_cast<milliseconds>(Clock::now() - frozen_at);
  EXPECT_LE(detected, milliseconds(1500 + 1000)) << "heartbeat timeout 1500 ms";
  for (std::thread& t : threads) t.join();
  const auto done = std::chrono::duration_cast<milliseconds>(Clock::now() - frozen_at);
  LOG(INFO) << "frozen replica: unhealthy after " << detected.count() << " ms; all " << kStreams
            << " streams done " << done.count() << " ms after the freeze; "
            << cluster_.Status().requests_requeued() << " requeued";
  // Moved when the heartbeats stopped, not when the 60 s stall watchdog gave up on them.
  EXPECT_LT(done, seconds(30));
  for (pid_t pid : frozen) kill(pid, SIGCONT);
  for (int i = 0; i < kStreams; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
    EXPECT_EQ(results[i].ids, alone[i]) << "stream " << i << ": lost or repeated tokens";
  }
  ASSERT_TRUE(cluster_.WaitHealthy(2, Clock::now() + seconds(30)))
      << cluster_.Log("worker1") << cluster_.Log("coordinator");
  // It serves again: with the other replica gone, a request can only go to it.
  cluster_.worker(0).Kill();
  StreamResult after = Generate(cluster_.inference(), TokenRequest(Prompt(3), kTokens));
  ASSERT_TRUE(after.status.ok()) << after.status.error_message() << cluster_.Log("coordinator");
  EXPECT_EQ(after.ids, alone[3]);
}

TEST(ReplicaCancelTest, CancelledStreamFreesItsPages) {
  Cluster cluster("cancel");
  std::string error;
  ASSERT_TRUE(cluster.StartCoordinator({}, &error)) << error;
  cluster.StartWorker(kTinyMoe, {"--heartbeat-ms", "50"});
  ASSERT_TRUE(cluster.WaitHealthy(1, Clock::now() + seconds(60))) << cluster.Log("worker0");
  auto pages_used = [&] {
    int64_t used = 0;
    const v1::GetStatusResponse status = cluster.Status();
    for (const v1::KvPoolUsage& pool : status.replicas(0).kv_pools()) {
      used += pool.pages_used();
    }
    return used;
  };
  ASSERT_EQ(pages_used(), 0);

  grpc::ClientContext context;
  context.set_deadline(In(seconds(60)));
  // Greedy from this prompt runs past 3000 tokens without an end id.
  auto reader = cluster.inference().Generate(&context, TokenRequest({2, 17, 301}, 3000));
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  // The heartbeat brings the pages in use to the status.
  const Clock::time_point deadline = Clock::now() + seconds(10);
  while (pages_used() == 0 && Clock::now() < deadline) {
    std::this_thread::sleep_for(milliseconds(20));
  }
  ASSERT_GT(pages_used(), 0);
  context.TryCancel();
  while (reader->Read(&response)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  const Clock::time_point freed_by = Clock::now() + seconds(10);
  while (pages_used() > 0 && Clock::now() < freed_by) {
    std::this_thread::sleep_for(milliseconds(20));
  }
  EXPECT_EQ(pages_used(), 0);
}

}  // namespace
}  // namespace gemma::testing::cluster
