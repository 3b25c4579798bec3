// gemmactl against a real gemma-coordinator and gemma-worker (tiny-moe with its 512-entry
// tokenizer, single CPU rank) on 127.0.0.1: `chat` driven through piped stdin, and the `status`
// table. Readiness is polled through grpc.health.v1 and Cluster.GetStatus; every wait has a
// deadline.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/npy.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "google/protobuf/util/json_util.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "nlohmann/json.hpp"
#include "tests/cluster/cluster_harness.h"
#include "tests/testing/compare.h"

namespace gemma::testing::cluster {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
namespace v1 = gemma::v1;

// tiny-moe's tokenizer (a function: kTinyMoe is a global of another file).
std::string Tokenizer() { return kTinyMoe + "/tokenizer.json"; }
constexpr int64_t kReplyTokens = 8;

// One model reply of `gemmactl chat --json`: its responses, in order.
struct Turn {
  int num_responses = 0;
  std::vector<int32_t> ids;
  std::string text;
  v1::GenerateFinal final;
};

// Splits `gemmactl chat --json` output (one GenerateResponse per line) into turns at each final.
std::vector<Turn> ParseChatJson(const std::string& out) {
  std::vector<Turn> turns(1);
  for (absl::string_view line : absl::StrSplit(out, '\n', absl::SkipEmpty())) {
    v1::GenerateResponse response;
    const auto status = google::protobuf::util::JsonStringToMessage(std::string(line), &response);
    EXPECT_TRUE(status.ok()) << "not a GenerateResponse: " << line;
    if (!status.ok()) continue;
    Turn& turn = turns.back();
    ++turn.num_responses;
    turn.ids.insert(turn.ids.end(), response.token_ids().begin(), response.token_ids().end());
    turn.text += response.text();
    if (response.has_final()) {
      turn.final = response.final();
      turns.emplace_back();
    }
  }
  turns.pop_back();
  return turns;
}

// The prompt ids of a conversation, rendered and encoded by gemma-tokenize --chat.
std::vector<int32_t> ChatPromptIds(const nlohmann::json& messages) {
  static int counter = 0;
  const std::string path =
      absl::StrCat(::testing::TempDir(), "/chat_", getpid(), "_", counter++, ".json");
  WriteFile(path, nlohmann::json{{"messages", messages}, {"add_generation_prompt", true}}.dump());
  ToolRun run = RunWithStdin({"gemma-tokenize", "--tokenizer", Tokenizer(), "--chat", path}, "");
  EXPECT_EQ(run.exit_code, 0) << run.out << run.err;
  if (run.exit_code != 0) return {};
  return nlohmann::json::parse(run.out)["ids"].get<std::vector<int32_t>>();
}

class GemmactlClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string error;
    http_address_ = absl::StrCat("127.0.0.1:", FreeLocalPort());
    ASSERT_TRUE(cluster_.StartCoordinator({"--http-listen", http_address_}, &error)) << error;
    worker_address_ = absl::StrCat("127.0.0.1:", FreeLocalPort());
    cluster_.StartWorker(kTinyMoe, {"--tokenizer", Tokenizer(), "--listen", worker_address_,
                                    "--replica", "pod-group-0"});
    ASSERT_TRUE(WaitServing(worker_address_, Clock::now() + seconds(20)))
        << cluster_.Log("worker0");
    // The worker serves before it registers: wait until the coordinator routes to it.
    ASSERT_TRUE(cluster_.WaitHealthy(1, Clock::now() + seconds(10))) << cluster_.Log("worker0");
  }

  // SIGTERM first so that a worker with rank processes takes them down with it.
  void TearDown() override { cluster_.Stop(milliseconds(10000)); }

  std::vector<std::string> Gemmactl(std::vector<std::string> args) {
    args.insert(args.begin(), {"gemmactl", "--coordinator", cluster_.coordinator_address()});
    return args;
  }

  Cluster cluster_{"gemmactl_cluster"};
  std::string http_address_;  // the coordinator's HTTP port (/metrics)
  std::string worker_address_;
};

