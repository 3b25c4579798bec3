// Expert load counted by the real cluster equals the model's own routing: known prompts (their
// chosen experts recorded by transformers in the golden MoE fixture) sent through a
// single-rank, a tp=2 and a dp-ep replica; the per-expert counts of GetExpertLoad, the per-rank
// counts of /metrics and what WatchExpertLoad streams must equal the fixture's, token for token.
// gemmactl experts --json shows the same totals and --record appends the windows it watches.
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/npy.h"
#include "google/protobuf/util/json_util.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "nlohmann/json.hpp"
#include "tests/cluster/cluster_harness.h"

namespace gemma::testing::cluster {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

// Prompts of the fixture whose expert choices are far from ties (min_expert_margin >= 0.04), so
// every layout routes them the same way.
const std::vector<std::string> kPrompts = {"p1", "p3"};

struct Expected {
  int layers = 0, experts = 0;
  std::vector<std::vector<int32_t>> prompts;  // token ids
  std::vector<int64_t> counts;                // [layers * experts]
  int64_t routed = 0;
};

Expected LoadExpected() {
  Expected out;
  const nlohmann::json manifest = nlohmann::json::parse(
      ReadFileToString(kTinyMoe + "/../reference/tiny-moe/manifest.json"));
  const nlohmann::json config =
      nlohmann::json::parse(ReadFileToString(kTinyMoe + "/config.json"))["text_config"];
  out.layers = config["num_hidden_layers"];
  out.experts = config["num_experts"];
  out.counts.assign(static_cast<size_t>(out.layers) * out.experts, 0);
  for (const auto& prompt : manifest["prompts"]) {
    const std::string name = prompt["name"];
    if (std::find(kPrompts.begin(), kPrompts.end(), name) == kPrompts.end()) continue;
    EXPECT_GE(prompt["min_expert_margin"].get<double>(), 0.04) << name;
    out.prompts.push_back(prompt["tokens"].get<std::vector<int32_t>>());
    auto experts = ReadNpy(kTinyMoe + "/../reference/tiny-moe/" +
                           prompt["experts"].get<std::string>());
    EXPECT_TRUE(experts.ok()) << experts.status();
    if (!experts.ok()) continue;
    // [layers, tokens, top_k]
    const std::vector<int64_t> ids = experts->AsInt64();
    const int64_t per_layer = experts->shape[1] * experts->shape[2];
    for (int l = 0; l < out.layers; ++l) {
      for (int64_t i = 0; i < per_layer; ++i) {
        ++out.counts[l * out.experts + ids[l * per_layer + i]];
        ++out.routed;
      }
    }
  }
  EXPECT_EQ(out.prompts.size(), kPrompts.size());
  return out;
}

int64_t Sum(const gemma::v1::ExpertLoad& load) {
  int64_t sum = 0;
  for (int64_t c : load.counts()) sum += c;
  return sum;
}

struct Layout {
  std::string name;
  std::vector<std::string> flags;
  int ranks;             // expert ranks
  int healthy_entries;   // routing entries it registers (one per dp-ep group)
};

class ExpertLoadTest : public ::testing::TestWithParam<Layout> {
 protected:
  void SetUp() override {
    http_address_ = absl::StrCat("127.0.0.1:", FreeLocalPort());
    std::string error;
    ASSERT_TRUE(cluster_.StartCoordinator({"--http-listen", http_address_}, &error)) << error;
    cluster_.StartWorker(kTinyMoe, GetParam().flags);
    ASSERT_TRUE(cluster_.WaitHealthy(GetParam().healthy_entries, Clock::now() + seconds(30)))
        << cluster_.Log("worker0");
  }
  void TearDown() override { cluster_.Stop(milliseconds(10000)); }

  // The totals once `routed` tokens are in (windows come with the heartbeats).
  gemma::v1::GetExpertLoadResponse WaitRouted(int64_t routed) {
    gemma::v1::GetExpertLoadResponse load;
    PollUntil(
        [&] {
          grpc::ClientContext context;
          load.Clear();
          cluster_.cluster().GetExpertLoad(&context, gemma::v1::GetExpertLoadRequest(), &load);
          return Sum(load.totals()) >= routed;
        },
        milliseconds(15000));
    return load;
  }

