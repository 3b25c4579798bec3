// The coordinator runs the cluster: two models from one --models file served by workers started
// without a model (each assigned one), requests routed by model name with each output equal to
// gemma-generate on that model, an unknown model refused naming the served ones, a worker with
// nothing to do listed as free; and scaling under a steady stream of requests (a replica added,
// one drained with gemmactl drain, one stopped with SIGTERM) with zero failed requests.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "google/protobuf/util/json_util.h"
#include "gtest/gtest.h"
#include "httplib.h"
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
  // The spec in YAML (ModelsFileErrorsNameTheField and the unit tests cover JSON).
  const std::string spec = WriteFile(
      cluster.dir() + "/models.yaml",
      absl::StrCat("models:\n  - name: dense\n    path: ", kTinyDense,
                   "\n    replicas: {min: 1, max: 1}\n  - name: moe\n    path: ", kTinyMoe,
                   "\n    layout:\n      mode: tp\n      ranks: 1\n"
                   "    replicas: {min: 1, max: 1}\n"));
  std::string error;
  const std::string http = absl::StrCat("127.0.0.1:", FreeLocalPort());
  ASSERT_TRUE(cluster.StartCoordinator({"--models", spec, "--http-listen", http}, &error))
      << error;
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

  // The official OpenAI client sees both models, and each completion comes from its model.
  const std::vector<int32_t> prompt = Prompt(40);
  std::string prompt_list;
  for (int32_t id : prompt) absl::StrAppend(&prompt_list, prompt_list.empty() ? "" : ",", id);
  const std::string script = WriteFile(cluster.dir() + "/models.py", R"(
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="-", max_retries=0)
print("models", sorted(m.id for m in client.models.list().data))
prompt = [int(x) for x in sys.argv[2].split(",")]
for model in ("dense", "moe"):
    done = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    print("text", model, repr(done.choices[0].text), done.model)
try:
    client.completions.create(model="llama", prompt=prompt, max_tokens=2)