TEST_F(GemmactlClusterTest, ChatSendsTheWholeConversation) {
  const std::string system = "Answer in the words of the King James Bible.";
  const std::string first = "Who created the heaven and the earth?";
  const std::string second = "And what did he say unto Moses?";
  ToolRun run = RunWithStdin(Gemmactl({"chat", "--json", "--system", system, "--max-tokens",
                                       std::to_string(kReplyTokens)}),
                             first + "\n" + second + "\n");
  ASSERT_EQ(run.exit_code, 0) << run.out << run.err;
  std::vector<Turn> turns = ParseChatJson(run.out);
  ASSERT_EQ(turns.size(), 2u) << run.out;

  // The first request is the system message and the first user turn; the second carries the
  // first exchange, with the model's reply as it was streamed.
  nlohmann::json messages = nlohmann::json::array();
  messages.push_back({{"role", "system"}, {"content", system}});
  messages.push_back({{"role", "user"}, {"content", first}});
  std::vector<std::vector<int32_t>> prompts = {ChatPromptIds(messages)};
  messages.push_back({{"role", "model"}, {"content", turns[0].text}});
  messages.push_back({{"role", "user"}, {"content", second}});
  prompts.push_back(ChatPromptIds(messages));
  ASSERT_GT(prompts[1].size(), prompts[0].size());

  for (size_t i = 0; i < turns.size(); ++i) {
    const Turn& turn = turns[i];
    ASSERT_FALSE(turn.ids.empty()) << "turn " << i;
    for (int32_t id : prompts[i]) ASSERT_LT(id, 512) << "turn " << i;
    // Streamed: one response per generated token at least, and text the tokenizer decoded.
    EXPECT_GE(turn.num_responses, static_cast<int>(turn.ids.size())) << "turn " << i;
    EXPECT_EQ(turn.final.generated_tokens(), static_cast<int64_t>(turn.ids.size()));
    if (turn.final.finish_reason() == "max_tokens") {
      EXPECT_FALSE(turn.text.empty()) << "turn " << i;
    }
    // The replica saw exactly the rendered conversation: same length, and a direct greedy
    // generate of those ids gives the same reply.
    EXPECT_EQ(turn.final.prompt_tokens(), static_cast<int64_t>(prompts[i].size())) << "turn " << i;
    StreamResult direct = Generate(cluster_.inference(), TokenRequest(prompts[i], kReplyTokens));
    ASSERT_TRUE(direct.status.ok()) << direct.status.error_message();
    EXPECT_EQ(direct.ids, turn.ids) << "turn " << i;
  }
}

nlohmann::json ReadJsonFile(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << path;
  return nlohmann::json::parse(in);
}

