// The coordinator runs the cluster: two models from one --models file served by workers started
// without a model (each assigned one), requests routed by model name with each output equal to
// gemma-generate on that model, an unknown model refused naming the served ones, a worker with
// nothing to do listed as free; and scaling under a steady stream of requests (a replica added,
// one drained with gemmactl drain, one stopped with SIGTERM) with zero failed requests.
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
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
  const int length = 4 + static_cast<int>(rng() % 16);
  while (static_cast<int>(tokens.size()) < length) tokens.push_back(5 + rng() % 500);
  return tokens;
}

gemma::v1::GenerateRequest ModelRequest(const std::string& model,
                                        const std::vector<int32_t>& prompt, int64_t max_tokens) {
  gemma::v1::GenerateRequest request = TokenRequest(prompt, max_tokens);
  request.set_model(model);
  return request;
}

TEST(ModelsTest, WorkersWithoutAModelAreAssignedAndRequestsReachTheirModel) {
  Cluster cluster("models");
  const std::string spec = WriteFile(
      cluster.dir() + "/models.json",
      absl::StrCat(R"({"models": [
        {"name": "dense", "path": ")", kTinyDense, R"(", "replicas": {"min": 1, "max": 1}},
        {"name": "moe", "path": ")", kTinyMoe, R"(", "replicas": {"min": 1, "max": 1}}]})"));
  std::string error;
  ASSERT_TRUE(cluster.StartCoordinator({"--models", spec}, &error)) << error;
  // No --model: each asks the coordinator, which gives each model its replica.
  cluster.StartWorker("", {"--cpu-ranks", "1"});
  cluster.StartWorker("", {"--cpu-ranks", "1"});
  ASSERT_TRUE(cluster.WaitHealthy(2, Clock::now() + seconds(60)))
      << cluster.Log("coordinator") << cluster.Log("worker0") << cluster.Log("worker1");
  for (uint32_t i = 0; i < 4; ++i) {
    const std::vector<int32_t> prompt = Prompt(40 + i);
    for (const auto& [model, dir] : {std::pair<std::string, std::string>{"dense", kTinyDense},
                                     {"moe", kTinyMoe}}) {
      StreamResult r = Generate(cluster.inference(), ModelRequest(model, prompt, 12));
      ASSERT_TRUE(r.status.ok()) << model << ": " << r.status.error_message();
      EXPECT_EQ(r.ids, GemmaGenerate(dir, prompt, 12)) << model << " prompt " << i;
    }
    // No model named: the first of --models.
    StreamResult r = Generate(cluster.inference(), TokenRequest(prompt, 12));
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.ids, GemmaGenerate(kTinyDense, prompt, 12));
  }
  StreamResult unknown = Generate(cluster.inference(), ModelRequest("llama", Prompt(1), 4));
  EXPECT_EQ(unknown.status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(absl::StrContains(unknown.status.error_message(), "served: dense, moe"))
      << unknown.status.error_message();

  // Both models are at their max: a third worker waits, listed as free.
  cluster.StartWorker("", {"--cpu-ranks", "1"});
  ASSERT_TRUE(PollUntil([&] { return cluster.Status().free_workers_size() == 1; },
                        milliseconds(15000)))
      << cluster.Log("worker2");
  ToolRun status = RunWithStdin(
      {"gemmactl", "--coordinator", cluster.coordinator_address(), "status"}, "");
  EXPECT_EQ(status.exit_code, 0) << status.err;
  EXPECT_TRUE(absl::StrContains(status.out, "model dense: 1 replica (wants 1..1")) << status.out;
  EXPECT_TRUE(absl::StrContains(status.out, "model moe: 1 replica (wants 1..1")) << status.out;
  EXPECT_TRUE(absl::StrContains(status.out, "waiting for a model")) << status.out;
  EXPECT_TRUE(absl::StrContains(cluster.Log("worker2"), "no model needs this worker now"))
      << cluster.Log("worker2");
  // gemmactl names the model too.
  ToolRun moe = RunWithStdin({"gemmactl", "--coordinator", cluster.coordinator_address(),
                              "generate", "--tokens", "2,17,301", "--max-tokens", "6", "--model",
                              "moe"},
                             "");
  EXPECT_EQ(moe.exit_code, 0) << moe.err;
  // One replica of "moe" leaves (drained); the free worker takes its place.
  std::string moe_id;
  const gemma::v1::GetStatusResponse before = cluster.Status();
  for (const auto& r : before.replicas()) {
    if (r.model() == "moe") moe_id = r.id();
  }
  ASSERT_FALSE(moe_id.empty());
  ToolRun drain = RunWithStdin(
      {"gemmactl", "--coordinator", cluster.coordinator_address(), "drain", moe_id}, "");
  EXPECT_EQ(drain.exit_code, 0) << drain.err;
  EXPECT_TRUE(PollUntil(
      [&] {
        const auto s = cluster.Status();
        for (const auto& r : s.replicas()) {
          if (r.model() == "moe" && r.id() != moe_id && r.healthy()) return true;
        }
        return false;
      },
      milliseconds(60000)))
      << cluster.Log("coordinator") << cluster.Log("worker2");
  StreamResult again = Generate(cluster.inference(), ModelRequest("moe", Prompt(7), 8));
  ASSERT_TRUE(again.status.ok()) << again.status.error_message();
  EXPECT_EQ(again.ids, GemmaGenerate(kTinyMoe, Prompt(7), 8));
}