except openai.NotFoundError as error:
    print("not found", error.message)
)");
  ToolRun client = RunWithStdin(
      {GEMMA_TEST_PYTHON, script, absl::StrCat("http://", http, "/v1"), prompt_list}, "",
      seconds(60));
  ASSERT_EQ(client.exit_code, 0) << client.out << client.err;
  EXPECT_TRUE(absl::StrContains(client.out, "models ['dense', 'moe']")) << client.out;
  for (const std::string model : {"dense", "moe"}) {
    gemma::v1::GenerateRequest request = ModelRequest(model, prompt, 12);
    request.set_skip_special_tokens(true);  // as the OpenAI API's text is by default
    StreamResult r = Generate(cluster.inference(), request);
    ASSERT_TRUE(r.status.ok());
    ASSERT_FALSE(r.text.empty());
    std::string quoted;
    for (char c : r.text) {
      if (c == '\'' || c == '\\') quoted += '\\';
      quoted += c;
    }
    // Python's repr of the text; the plain-quote form covers the tiny vocabulary's pieces.
    EXPECT_TRUE(absl::StrContains(client.out, "text " + model + " '" + quoted + "' " + model) ||
                absl::StrContains(client.out, "text " + model + " \"" + r.text + "\" " + model))
        << model << ": " << r.text << "\n" << client.out;
  }
  EXPECT_TRUE(absl::StrContains(client.out, "not found")) << client.out;
  EXPECT_TRUE(absl::StrContains(client.out, "this server serves `dense`, `moe`")) << client.out;

  // Metrics per model (vLLM's model_name label): 4 requests named each model and 4 more the
  // default (dense), then one of each from the OpenAI client and one over gRPC; every replica
  // healthy.
  const size_t colon = http.rfind(':');
  httplib::Client scraper(http.substr(0, colon), std::stoi(http.substr(colon + 1)));
  auto scraped = scraper.Get("/metrics");
  ASSERT_TRUE(scraped && scraped->status == 200);
  auto value = [&](const std::string& family, const std::vector<std::string>& labels) {
    double sum = 0;
    for (absl::string_view line : absl::StrSplit(scraped->body, '\n')) {
      if (!absl::StartsWith(line, family + "{")) continue;
      bool all = true;
      for (const std::string& label : labels) all = all && absl::StrContains(line, label);
      double v = 0;
      if (all && absl::SimpleAtod(line.substr(line.rfind(' ') + 1), &v)) sum += v;
    }
    return sum;
  };
  EXPECT_EQ(value("gemma:request_success_total", {"model_name=\"dense\""}), 10) << scraped->body;
  EXPECT_EQ(value("gemma:request_success_total", {"model_name=\"moe\""}), 6) << scraped->body;
  EXPECT_EQ(value("gemma:generation_tokens_total", {"model_name=\"moe\""}), 6 * 12);
  EXPECT_EQ(value("gemma:time_to_first_token_seconds_count", {"model_name=\"dense\""}), 10);
  EXPECT_EQ(value("gemma:replicas", {"model_name=\"moe\"", "state=\"healthy\""}), 1);
  EXPECT_EQ(value("gemma:replicas", {"model_name=\"dense\"", "state=\"healthy\""}), 1);

  // The expert view per model: the MoE model's routing (16 experts), only its replica; the
  // dense model has none; an unknown model is named with the models served.
  auto experts = [&](const std::string& model) {
    return RunWithStdin({"gemmactl", "--coordinator", cluster.coordinator_address(), "experts",
                         "--json", "--model", model},
                        "");
  };
  gemma::v1::GetExpertLoadResponse moe_load;
  ASSERT_TRUE(PollUntil(
      [&] {
        ToolRun run = experts("moe");
        return run.exit_code == 0 &&
               google::protobuf::util::JsonStringToMessage(run.out, &moe_load).ok() &&
               moe_load.totals().counts_size() > 0;
      },
      milliseconds(15000)));
  EXPECT_EQ(moe_load.model(), "moe");
  EXPECT_EQ(moe_load.totals().num_experts(), 16);
  ASSERT_EQ(moe_load.replicas_size(), 1);
  EXPECT_EQ(moe_load.replicas(0).model(), "moe");
  ToolRun dense_load = experts("dense");
  EXPECT_EQ(dense_load.exit_code, 0) << dense_load.err;
  gemma::v1::GetExpertLoadResponse dense;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(dense_load.out, &dense).ok());
  EXPECT_EQ(dense.totals().counts_size(), 0);
  ASSERT_EQ(dense.replicas_size(), 1);
  EXPECT_EQ(dense.replicas(0).model(), "dense");
  // The expert series are the MoE model's, labelled with it, although the default model is
  // the dense one: one balancedness per layer of moe, none for dense or its replica.
  scraped = scraper.Get("/metrics");
  ASSERT_TRUE(scraped && scraped->status == 200);
  const int moe_layers = moe_load.totals().num_layers();
  ASSERT_GT(moe_layers, 0);
  int moe_balancedness = 0;
  for (absl::string_view line : absl::StrSplit(scraped->body, '\n')) {
    if (!absl::StartsWith(line, "gemma:expert_")) continue;
    EXPECT_TRUE(absl::StrContains(line, "model_name=\"moe\"")) << line;
    if (absl::StartsWith(line, "gemma:expert_balancedness{")) ++moe_balancedness;
  }
  EXPECT_EQ(moe_balancedness, moe_layers) << scraped->body;
  EXPECT_GT(value("gemma:expert_routed_tokens_total", {"model_name=\"moe\""}), 0)
      << scraped->body;
  ToolRun unknown_load = experts("llama");
  EXPECT_EQ(unknown_load.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(unknown_load.err, "served: dense, moe")) << unknown_load.err;

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
  EXPECT_TRUE(absl::StrContains(status.out, " GiB, waiting for a model")) << status.out;
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
  // The drained replica, gone from the registry, takes its expert series along (each worker
  // restart is a new replica id: they would pile up).
  ASSERT_TRUE(PollUntil(
      [&] {
        const gemma::v1::GetStatusResponse now = cluster.Status();
        for (const auto& r : now.replicas()) {
          if (r.id() == moe_id) return false;
        }
        return true;
      },
      milliseconds(15000)));
  scraped = scraper.Get("/metrics");
  ASSERT_TRUE(scraped && scraped->status == 200);
  EXPECT_FALSE(absl::StrContains(scraped->body, "replica=\"" + moe_id + "\"")) << scraped->body;
}