// Expert load through the real cluster equals the routing transformers recorded for the
// golden prompts: each prompt is sent with max_tokens 1 (the replica feeds exactly the prompt),
// and the counts the replica sends in its heartbeats, summed by the coordinator, are the
// histogram of the fixture's chosen experts, in GetExpertLoad and in gemmactl experts --json.
TEST_F(GemmactlClusterTest, ExpertLoadEqualsTheReferenceRouting) {
  std::ifstream in(testing::GoldenPath("reference/tiny-moe/manifest.json"));
  ASSERT_TRUE(in.good());
  const nlohmann::json manifest = nlohmann::json::parse(in);
  std::vector<int64_t> want;
  int64_t layers = 0, experts = 0;
  for (const auto& prompt : manifest["prompts"]) {
    const std::vector<int32_t> tokens = prompt["tokens"].get<std::vector<int32_t>>();
    auto ref = ReadNpy(testing::GoldenPath("reference/tiny-moe/" +
                                           prompt["experts"].get<std::string>()));
    ASSERT_TRUE(ref.ok()) << ref.status();
    ASSERT_EQ(ref->shape.size(), 3u);
    layers = ref->shape[0];
    const int64_t t = ref->shape[1], k = ref->shape[2];
    experts = ReadJsonFile(kTinyMoe + "/config.json")["text_config"]["num_experts"];
    if (want.empty()) want.assign(layers * experts, 0);
    const std::vector<int64_t> ids = ref->AsInt64();
    for (int64_t i = 0; i < static_cast<int64_t>(ids.size()); ++i) {
      ++want[(i / (t * k)) * experts + ids[i]];
    }
    StreamResult result = Generate(cluster_.inference(), TokenRequest(tokens, 1));
    ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  }
  int64_t want_total = 0;
  for (int64_t c : want) want_total += c;

  // Windows arrive with the heartbeats (about once a second).
  v1::GetExpertLoadResponse load;
  const auto deadline = Clock::now() + seconds(15);
  int64_t total = 0;
  while (Clock::now() < deadline) {
    grpc::ClientContext context;
    v1::GetExpertLoadRequest request;
    request.set_include_windows(true);
    ASSERT_TRUE(cluster_.cluster().GetExpertLoad(&context, request, &load).ok());
    total = 0;
    for (int64_t c : load.totals().counts()) total += c;
    if (total >= want_total) break;
    std::this_thread::sleep_for(milliseconds(200));
  }
  ASSERT_EQ(load.totals().num_layers(), layers);
  ASSERT_EQ(load.totals().num_experts(), experts);
  EXPECT_EQ(std::vector<int64_t>(load.totals().counts().begin(), load.totals().counts().end()),
            want);
  ASSERT_EQ(load.replicas_size(), 1);
  EXPECT_GE(load.replicas(0).windows_size(), 1);
  EXPECT_EQ(load.replicas(0).totals().SerializeAsString(), load.totals().SerializeAsString());

  ToolRun json = RunWithStdin(Gemmactl({"experts", "--json"}), "");
  ASSERT_EQ(json.exit_code, 0) << json.err;
  const nlohmann::json parsed = nlohmann::json::parse(json.out);
  std::vector<int64_t> from_tool;
  for (const auto& c : parsed["totals"]["counts"]) from_tool.push_back(std::stoll(c.get<std::string>()));
  EXPECT_EQ(from_tool, want);

  ToolRun text = RunWithStdin(Gemmactl({"experts"}), "");
  ASSERT_EQ(text.exit_code, 0) << text.err;
  EXPECT_NE(text.out.find(absl::StrCat(layers, " layers x ", experts, " experts")),
            std::string::npos)
      << text.out;
  EXPECT_EQ(std::count(text.out.begin(), text.out.end(), '\n'), layers + 2) << text.out;
  ToolRun unknown = RunWithStdin(Gemmactl({"experts", "--replica", "nope"}), "");
  EXPECT_EQ(unknown.exit_code, 1);
  EXPECT_NE(unknown.err.find("no replica \"nope\""), std::string::npos) << unknown.err;
  ToolRun bad_interval = RunWithStdin(Gemmactl({"experts", "--watch", "--interval-ms", "0"}), "");
  EXPECT_EQ(bad_interval.exit_code, 1);
  EXPECT_NE(bad_interval.err.find("--interval-ms must be positive"), std::string::npos)
      << bad_interval.err;
}