  Cluster cluster_{"expert_load"};
  std::string http_address_;
};

TEST_P(ExpertLoadTest, CountsEqualTheFixturesChosenExperts) {
  const Expected expected = LoadExpected();
  // Watch from now on, while the prompts run.
  grpc::ClientContext watch_context;
  watch_context.set_deadline(std::chrono::system_clock::now() + seconds(30));
  auto watch = cluster_.cluster().WatchExpertLoad(&watch_context,
                                                  gemma::v1::WatchExpertLoadRequest());
  for (const auto& prompt : expected.prompts) {
    // One token: the prompt is fed, the sampled token is not.
    StreamResult result = Generate(cluster_.inference(), TokenRequest(prompt, 1));
    ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  }
  const gemma::v1::GetExpertLoadResponse load = WaitRouted(expected.routed);
  const gemma::v1::ExpertLoad& totals = load.totals();
  ASSERT_EQ(totals.num_layers(), expected.layers);
  ASSERT_EQ(totals.num_experts(), expected.experts);
  EXPECT_EQ(totals.expert_ranks(), GetParam().ranks);
  EXPECT_EQ(totals.recomputed_tokens(), 0);
  ASSERT_EQ(totals.counts_size(), static_cast<int>(expected.counts.size()));
  for (int l = 0; l < expected.layers; ++l) {
    for (int e = 0; e < expected.experts; ++e) {
      EXPECT_EQ(totals.counts(l * expected.experts + e), expected.counts[l * expected.experts + e])
          << "layer " << l << " expert " << e;
    }
  }

  // The watch saw the same windows.
  std::vector<int64_t> watched(expected.counts.size(), 0);
  int64_t watched_sum = 0, last_sequence = 0;
  gemma::v1::ExpertLoadWindow window;
  while (watched_sum < expected.routed && watch->Read(&window)) {
    EXPECT_GT(window.window().sequence(), last_sequence);
    last_sequence = window.window().sequence();
    for (int i = 0; i < window.window().counts_size(); ++i) {
      watched[i] += window.window().counts(i);
      watched_sum += window.window().counts(i);
    }
  }
  watch_context.TryCancel();
  EXPECT_EQ(watched, expected.counts);

  // /metrics: tokens per layer, and per rank where the experts are spread over ranks.
  const size_t colon = http_address_.rfind(':');
  httplib::Client http(http_address_.substr(0, colon), std::stoi(http_address_.substr(colon + 1)));
  auto response = http.Get("/metrics");
  ASSERT_TRUE(response);
  std::map<int, double> rank_tokens;
  double layer_tokens = 0;
  const std::regex rank_line(R"re(^gemma:expert_rank_tokens_total\{.*rank="(\d+)".*\} (\S+)$)re");
  const std::regex layer_line(R"re(^gemma:expert_routed_tokens_total\{.*\} (\S+)$)re");
  for (absl::string_view line : absl::StrSplit(response->body, '\n')) {
    std::smatch m;
    const std::string text(line);
    if (std::regex_match(text, m, rank_line)) rank_tokens[std::stoi(m[1])] += std::stod(m[2]);
    if (std::regex_match(text, m, layer_line)) layer_tokens += std::stod(m[1]);
  }
  EXPECT_EQ(layer_tokens, static_cast<double>(expected.routed));
  if (GetParam().ranks > 1) {
    const int per_rank = expected.experts / GetParam().ranks;
    ASSERT_EQ(rank_tokens.size(), static_cast<size_t>(GetParam().ranks)) << response->body;
    for (int r = 0; r < GetParam().ranks; ++r) {
      int64_t want = 0;
      for (int l = 0; l < expected.layers; ++l) {
        for (int e = r * per_rank; e < (r + 1) * per_rank; ++e) {
          want += expected.counts[l * expected.experts + e];
        }
      }
      EXPECT_EQ(rank_tokens[r], static_cast<double>(want)) << "rank " << r;
    }
    EXPECT_NE(response->body.find("gemma:expert_rank_balancedness{"), std::string::npos);
    // Every metric the Grafana dashboard queries is one the coordinator exports.
    const nlohmann::json grafana = nlohmann::json::parse(
        ReadFileToString(std::string(GEMMA_SOURCE_DIR) + "/deploy/grafana/gemma-cluster.json"));
    int queries = 0;
    const std::regex name(R"re(gemma:[a-z0-9_:]+)re");
    std::function<void(const nlohmann::json&)> visit = [&](const nlohmann::json& node) {
      if (node.is_object()) {
        if (node.contains("expr") && node["expr"].is_string()) {
          ++queries;
          const std::string expr = node["expr"];
          for (auto it = std::sregex_iterator(expr.begin(), expr.end(), name);
               it != std::sregex_iterator(); ++it) {
            // The family is the name itself, or a histogram's without its series suffix.
            const std::string series = (*it)[0].str();
            std::string family = series;
            for (const char* suffix : {"_bucket", "_sum", "_count"}) {
              if (absl::EndsWith(family, suffix)) family.resize(family.size() - std::strlen(suffix));
            }
            EXPECT_TRUE(response->body.find("# TYPE " + series + " ") != std::string::npos ||
                        response->body.find("# TYPE " + family + " histogram") !=
                            std::string::npos)
                << series << " (in \"" << expr << "\") is not exported";
          }
        }
        for (const auto& [key, value] : node.items()) visit(value);
      } else if (node.is_array()) {
        for (const auto& value : node) visit(value);
      }
    };
    visit(grafana);
    EXPECT_GE(queries, 15);
    // The dashboard draws the same per-rank load.
    ToolRun page = HeadlessChromium(absl::StrCat("http://", http_address_, "/dashboard"),
                                    {"--dump-dom"});
    ASSERT_EQ(page.exit_code, 0) << page.err;
    EXPECT_EQ(page.err.find("Uncaught"), std::string::npos) << page.err;
    std::map<int, double> drawn;
    const std::regex bar(R"re(data-rank-tokens="[^/"]+/(\d+)">(\d+)<)re");
    for (auto it = std::sregex_iterator(page.out.begin(), page.out.end(), bar);
         it != std::sregex_iterator(); ++it) {
      drawn[std::stoi((*it)[1].str())] += std::stod((*it)[2].str());
    }
    EXPECT_EQ(drawn, rank_tokens) << page.out;
  } else {
    EXPECT_TRUE(rank_tokens.empty()) << response->body;
  }

  // gemmactl shows the same totals.
  ToolRun run = RunWithStdin(
      {"gemmactl", "--coordinator", cluster_.coordinator_address(), "experts", "--json"}, "");
  ASSERT_EQ(run.exit_code, 0) << run.err;
  gemma::v1::GetExpertLoadResponse shown;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(run.out, &shown).ok()) << run.out;
  EXPECT_EQ(std::vector<int64_t>(shown.totals().counts().begin(), shown.totals().counts().end()),
            expected.counts);
  ToolRun table = RunWithStdin(
      {"gemmactl", "--coordinator", cluster_.coordinator_address(), "experts"}, "");
  ASSERT_EQ(table.exit_code, 0) << table.err;
  EXPECT_EQ(table.out.find("\x1b["), std::string::npos) << "colour codes outside a terminal";
  if (GetParam().ranks > 1) {
    EXPECT_NE(table.out.find("rank balance"), std::string::npos) << table.out;
    EXPECT_NE(table.out.find("rank  1"), std::string::npos) << table.out;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, ExpertLoadTest,
    ::testing::Values(Layout{"single", {"--cpu-ranks", "1"}, 1, 1},
                      Layout{"tp2", {"--cpu-ranks", "2"}, 2, 1},
                      Layout{"dpep", {"--cpu-ranks", "2", "--mode", "dp-ep", "--tp", "1"}, 2, 2}),
    [](const ::testing::TestParamInfo<Layout>& info) { return info.param.name; });

// gemmactl experts --record appends each window as a JSON line while it runs.
TEST(ExpertLoadRecordTest, RecordAppendsTheWindowsAsTheyArrive) {
  Cluster cluster("expert_record");
  std::string error;
  ASSERT_TRUE(cluster.StartCoordinator({}, &error)) << error;
  cluster.StartWorker(kTinyMoe, {});
  ASSERT_TRUE(cluster.WaitHealthy(1, Clock::now() + seconds(30))) << cluster.Log("worker0");
  const std::string path = cluster.dir() + "/trace.jsonl";
  ChildProcess recorder({kBin + "gemmactl", "--coordinator", cluster.coordinator_address(),
                         "experts", "--record", path},
                        cluster.dir() + "/recorder.log");
  // The watch starts from now: wait until the recorder is connected before sending.
  ASSERT_TRUE(PollUntil(
      [&] { return ReadFileToString(cluster.dir() + "/recorder.log").find("recording") !=
                   std::string::npos; },
      milliseconds(10000)));
  std::this_thread::sleep_for(milliseconds(300));
  const std::vector<int32_t> prompt = {2, 17, 301, 42, 7};
  ASSERT_TRUE(Generate(cluster.inference(), TokenRequest(prompt, 1)).status.ok());
  const nlohmann::json config =
      nlohmann::json::parse(ReadFileToString(kTinyMoe + "/config.json"))["text_config"];
  const int64_t want = static_cast<int64_t>(prompt.size()) *
                       config["top_k_experts"].get<int64_t>() *
                       config["num_hidden_layers"].get<int64_t>();
  int64_t recorded = 0;
  PollUntil(
      [&] {
        recorded = 0;
        for (absl::string_view line :
             absl::StrSplit(ReadFileToString(path), '\n', absl::SkipEmpty())) {
          gemma::v1::ExpertLoadWindow w;
          if (!google::protobuf::util::JsonStringToMessage(std::string(line), &w).ok()) continue;
          EXPECT_FALSE(w.replica_id().empty());
          recorded += Sum(w.window());
        }
        return recorded >= want;
      },
      milliseconds(15000));
  recorder.Signal(SIGINT);
  EXPECT_EQ(recorded, want) << ReadFileToString(path);
  cluster.Stop(milliseconds(10000));
}

}  // namespace
}  // namespace gemma::testing::cluster