// A model whose replica spans two workers (layout nodes: 2): two workers started without
// --model are assigned node 0 and node 1 of the same replica, which forms across them (tp=2,
// one rank on each) and serves output equal to gemma-generate; a third worker waits.
TEST(ModelsTest, AReplicaOfTwoWorkersFormsFromWorkersWithoutAModel) {
  Cluster cluster("models_nodes");
  const std::string spec = WriteFile(
      cluster.dir() + "/models.yaml",
      absl::StrCat("models:\n  - name: moe\n    path: ", kTinyMoe,
                   "\n    layout: {mode: tp, ranks: 1, nodes: 2}\n"
                   "    replicas: {min: 1, max: 1}\n"));
  std::string error;
  ASSERT_TRUE(cluster.StartCoordinator({"--models", spec}, &error)) << error;
  cluster.StartWorker("", {"--cpu-ranks", "1"});
  cluster.StartWorker("", {"--cpu-ranks", "1"});
  ASSERT_TRUE(cluster.WaitHealthy(1, Clock::now() + seconds(60)))
      << cluster.Log("coordinator") << cluster.Log("worker0") << cluster.Log("worker1");
  const gemma::v1::GetStatusResponse status = cluster.Status();
  ASSERT_EQ(status.replicas_size(), 1);
  EXPECT_EQ(status.replicas(0).world_size(), 2);
  EXPECT_EQ(status.replicas(0).model(), "moe");
  EXPECT_TRUE(absl::StrContains(cluster.Log("coordinator"), "assigned node 1 of 2 of replica moe-1"))
      << cluster.Log("coordinator");
  for (uint32_t i = 0; i < 3; ++i) {
    const std::vector<int32_t> prompt = Prompt(60 + i);
    StreamResult r = Generate(cluster.inference(), ModelRequest("moe", prompt, 12));
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.ids, GemmaGenerate(kTinyMoe, prompt, 12));
  }
  cluster.StartWorker("", {"--cpu-ranks", "1"});
  EXPECT_TRUE(PollUntil([&] { return cluster.Status().free_workers_size() == 1; },
                        milliseconds(15000)))
      << cluster.Log("worker2");
  cluster.Stop(milliseconds(10000));
}

// A memory cgroup of `bytes` for the processes written to its cgroup.procs (v2, or v1's memory
// hierarchy); empty, with the reason in *why, where this machine cannot make one (not root, no
// memory controller).
std::string MakeMemoryCgroup(const std::string& name, int64_t bytes, std::string* why) {
  namespace fs = std::filesystem;
  std::string dir, limit_file;
  std::error_code error;
  if (fs::exists("/sys/fs/cgroup/cgroup.controllers")) {
    std::ofstream("/sys/fs/cgroup/cgroup.subtree_control") << "+memory";
    dir = "/sys/fs/cgroup/" + name;
    limit_file = "memory.max";
  } else if (fs::exists("/sys/fs/cgroup/memory/memory.limit_in_bytes")) {
    dir = "/sys/fs/cgroup/memory/" + name;
    limit_file = "memory.limit_in_bytes";
  } else {
    *why = "no cgroup memory controller mounted";
    return "";
  }
  if (!fs::create_directory(dir, error) && !fs::exists(dir)) {
    *why = absl::StrCat("cannot make ", dir, ": ", error.message(), " (root needed)");
    return "";
  }
  std::ofstream limit(dir + "/" + limit_file);
  limit << bytes;
  limit.close();
  if (!limit || !fs::exists(dir + "/" + limit_file)) {
    *why = absl::StrCat("cannot set ", dir, "/", limit_file);
    return "";
  }
  return dir;
}