// /metrics through a real HTTP client, parsed by the Prometheus project's own Python parser
// (Debian's python3-prometheus-client): every family follows the naming conventions, and the
// values count what the test sent.
TEST_F(GemmactlClusterTest, MetricsParseAndCountTheRequests) {
  const std::vector<int32_t> prompt = {2, 17, 301, 45, 99};
  int64_t generated = 0;
  for (int i = 0; i < 3; ++i) {
    StreamResult result = Generate(cluster_.inference(), TokenRequest(prompt, 4));
    ASSERT_TRUE(result.status.ok()) << result.status.error_message();
    generated += static_cast<int64_t>(result.ids.size());
  }
  // Every fed token (each prompt, and each generated token but a request's last) is routed to
  // top_k experts in every layer. The windows come with the heartbeats: wait for them.
  const nlohmann::json config = ReadJsonFile(kTinyMoe + "/config.json")["text_config"];
  const int64_t layers = config["num_hidden_layers"], top_k = config["top_k_experts"];
  const int64_t fed = 3 * static_cast<int64_t>(prompt.size()) + generated - 3;
  const int64_t want_routed = fed * top_k * layers;
  const auto deadline = Clock::now() + seconds(15);
  int64_t routed = 0;
  while (Clock::now() < deadline && routed < want_routed) {
    grpc::ClientContext context;
    v1::GetExpertLoadResponse load;
    ASSERT_TRUE(cluster_.cluster()
                    .GetExpertLoad(&context, v1::GetExpertLoadRequest(), &load)
                    .ok());
    routed = 0;
    for (int64_t c : load.totals().counts()) routed += c;
    if (routed < want_routed) std::this_thread::sleep_for(milliseconds(200));
  }
  ASSERT_EQ(routed, want_routed);
  // Two refused requests: a bad temperature, and a model not served here (counted without
  // its name: a client's names must not add series).
  v1::GenerateRequest bad = TokenRequest(prompt, 4);
  bad.mutable_sampling()->set_temperature(-1);
  EXPECT_EQ(Generate(cluster_.inference(), bad).status.error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  v1::GenerateRequest unknown = TokenRequest(prompt, 4);
  unknown.set_model("no-such-model");
  EXPECT_EQ(Generate(cluster_.inference(), unknown).status.error_code(),
            grpc::StatusCode::NOT_FOUND);

  const size_t colon = http_address_.rfind(':');
  httplib::Client http(http_address_.substr(0, colon), std::stoi(http_address_.substr(colon + 1)));
  auto response = http.Get("/metrics");
  ASSERT_TRUE(response) << "no answer from " << http_address_;
  ASSERT_EQ(response->status, 200);
  EXPECT_NE(response->get_header_value("Content-Type").find("text/plain"), std::string::npos);
  const std::string text_path = absl::StrCat(::testing::TempDir(), "/metrics_", getpid(), ".txt");
  WriteFile(text_path, response->body);
  // Families as the parser sees them: {name: {"type": ..., "samples": [[name, labels, value]]}}.
  const std::string script_path = absl::StrCat(::testing::TempDir(), "/parse_", getpid(), ".py");
  WriteFile(script_path, R"(
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(open(sys.argv[1]).read()):
    out[family.name] = {"type": family.type,
                        "samples": [[s.name, s.labels, s.value] for s in family.samples]}
print(json.dumps(out))
)");
  ToolRun parsed = RunWithStdin({"/usr/bin/python3", script_path, text_path}, "");
  ASSERT_EQ(parsed.exit_code, 0) << parsed.err << "\n" << response->body;
  const nlohmann::json families = nlohmann::json::parse(parsed.out);
  auto total = [&](const std::string& family, const std::string& sample) {
    double sum = 0;
    for (const auto& s : families.at(family)["samples"]) {
      if (s[0] == sample) sum += s[2].get<double>();
    }
    return sum;
  };
  for (const auto& [name, family] : families.items()) {
    EXPECT_EQ(name.rfind("gemma:", 0), 0u) << name;
    const std::string type = family["type"];
    for (const auto& sample : family["samples"]) {
      const std::string sample_name = sample[0];
      if (type == "counter") {
        EXPECT_TRUE(absl::EndsWith(sample_name, "_total")) << sample_name;
      } else if (type == "histogram") {
        EXPECT_TRUE(absl::EndsWith(name, "_seconds")) << name;
      }
    }
  }
  EXPECT_EQ(families.at("gemma:request_success")["type"], "counter");
  EXPECT_EQ(total("gemma:request_success", "gemma:request_success_total"), 3);
  // vLLM's finish reasons, so that its dashboards' filters find them.
  for (const auto& s : families.at("gemma:request_success")["samples"]) {
    const std::string reason = s[1]["finished_reason"];
    EXPECT_TRUE(reason == "stop" || reason == "length" || reason == "abort") << reason;
  }
  EXPECT_EQ(families.at("gemma:request_failure")["type"], "counter");
  std::map<std::string, double> failures;
  for (const auto& s : families.at("gemma:request_failure")["samples"]) {
    if (s[2].get<double>() == 0) continue;  // the usual reasons are there from the start
    failures[absl::StrCat(s[1].value("model_name", ""), "/", s[1]["reason"].get<std::string>())] +=
        s[2].get<double>();
  }
  EXPECT_EQ(failures, (std::map<std::string, double>{{"/not_found", 1},
                                                     {"gemma-4/invalid_argument", 1}}))
      << response->body;
  EXPECT_EQ(total("gemma:prompt_tokens", "gemma:prompt_tokens_total"), 3.0 * prompt.size());
  EXPECT_EQ(total("gemma:generation_tokens", "gemma:generation_tokens_total"), generated);
  EXPECT_EQ(families.at("gemma:time_to_first_token_seconds")["type"], "histogram");
  EXPECT_EQ(total("gemma:time_to_first_token_seconds", "gemma:time_to_first_token_seconds_count"),
            3);
  EXPECT_EQ(total("gemma:e2e_request_latency_seconds", "gemma:e2e_request_latency_seconds_count"),
            3);
  EXPECT_EQ(total("gemma:inter_token_latency_seconds", "gemma:inter_token_latency_seconds_count"),
            generated - 3);
  EXPECT_EQ(total("gemma:num_requests_running", "gemma:num_requests_running"), 0);
  EXPECT_EQ(families.at("gemma:num_requests_queued")["type"], "gauge");
  EXPECT_EQ(total("gemma:num_requests_queued", "gemma:num_requests_queued"), 0);
  EXPECT_EQ(total("gemma:expert_routed_tokens", "gemma:expert_routed_tokens_total"), routed);
  int balanced_layers = 0;
  for (const auto& s : families.at("gemma:expert_balancedness")["samples"]) {
    EXPECT_GT(s[2].get<double>(), 0.0);
    EXPECT_LE(s[2].get<double>(), 1.0);
    ++balanced_layers;
  }
  EXPECT_EQ(balanced_layers, layers);
  bool healthy_one = false;
  for (const auto& s : families.at("gemma:replicas")["samples"]) {
    if (s[1]["state"] == "healthy") healthy_one = s[2].get<double>() == 1.0;
  }
  EXPECT_TRUE(healthy_one) << response->body;
}

// The sum of the routed-token counts, waiting until the replica's windows reach `at_least`.
int64_t RoutedTokens(Cluster& cluster, int64_t at_least, v1::GetExpertLoadResponse* load) {
  const auto deadline = Clock::now() + seconds(15);
  int64_t routed = 0;
  while (true) {
    grpc::ClientContext context;
    EXPECT_TRUE(cluster.cluster().GetExpertLoad(&context, v1::GetExpertLoadRequest(), load).ok());
    routed = 0;
    for (int64_t c : load->totals().counts()) routed += c;
    if (routed >= at_least || Clock::now() >= deadline) return routed;
    std::this_thread::sleep_for(milliseconds(200));
  }
}

// The dashboard in a real browser (Debian's headless chromium): it loads without a console
// error, the numbers it shows are the coordinator's (GetExpertLoad, the finished requests of
// /metrics), they change under load, and a screenshot is kept under
// <build>/test-artifacts/dashboard.png.
TEST_F(GemmactlClusterTest, DashboardShowsTheCoordinatorsNumbersInABrowser) {
  ASSERT_TRUE(Generate(cluster_.inference(), TokenRequest({2, 17, 301, 45}, 3)).status.ok());
  v1::GetExpertLoadResponse load;
  const int64_t routed = RoutedTokens(cluster_, 1, &load);
  ASSERT_GT(routed, 0);
  const std::string url = absl::StrCat("http://", http_address_, "/dashboard");
  auto browse = [&](const std::vector<std::string>& extra) {
    return HeadlessChromium(url, extra);
  };
  auto shown = [](const std::string& dom, const std::string& id) {
    std::smatch m;
    const std::regex re("id=\"" + id + "\"[^>]*>([^<]*)<");
    return std::regex_search(dom, m, re) ? m[1].str() : std::string("(missing)");
  };
  ToolRun page = browse({"--dump-dom"});
  ASSERT_EQ(page.exit_code, 0) << page.err;
  EXPECT_EQ(page.err.find("Uncaught"), std::string::npos) << page.err;
  EXPECT_EQ(shown(page.out, "error"), "") << page.out;
  EXPECT_EQ(shown(page.out, "total-routed"), std::to_string(routed)) << page.out;
  EXPECT_EQ(shown(page.out, "requests-finished"), "1") << page.out;
  EXPECT_EQ(shown(page.out, "replicas-healthy"), "1") << page.out;
  // One heatmap cell per layer and expert, with the counts in order.
  std::vector<int64_t> cells;
  const std::regex cell("data-count=\"([0-9]+)\"");
  for (auto it = std::sregex_iterator(page.out.begin(), page.out.end(), cell);
       it != std::sregex_iterator(); ++it) {
    cells.push_back(std::stoll((*it)[1].str()));
  }
  EXPECT_EQ(cells, std::vector<int64_t>(load.totals().counts().begin(),
                                        load.totals().counts().end()));

  // Under load the numbers move.
  ASSERT_TRUE(Generate(cluster_.inference(), TokenRequest({2, 99, 7, 45, 12, 300}, 3)).status.ok());
  const int64_t routed_after = RoutedTokens(cluster_, routed + 1, &load);
  ASSERT_GT(routed_after, routed);
  ToolRun again = browse({"--dump-dom"});
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_EQ(shown(again.out, "total-routed"), std::to_string(routed_after));
  EXPECT_EQ(shown(again.out, "requests-finished"), "2");

  const std::string artifacts = std::string(GEMMA_BINARY_DIR) + "/test-artifacts";
  std::filesystem::create_directories(artifacts);
  const std::string png = artifacts + "/dashboard.png";
  std::filesystem::remove(png);
  ToolRun shot = browse({"--screenshot=" + png, "--window-size=1280,900"});
  ASSERT_EQ(shot.exit_code, 0) << shot.err;
  ASSERT_TRUE(std::filesystem::exists(png)) << shot.err;
  EXPECT_GT(std::filesystem::file_size(png), 1000u);
}

TEST_F(GemmactlClusterTest, ChatPrintsLabelledRepliesAndResets) {
  const std::string line = "In the beginning";
  // Text output: one labelled reply per turn, no "you> " prompt on a pipe.
  ToolRun text = RunWithStdin(Gemmactl({"chat", "--max-tokens", "4"}), line + "\n\n" + line + "\n");
  ASSERT_EQ(text.exit_code, 0) << text.out << text.err;
  EXPECT_EQ(text.out.find("you> "), std::string::npos) << text.out;
  size_t labels = 0;
  for (size_t at = text.out.find("model> "); at != std::string::npos;
       at = text.out.find("model> ", at + 1)) {
    ++labels;
  }
  EXPECT_EQ(labels, 2u) << text.out;  // the blank line is not a turn

  // /reset forgets the first exchange: the same line gives the same prompt and reply again;
  // /exit ends the session before the last line.
  ToolRun json = RunWithStdin(Gemmactl({"chat", "--json", "--max-tokens", "4"}),
                              line + "\n/reset\n" + line + "\n/exit\n" + line + "\n");
  ASSERT_EQ(json.exit_code, 0) << json.out << json.err;
  std::vector<Turn> turns = ParseChatJson(json.out);
  ASSERT_EQ(turns.size(), 2u) << json.out;
  EXPECT_EQ(turns[0].final.prompt_tokens(), turns[1].final.prompt_tokens());
  EXPECT_EQ(turns[0].ids, turns[1].ids);
  EXPECT_EQ(turns[0].text, turns[1].text);
}

TEST_F(GemmactlClusterTest, ChatRefusedRequestIsAOneLineError) {
  ToolRun run = RunWithStdin(Gemmactl({"chat", "--temperature", "-1"}), "hello\nagain\n");
  EXPECT_EQ(run.exit_code, 1) << run.out << run.err;
  EXPECT_NE(run.err.find("gemmactl: INVALID_ARGUMENT: "), std::string::npos) << run.err;
  EXPECT_EQ(std::count(run.err.begin(), run.err.end(), '\n'), 1) << run.err;
}

// The cells of a `gemmactl status` table row by header name (cells are separated by two or
// more spaces and hold at most single spaces).
std::map<std::string, std::string> TableRow(const std::string& output, const std::string& row_key) {
  const std::regex separator(" {2,}");
  auto cells = [&](const std::string& line) {
    std::vector<std::string> out;
    for (std::sregex_token_iterator it(line.begin(), line.end(), separator, -1), end; it != end;
         ++it) {
      out.push_back(*it);
    }
    return out;
  };
  std::vector<std::string> header;
  std::map<std::string, std::string> row;
  for (absl::string_view view : absl::StrSplit(output, '\n')) {
    const std::string line(view);
    if (line.rfind("ID ", 0) == 0) header = cells(line);
    if (!header.empty() && line.find(row_key) != std::string::npos) {
      const std::vector<std::string> values = cells(line);
      for (size_t i = 0; i < header.size() && i < values.size(); ++i) row[header[i]] = values[i];
    }
  }
  return row;
}

TEST_F(GemmactlClusterTest, StatusIsATableOfReplicas) {
  // Keep one request outstanding while the table is taken.
  grpc::ClientContext context;
  context.set_deadline(In(seconds(60)));
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader =
      cluster_.inference().Generate(&context, TokenRequest({2, 17, 301}, 3000));
  v1::GenerateResponse first;
  ASSERT_TRUE(reader->Read(&first));
  const Clock::time_point deadline = Clock::now() + seconds(10);
  while (Clock::now() < deadline && cluster_.Status().replicas(0).outstanding() != 1) {
    std::this_thread::sleep_for(milliseconds(20));
  }
  const v1::GetStatusResponse status = cluster_.Status();
  ASSERT_EQ(status.replicas(0).outstanding(), 1);
  ToolRun run = RunWithStdin(Gemmactl({"status"}), "");
  context.TryCancel();
  v1::GenerateResponse response;
  while (reader->Read(&response)) {
  }
  (void)reader->Finish();

  ASSERT_EQ(run.exit_code, 0) << run.out << run.err;
  EXPECT_NE(run.out.find("replicas 1 (1 healthy)"), std::string::npos) << run.out;
  EXPECT_NE(run.out.find("requests in flight "), std::string::npos) << run.out;
  EXPECT_NE(run.out.find("re-queued 0"), std::string::npos) << run.out;
  EXPECT_NE(run.out.find(status.model_fingerprint()), std::string::npos) << run.out;
  std::map<std::string, std::string> row = TableRow(run.out, worker_address_);
  ASSERT_FALSE(row.empty()) << run.out;
  EXPECT_EQ(row["ID"], status.replicas(0).id()) << run.out;
  // The worker's --replica name beside the id (a one-node replica's name was dropped).
  EXPECT_EQ(row["NAME"], "pod-group-0") << run.out;
  EXPECT_EQ(status.replicas(0).name(), "pod-group-0");
  EXPECT_EQ(row["ADDRESS"], worker_address_) << run.out;
  EXPECT_EQ(row["HEALTH"], "healthy") << run.out;
  EXPECT_EQ(row["OUTSTANDING"], "1") << run.out;
  EXPECT_TRUE(std::regex_match(row["RUN/WAIT"], std::regex("[0-9]+/[0-9]+"))) << run.out;
  EXPECT_TRUE(std::regex_match(row["PREEMPTIONS"], std::regex(R"([0-9]+ \([0-9.]+/s\))")))
      << run.out;
  EXPECT_TRUE(std::regex_match(row["HEARTBEAT"], std::regex("[0-9.]+s"))) << run.out;
  ASSERT_FALSE(status.replicas(0).kv_pools().empty());
  for (const v1::KvPoolUsage& pool : status.replicas(0).kv_pools()) {
    const std::string cell = row["KV " + pool.name()];
    EXPECT_TRUE(std::regex_match(
        cell, std::regex("[0-9]+/" + std::to_string(pool.pages_total()) + " [0-9]+%")))
        << pool.name() << ": '" << cell << "'\n"
        << run.out;
  }
  if (!status.replicas(0).parallel().empty()) {
    EXPECT_EQ(row["PARALLEL"], status.replicas(0).parallel()) << run.out;
    EXPECT_EQ(row["WORLD"], std::to_string(status.replicas(0).world_size())) << run.out;
  }
}

// A malformed batch command is refused at once, before any connection, naming what is wrong,
// with the usage on lines of its own.
TEST(GemmactlNoClusterTest, MalformedBatchCommandsSayWhatIsWrongWithoutConnecting) {
  const std::string address = absl::StrCat("127.0.0.1:", FreeLocalPort());
  for (const auto& [args, want] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"batch", "get", "x"}, "unknown batch subcommand 'get'"},
           {{"batch", "status"}, "gemmactl batch status takes one argument"},
           {{"batch"}, "gemmactl batch needs a subcommand"}}) {
    std::vector<std::string> command = {"gemmactl", "--coordinator", address};
    command.insert(command.end(), args.begin(), args.end());
    const auto start = std::chrono::steady_clock::now();
    ToolRun run = RunWithStdin(command, "");
    EXPECT_EQ(run.exit_code, 2) << run.err;
    EXPECT_TRUE(absl::StrContains(run.err, want)) << run.err;
    EXPECT_TRUE(absl::StrContains(run.err, "\ngemmactl batch results ID")) << run.err;
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(2))
        << "waited for a coordinator";
  }
}