TEST(ModelsTest, ModelsFileErrorsNameTheField) {
  Cluster cluster("models_errors");
  const std::string spec = WriteFile(
      cluster.dir() + "/models.json",
      R"({"models": [{"name": "a", "path": "/x", "layout": {"mode": "tp", "rank": 2}}]})");
  ToolRun run = RunWithStdin({"gemma-coordinator", "--listen", "127.0.0.1:0", "--insecure",
                              "--models", spec},
                             "", seconds(10));
  EXPECT_NE(run.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(run.err, "models[0].layout.rank: unknown field")) << run.err;
}

TEST(ScalingTest, ScaleUpDrainAndSigtermUnderSteadyTrafficFailNothing) {
  Cluster cluster("scaling");
  std::string error;
  ASSERT_TRUE(cluster.StartCoordinator({}, &error)) << error;
  const int a = cluster.StartWorker(kTinyMoe, {"--drain-grace-s", "30"});
  ASSERT_TRUE(cluster.WaitHealthy(1, Clock::now() + seconds(30))) << cluster.Log("worker0");
  const std::string a_id = cluster.Status().replicas(0).id();
  std::vector<std::vector<int32_t>> prompts, expected;
  for (uint32_t i = 0; i < 8; ++i) {
    prompts.push_back(Prompt(200 + i));
    expected.push_back(GemmaGenerate(kTinyMoe, prompts.back(), 16));
  }
  std::atomic<bool> stop{false};
  std::atomic<int> done{0}, failed{0}, wrong{0};
  std::vector<std::thread> clients;
  ThreadJoiner joiner([&] { stop.store(true); }, &clients);
  for (int c = 0; c < 4; ++c) {
    clients.emplace_back([&, c] {
      for (int n = 0; !stop.load(); ++n) {
        const int p = (c + n) % 8;
        StreamResult r = Generate(cluster.inference(), TokenRequest(prompts[p], 16));
        if (!r.status.ok()) {
          ++failed;
          ADD_FAILURE() << "client " << c << ": " << r.status.error_message();
        } else if (r.ids != expected[p]) {
          ++wrong;
        }
        ++done;
      }
    });
  }
  auto wait_done = [&](int more) {
    const int target = done.load() + more;
    PollUntil([&] { return done.load() >= target; }, milliseconds(30000));
  };
  wait_done(8);
  // Scale up: a second replica joins while requests stream and takes traffic.
  const int b = cluster.StartWorker(kTinyMoe, {"--drain-grace-s", "30"});
  ASSERT_TRUE(cluster.WaitHealthy(2, Clock::now() + seconds(30))) << cluster.Log("worker1");
  // A replica that takes requests: healthy, not draining, not one of `old`.
  auto serving_other_than = [&](const std::vector<std::string>& old) {
    const gemma::v1::GetStatusResponse status = cluster.Status();
    for (const auto& r : status.replicas()) {
      if (r.healthy() && !r.draining() &&
          std::find(old.begin(), old.end(), r.id()) == old.end()) {
        return r.id();
      }
    }
    return std::string();
  };
  const std::string b_id = serving_other_than({a_id});
  ASSERT_FALSE(b_id.empty());
  wait_done(8);
  // Drain the first: it takes nothing new, finishes what it has, and its worker leaves cleanly.
  ToolRun drain = RunWithStdin(
      {"gemmactl", "--coordinator", cluster.coordinator_address(), "drain", a_id}, "");
  EXPECT_EQ(drain.exit_code, 0) << drain.err;
  EXPECT_TRUE(absl::StrContains(drain.out, "draining " + a_id)) << drain.out;
  EXPECT_EQ(cluster.worker(a).WaitForExitCode(milliseconds(40000)), 0) << cluster.Log("worker0");
  wait_done(8);
  // Another joins, and SIGTERM on the second drains it the same way.
  cluster.StartWorker(kTinyMoe, {});
  ASSERT_TRUE(PollUntil([&] { return !serving_other_than({a_id, b_id}).empty(); },
                        milliseconds(30000)))
      << cluster.Log("worker2");
  wait_done(8);
  cluster.worker(b).Signal(SIGTERM);
  EXPECT_EQ(cluster.worker(b).WaitForExitCode(milliseconds(40000)), 0) << cluster.Log("worker1");
  wait_done(8);
  stop.store(true);
  for (std::thread& t : clients) t.join();
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_GE(done.load(), 40);
  EXPECT_TRUE(absl::StrContains(cluster.Log("worker0"), "draining (the coordinator asked)"))
      << cluster.Log("worker0");
  EXPECT_TRUE(absl::StrContains(cluster.Log("worker1"), "draining")) << cluster.Log("worker1");
}

}  // namespace
}  // namespace gemma::testing::cluster