// A worker in a container (a memory cgroup of 512 MiB on a machine with far more) is assigned a
// model whose weights (a 1 GiB sparse file) do not fit its limit: it measures what its cgroup
// lets it hold, not the machine's memory, turns the model down, and the coordinator gives it
// the model that fits at once, without waiting out the assignment.
TEST(ModelsTest, AWorkerTurnsDownAModelItsCgroupCannotHoldAndGetsOneThatFits) {
  Cluster cluster("models_cgroup");
  std::string why;
  const std::string cgroup =
      MakeMemoryCgroup(absl::StrCat("gemma-test-", getpid()), int64_t{512} << 20, &why);
  if (cgroup.empty()) GTEST_SKIP() << "memory cgroup test skipped: " << why;
  // Some hosts let a cgroup be made but no process join it (cgroup v2 inside a container).
  ToolRun probe = RunWithStdin({"/bin/sh", "-c", absl::StrCat("echo $$ > ", cgroup, "/cgroup.procs")},
                               "");
  if (probe.exit_code != 0) {
    std::filesystem::remove(cgroup);
    GTEST_SKIP() << "memory cgroup test skipped: no process may join " << cgroup << ": "
                 << probe.err;
  }
  const std::string huge = cluster.dir() + "/huge";
  std::filesystem::create_directories(huge);
  std::filesystem::copy_file(kTinyMoe + "/config.json", huge + "/config.json");
  std::filesystem::resize_file(WriteFile(huge + "/model.safetensors", ""), int64_t{1} << 30);
  const std::string spec = WriteFile(
      cluster.dir() + "/models.yaml",
      absl::StrCat("models:\n"
                   "  - name: huge\n    path: ", huge,
                   "\n    layout: {mode: tp, ranks: 1}\n    replicas: {min: 1, max: 1}\n"
                   "  - name: moe\n    path: ", kTinyMoe,
                   "\n    layout: {mode: tp, ranks: 1}\n    replicas: {min: 1, max: 1}\n"));
  std::string error;
  ASSERT_TRUE(cluster.StartCoordinator({"--models", spec}, &error)) << error;
  const std::string log = cluster.dir() + "/worker.log";
  {
    ChildProcess worker({"/bin/sh", "-c",
                         absl::StrCat("echo $$ > ", cgroup, "/cgroup.procs && exec ", kBin,
                                      "gemma-worker --coordinator ", cluster.coordinator_address(),
                                      " --cpu-ranks 1 --threads 1")},
                        log);
    EXPECT_TRUE(cluster.WaitHealthy(1, Clock::now() + seconds(60)))
        << ReadFileToString(log) << cluster.Log("coordinator");
    const gemma::v1::GetStatusResponse status = cluster.Status();
    ASSERT_EQ(status.replicas_size(), 1);
    EXPECT_EQ(status.replicas(0).model(), "moe");
    const std::string text = ReadFileToString(log);
    EXPECT_TRUE(absl::StrContains(text, "assigned model huge, whose weights need 1.0 GiB on this "
                                        "worker, but 0."))
        << text;
    EXPECT_TRUE(absl::StrContains(cluster.Log("coordinator"), "turned down model huge"))
        << cluster.Log("coordinator");
    worker.Signal(SIGTERM);
    worker.WaitForExitCode(seconds(30));
  }
  cluster.Stop(milliseconds(10000));
  std::filesystem::remove(cgroup);
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

// SIGTERM to a worker's whole process group (kill -- -PGID, systemd's default KillMode)
// reaches its rank processes directly as well as through the supervisor: that is still one
// drain, not the "second SIGTERM" that leaves at once, so the replica drains, tells the
// coordinator it left and exits 0.
TEST(ScalingTest, SigtermToTheWholeProcessGroupStillDrainsAndLeaves) {
  Cluster cluster("group_sigterm");
  std::string error;
  ASSERT_TRUE(cluster.StartCoordinator({}, &error)) << error;
  const int w = cluster.StartWorker(kTinyMoe, {"--cpu-ranks", "2"});
  ASSERT_TRUE(cluster.WaitHealthy(1, Clock::now() + seconds(30))) << cluster.Log("worker0");
  const pid_t supervisor = cluster.worker(w).pid();
  std::vector<pid_t> group = {supervisor};
  std::ifstream children(absl::StrCat("/proc/", supervisor, "/task/", supervisor, "/children"));
  for (pid_t child; children >> child;) group.push_back(child);
  ASSERT_EQ(group.size(), 3u) << "the supervisor and its two rank processes";
  for (pid_t pid : group) kill(pid, SIGTERM);  // as a group kill delivers it
  EXPECT_EQ(cluster.worker(w).WaitForExitCode(milliseconds(40000)), 0) << cluster.Log("worker0");
  EXPECT_TRUE(absl::StrContains(cluster.Log("coordinator"), "drained and left"))
      << cluster.Log("coordinator");
  EXPECT_EQ(cluster.Status().replicas_size(), 0) << "the replica is still listed";
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
  // It said so as it left: the coordinator no longer lists it (rather than showing it
  // unhealthy until its missed heartbeats make it forgotten, a minute later).
  auto listed = [&](const std::string& id) {
    const gemma::v1::GetStatusResponse status = cluster.Status();
    for (const auto& r : status.replicas()) {
      if (r.id() == id) return true;
    }
    return false;
  };
  EXPECT_FALSE(listed(a_id)) << "a drained replica is still listed";
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