// An address that cannot be the coordinator's gRPC port is refused at once saying why, and an
// HTTP port (the coordinator's --http-listen, say) is named as one.
TEST(GemmactlNoClusterTest, AddressesThatCannotBeTheCoordinatorsAreNamed) {
  for (const auto& [address, want] : std::vector<std::pair<std::string, std::string>>{
           {"127.0.0.1", "has no port"},
           {"127.0.0.1:99999", "is not a number in 1-65535"},
           {"http://127.0.0.1:8000", "is a URL"}}) {
    const auto start = std::chrono::steady_clock::now();
    ToolRun run = RunWithStdin({"gemmactl", "--coordinator", address, "status"}, "");
    EXPECT_EQ(run.exit_code, 1) << run.err;
    EXPECT_TRUE(absl::StrContains(run.err, want)) << run.err;
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(2)) << address;
  }
  httplib::Server http;
  http.Get("/", [](const httplib::Request&, httplib::Response& r) { r.set_content("hi", "text/plain"); });
  const int port = http.bind_to_any_port("127.0.0.1");
  ASSERT_GT(port, 0);
  std::thread serving([&] { http.listen_after_bind(); });
  ToolRun run = RunWithStdin({"gemmactl", "--coordinator", absl::StrCat("127.0.0.1:", port),
                              "--connect-timeout-ms", "500", "status"},
                             "");
  http.stop();
  serving.join();
  EXPECT_EQ(run.exit_code, 1) << run.err;
  EXPECT_TRUE(absl::StrContains(run.err, "answers HTTP, not gRPC")) << run.err;
  // One line: gRPC's own log lines are kept out of it.
  EXPECT_EQ(std::count(run.err.begin(), run.err.end(), '\n'), 1) << run.err;
}

// `gemmactl COMMAND --help` (and `gemmactl help COMMAND`) answers about that command: its
// usage and the flags it reads, not the whole tool's help; it exits 0 without connecting.
TEST(GemmactlNoClusterTest, EachCommandHasItsOwnHelp) {
  const std::string address = absl::StrCat("127.0.0.1:", FreeLocalPort());
  for (const auto& [args, want, not_want] :
       std::vector<std::tuple<std::vector<std::string>, std::string, std::string>>{
           {{"batch", "--help"}, "gemmactl batch results ID", "--interval-ms"},
           {{"batch", "submit", "-h"}, "--model-name", "--system"},
           {{"help", "experts"}, "--interval-ms", "--model-name"},
           {{"chat", "--help"}, "--system", "--dry-run"},
           {{"--json", "rebalance", "--help"}, "--dry-run", "--tokens"}}) {
    std::vector<std::string> command = {"gemmactl", "--coordinator", address};
    command.insert(command.end(), args.begin(), args.end());
    ToolRun run = RunWithStdin(command, "");
    EXPECT_EQ(run.exit_code, 0) << args[0] << ": " << run.err;
    EXPECT_TRUE(absl::StartsWith(run.out, "usage:\n  gemmactl ")) << run.out;
    EXPECT_TRUE(absl::StrContains(run.out, want)) << run.out;
    EXPECT_FALSE(absl::StrContains(run.out, not_want)) << run.out;
    EXPECT_TRUE(absl::StrContains(run.out, "--coordinator")) << run.out;  // shared flags too
  }
  // An unknown command is named as one, before the usage.
  ToolRun unknown = RunWithStdin({"gemmactl", "nosuch"}, "");
  EXPECT_EQ(unknown.exit_code, 2);
  EXPECT_TRUE(absl::StartsWith(unknown.err, "gemmactl: unknown command \"nosuch\"\n")) << unknown.err;
  // Without a command: the whole tool's usage, still exit 0.
  ToolRun all = RunWithStdin({"gemmactl", "help"}, "");
  EXPECT_EQ(all.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(all.out, "gemmactl batch submit")) << all.out;
  EXPECT_TRUE(absl::StrContains(all.out, "gemmactl experts")) << all.out;
}

TEST(GemmactlNoClusterTest, ChatWithoutACoordinatorIsAClearError) {
  const std::string address = absl::StrCat("127.0.0.1:", FreeLocalPort());
  ToolRun run = RunWithStdin(
      {"gemmactl", "--coordinator", address, "--connect-timeout-ms", "300", "chat"}, "hello\n");
  EXPECT_EQ(run.exit_code, 1) << run.out << run.err;
  EXPECT_NE(run.err.find("cannot reach the coordinator at " + address), std::string::npos)
      << run.err;
  EXPECT_EQ(run.out.find("model> "), std::string::npos) << run.out;
}

}  // namespace
}  // namespace gemma::testing::cluster
