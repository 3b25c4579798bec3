// The OpenAI-compatible HTTP API of the real coordinator, judged by the official openai Python
// client (PyPI, pinned by scripts/python_env.sh) against one real worker: chat completions,
// streamed and not, completions, the model list, OpenAI-shaped errors, and a batch through the
// Files and Batches endpoints; each answer equals the same request sent through the gRPC API.
// Raw HTTP covers what the client cannot send.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/numbers.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "nlohmann/json.hpp"
#include "tests/cluster/cluster_harness.h"

namespace gemma::testing::cluster {
namespace {

using nlohmann::json;
using std::chrono::milliseconds;
using std::chrono::seconds;

constexpr char kModelName[] = "tiny-moe";
constexpr int64_t kMaxTokens = 8;
constexpr char kPrompt[] = "In the beginning God created";

class OpenAiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string error;
    http_address_ = absl::StrCat("127.0.0.1:", FreeLocalPort());
    ASSERT_TRUE(cluster_.StartCoordinator(
        {"--http-listen", http_address_, "--served-model-name", kModelName, "--data-dir",
         cluster_.dir() + "/data"},
        &error))
        << error;
    const std::string worker = absl::StrCat("127.0.0.1:", FreeLocalPort());
    cluster_.StartWorker(kTinyMoe,
                         {"--tokenizer", kTinyMoe + "/tokenizer.json", "--listen", worker});
    ASSERT_TRUE(WaitServing(worker, Clock::now() + seconds(20))) << cluster_.Log("worker0");
    ASSERT_TRUE(cluster_.WaitHealthy(1, Clock::now() + seconds(10))) << cluster_.Log("worker0");
  }
  void TearDown() override { cluster_.Stop(milliseconds(10000)); }

  httplib::Result Post(const std::string& path, const std::string& body) {
    const size_t colon = http_address_.rfind(':');
    httplib::Client http(http_address_.substr(0, colon),
                         std::stoi(http_address_.substr(colon + 1)));
    http.set_read_timeout(60, 0);
    return http.Post(path, body, "application/json");
  }

  // The gRPC API's greedy answer to `request` (text or chat input), its text without special
  // tokens as the HTTP API gives it by default.
  StreamResult Grpc(gemma::v1::GenerateRequest request) {
    request.set_max_tokens(kMaxTokens);
    request.set_skip_special_tokens(true);
    return Generate(cluster_.inference(), request);
  }

  Cluster cluster_{"openai"};
  std::string http_address_;
};

TEST_F(OpenAiTest, OfficialClientGetsWhatTheGrpcApiGives) {
  const std::string python = GEMMA_TEST_PYTHON;
  ASSERT_EQ(access(python.c_str(), X_OK), 0)
      << python << " is missing: run scripts/python_env.sh (scripts/test.sh does)";
  ToolRun run = RunWithStdin({python, GEMMA_SOURCE_DIR "/tests/cluster/python/openai_client_check.py",
                              absl::StrCat("http://", http_address_, "/v1"), kModelName, kPrompt,
                              std::to_string(kMaxTokens)},
                             "", seconds(120));
  ASSERT_EQ(run.exit_code, 0) << run.out << run.err << cluster_.Log("coordinator");
  const json out = json::parse(run.out);

  EXPECT_EQ(out["models"], json::array({kModelName}));
  EXPECT_EQ(out["max_model_len"], json::array({cluster_.Status().replicas(0).max_context()}));
  EXPECT_GT(out["created"][0].get<int64_t>(), 1700000000);

  gemma::v1::GenerateRequest chat_request;
  auto* message = chat_request.mutable_chat()->add_messages();
  message->set_role("user");
  message->set_content(kPrompt);
  StreamResult chat = Grpc(chat_request);
  ASSERT_TRUE(chat.status.ok()) << chat.status.error_message();
  ASSERT_TRUE(chat.has_final);
  const std::string finish = chat.final.finish_reason() == "max_tokens" ? "length" : "stop";
  EXPECT_EQ(out["chat"]["content"], chat.text);
  EXPECT_EQ(out["chat"]["role"], "assistant");
  EXPECT_EQ(out["chat"]["finish_reason"], finish);
  EXPECT_EQ(out["chat"]["usage"]["prompt_tokens"], chat.final.prompt_tokens());
  EXPECT_EQ(out["chat"]["usage"]["completion_tokens"], chat.final.generated_tokens());
  EXPECT_EQ(out["chat"]["usage"]["total_tokens"],
            chat.final.prompt_tokens() + chat.final.generated_tokens());
  // Streamed: the same text in several chunks, the role once, usage at the end.
  EXPECT_EQ(out["chat_stream"]["content"], chat.text);
  EXPECT_GT(out["chat_stream"]["chunks"].get<int>(), 1);
  EXPECT_EQ(out["chat_stream"]["roles"], json::array({"assistant"}));
  EXPECT_EQ(out["chat_stream"]["finish_reason"], finish);
  EXPECT_EQ(out["chat_stream"]["usage"], out["chat"]["usage"]);

  gemma::v1::GenerateRequest text_request;
  text_request.set_text(kPrompt);
  StreamResult text = Grpc(text_request);
  ASSERT_TRUE(text.status.ok()) << text.status.error_message();
  EXPECT_EQ(out["completion"]["text"], text.text);
  EXPECT_EQ(out["completion"]["usage"]["completion_tokens"], text.final.generated_tokens());
  EXPECT_EQ(out["completion_stream"]["text"], text.text);
  EXPECT_TRUE(out["seeded_equal"].get<bool>());
  EXPECT_EQ(out["ignore_eos"]["finish_reason"], "length") << out["ignore_eos"].dump();
  EXPECT_EQ(out["ignore_eos"]["completion_tokens"], 8) << out["ignore_eos"].dump();

  // Refusals, as the client raises them: status and the OpenAI error object.
  const json& errors = out["errors"];
  auto expect = [&](const char* name, int status, const std::string& param) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(errors[name].is_object()) << "accepted: " << errors.dump();
    EXPECT_EQ(errors[name]["status"], status);
    EXPECT_EQ(errors[name]["body"]["param"], param);
    EXPECT_FALSE(errors[name]["body"]["message"].get<std::string>().empty());
  };
  expect("unknown_model", 404, "model");
  expect("n_2", 400, "n");
  expect("logprobs", 400, "logprobs");
  expect("tools", 400, "tools");
  expect("bad_role", 400, "messages[0].role");
  expect("temperature", 400, "temperature");
  ASSERT_TRUE(errors["stop_100k"].is_object()) << "accepted: " << errors.dump();
  EXPECT_EQ(errors["stop_100k"]["status"], 400);
  EXPECT_NE(errors["stop_100k"]["body"]["message"].get<std::string>().find(
                "100000 stop strings, over the limit of 16"),
            std::string::npos)
      << errors["stop_100k"].dump();
  EXPECT_NE(errors["unknown_model"]["body"]["message"].get<std::string>().find(kModelName),
            std::string::npos);

  // The batch: five results equal to the chats sent alone, the sixth refused with its line.
  const json& batch = out["batch"];
  EXPECT_EQ(batch["status"], "completed");
  EXPECT_EQ(batch["counts"]["total"], 7);
  EXPECT_EQ(batch["counts"]["completed"], 5);
  EXPECT_EQ(batch["counts"]["failed"], 2);
  EXPECT_EQ(batch["metadata"]["job"], "check");
  EXPECT_EQ(batch["output_file_bytes_match"], true);
  EXPECT_TRUE(batch["listed"].get<bool>());
  ASSERT_EQ(batch["errors"].size(), 2u);
  EXPECT_EQ(batch["errors"][0]["line"], 5);
  EXPECT_EQ(batch["errors"][1]["code"], "model_not_found");
  ASSERT_EQ(batch["output"].size(), 5u);
  for (const json& line : batch["output"]) {
    const std::string custom_id = line["custom_id"];
    gemma::v1::GenerateRequest alone;
    auto* m = alone.mutable_chat()->add_messages();
    m->set_role("user");
    m->set_content(absl::StrCat(kPrompt, " ", custom_id.substr(1)));
    StreamResult reference = Grpc(alone);
    ASSERT_TRUE(reference.status.ok());
    EXPECT_EQ(line["response"]["status_code"], 200);
    EXPECT_EQ(line["response"]["body"]["choices"][0]["message"]["content"], reference.text)
        << custom_id;
    EXPECT_EQ(line["response"]["body"]["model"], kModelName);
  }
  ASSERT_EQ(batch["error_file"].size(), 2u);
  EXPECT_EQ(batch["error_file"][0]["custom_id"], "b4");
  EXPECT_EQ(batch["error_file"][0]["response"]["status_code"], 400);
  // A model not served: 404 model_not_found, as the interactive API answers (it was a 400).
  EXPECT_EQ(batch["error_file"][1]["custom_id"], "b6");
  EXPECT_EQ(batch["error_file"][1]["response"]["status_code"], 404);
  EXPECT_EQ(batch["error_file"][1]["response"]["body"]["error"]["code"], "model_not_found");

  // files.list and files.delete: newest first; a deleted file is gone from the list and a 404,
  // and the batch made from it keeps its results.
  const json& files = out["files"];
  EXPECT_TRUE(files["listed_newest_first"].get<bool>()) << files.dump();
  EXPECT_TRUE(files["deleted"].get<bool>()) << files.dump();
  EXPECT_EQ(files["listed_after_delete"], json::array({files["second"]})) << files.dump();
  EXPECT_EQ(files["retrieved_after_delete"], 404) << files.dump();
  EXPECT_EQ(files["batch_after_delete"]["completed"], 5) << files.dump();
}

// A client that gives up on a non-streamed completion (its read timeout) cancels the
// generation: the replica stops well before max_tokens instead of generating for nobody.
TEST_F(OpenAiTest, AClientThatHangsUpCancelsItsNonStreamedCompletion) {
  const size_t colon = http_address_.rfind(':');
  const std::string host = http_address_.substr(0, colon);
  const int port = std::stoi(http_address_.substr(colon + 1));
  auto generated = [&] {
    httplib::Client http(host, port);
    auto metrics = http.Get("/metrics");
    if (!metrics || metrics->status != 200) return int64_t{-1};
    int64_t total = 0;
    for (absl::string_view line : absl::StrSplit(metrics->body, '\n')) {
      if (!absl::StartsWith(line, "gemma:generation_tokens_total")) continue;
      double value = 0;
      if (absl::SimpleAtod(line.substr(line.rfind(' ') + 1), &value)) total += value;
    }
    return total;
  };
  const int64_t before = generated();
  ASSERT_GE(before, 0);
  {
    httplib::Client impatient(host, port);
    impatient.set_read_timeout(0, 300000);  // 0.3 s
    auto r = impatient.Post(
        "/v1/completions",
        json{{"model", kModelName}, {"prompt", kPrompt}, {"max_tokens", 4000}, {"temperature", 0}}
            .dump(),
        "application/json");
    EXPECT_FALSE(r) << "the completion of 4000 tokens answered within 0.3 s";
  }
  // Once nothing is in flight, far fewer than 4000 tokens were generated.
  ASSERT_TRUE(PollUntil([&] { return cluster_.Status().requests_in_flight() == 0; },
                        milliseconds(20000)));
  const int64_t spent = generated() - before;
  EXPECT_LT(spent, 2500) << "the generation ran on after the client left";
  // It counts as an aborted request, with the tokens that were generated for it.
  EXPECT_GT(spent, 0) << "the aborted request's tokens were not counted";
  httplib::Client http(host, port);
  auto metrics = http.Get("/metrics");
  ASSERT_TRUE(metrics);
  EXPECT_TRUE(absl::StrContains(metrics->body, "finished_reason=\"abort\"")) << metrics->body;
}

// What httplib answers itself under /v1/ carries an OpenAI error body: an unknown path is a 404
// naming it, a known path with another method a 405 with Allow.
TEST_F(OpenAiTest, UnknownPathsAndWrongMethodsGetOpenAiErrors) {
  const size_t colon = http_address_.rfind(':');
  httplib::Client http(http_address_.substr(0, colon), std::stoi(http_address_.substr(colon + 1)));
  auto error_in = [](const httplib::Result& r) {
    EXPECT_TRUE(r);
    if (!r) return json();
    json parsed = json::parse(r->body, nullptr, false);
    EXPECT_TRUE(parsed.contains("error")) << r->status << ": " << r->body;
    return parsed.contains("error") ? parsed["error"] : json();
  };
  auto get_chat = http.Get("/v1/chat/completions");
  EXPECT_EQ(get_chat->status, 405);
  EXPECT_EQ(get_chat->get_header_value("Allow"), "POST");
  EXPECT_EQ(error_in(get_chat)["message"], "/v1/chat/completions takes POST, not GET");
  auto put_file = http.Put("/v1/files/file-1", "x", "text/plain");
  EXPECT_EQ(put_file->status, 405);
  EXPECT_EQ(put_file->get_header_value("Allow"), "GET, DELETE");
  auto unknown = http.Get("/v1/embeddings");
  EXPECT_EQ(unknown->status, 404);
  EXPECT_TRUE(absl::StrContains(error_in(unknown)["message"].get<std::string>(),
                                "no such endpoint: GET /v1/embeddings"));
  // A list's limit must be wholly a number.
  auto bad_limit = http.Get("/v1/files?limit=10abc");
  EXPECT_EQ(bad_limit->status, 400);
  EXPECT_EQ(error_in(bad_limit)["message"], "limit must be a whole number in [1, 10000], got \"10abc\"");
  // A POST without Content-Length (curl -X POST with no -d, as OpenAI's own cancel example
  // sends) has an empty body and is answered at once: routed (a cancel of an unknown batch is
  // its 404), or a 405 where the path takes no POST. httplib read such a body to the end of the
  // connection and failed with a 400 after its read timeout.
  auto raw_post = [&](const std::string& path) {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(std::stoi(http_address_.substr(colon + 1)));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    std::string reply;
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
      const std::string text = absl::StrCat("POST ", path, " HTTP/1.1\r\nHost: x\r\n\r\n");
      if (write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size())) {
        char buffer[4096];
        ssize_t n;
        while ((n = read(fd, buffer, sizeof(buffer))) > 0) {
          reply.append(buffer, n);
          if (reply.find("\r\n\r\n") != std::string::npos && reply.find('}') != std::string::npos) break;
        }
      }
    }
    close(fd);
    return reply;
  };
  const auto asked = std::chrono::steady_clock::now();
  const std::string cancel_reply = raw_post("/v1/batches/batch_x/cancel");
  const std::string models_reply = raw_post("/v1/models");
  EXPECT_LT(std::chrono::steady_clock::now() - asked, std::chrono::seconds(2));
  EXPECT_TRUE(absl::StartsWith(cancel_reply, "HTTP/1.1 404")) << cancel_reply;
  EXPECT_TRUE(absl::StrContains(cancel_reply, "batch_x")) << cancel_reply;
  EXPECT_TRUE(absl::StartsWith(models_reply, "HTTP/1.1 405")) << models_reply;
  EXPECT_TRUE(absl::StrContains(models_reply, "Allow: GET")) << models_reply;
  // An error a handler sends keeps its own body.
  auto no_model = http.Get("/v1/models/nope");
  EXPECT_EQ(no_model->status, 404);
  EXPECT_EQ(error_in(no_model)["code"], "model_not_found");
}

TEST_F(OpenAiTest, BadBodiesGetOpenAiErrors) {
  auto error_of = [&](const std::string& path, const std::string& body, int status) {
    auto response = Post(path, body);
    EXPECT_TRUE(response) << "no answer";
    if (!response) return json();
    EXPECT_EQ(response->status, status) << body << " -> " << response->body;
    json parsed = json::parse(response->body, nullptr, false);
    EXPECT_TRUE(parsed.contains("error")) << response->body;
    return parsed.contains("error") ? parsed["error"] : json();
  };
  // A body that is not JSON, or not an object, says what is wrong and where.
  const std::string not_json =
      error_of("/v1/completions", "{not json", 400)["message"].get<std::string>();
  EXPECT_TRUE(absl::StrContains(not_json, "the request body is not valid JSON")) << not_json;
  EXPECT_TRUE(absl::StrContains(not_json, "at line 1, column 3")) << not_json;
  // A number past a double's range is a 400 too (it was an unlogged 500).
  const std::string overflow =
      error_of("/v1/chat/completions",
               R"({"model": "tiny-moe", "messages": [], "temperature": 1e999})", 400)["message"];
  EXPECT_TRUE(absl::StrContains(overflow, "number overflow")) << overflow;
  const std::string array = error_of("/v1/chat/completions", "[1, 2]", 400)["message"];
  EXPECT_EQ(array, "the request body is a JSON array, not an object");
  // Each field's refusal says what is wrong with it, not something near it.
  auto message_of = [&](const std::string& body) {
    return error_of("/v1/completions", body, 400)["message"].get<std::string>();
  };
  EXPECT_EQ(message_of(R"({"model": "tiny-moe", "prompt": "x", "max_tokens": 99999999999999999999})"),
            "max_tokens is too large: at most 9223372036854775807");
  EXPECT_EQ(message_of(R"({"model": "tiny-moe", "prompt": "x", "max_tokens": 2.5})"),
            "max_tokens must be an integer, got 2.5");
  EXPECT_TRUE(absl::StrContains(message_of(R"({"model": 5, "prompt": "x"})"),
                                "model must be a string"));
  EXPECT_EQ(message_of(R"({"model": "tiny-moe", "prompt": ""})"),
            "prompt is empty; give some text or token ids");
  EXPECT_EQ(message_of(R"({"model": "tiny-moe", "prompt": "x", "top_p": 0})"),
            "top_p must be in (0, 1]: above 0, at most 1, got 0");
  EXPECT_EQ(message_of(R"({"model": "tiny-moe", "prompt": "x", "skip_special_tokens": "no"})"),
            "skip_special_tokens must be true or false");
  // A list of ids with something else in it says so (it read "more than one prompt").
  EXPECT_EQ(message_of(R"({"model": "tiny-moe", "prompt": [2, 1228.5]})"),
            "prompt[1] must be a token id (a whole number), got 1228.5; a prompt is a string or "
            "a list of token ids");
  EXPECT_TRUE(absl::StrContains(message_of(R"({"model": "tiny-moe", "prompt": ["a", "b"]})"),
                                "more than one prompt per request"));
  // Seeds are 64-bit signed integers (2^64 read "must be an integer"; -1 and 2^64-1 were one).
  EXPECT_TRUE(absl::StartsWith(
      message_of(R"({"model": "tiny-moe", "prompt": "x", "seed": 18446744073709551615})"),
      "seed must be an integer in [-9223372036854775808, 9223372036854775807]"));
  EXPECT_EQ(message_of(R"({"model": "tiny-moe", "prompt": "x", "user": 5})"),
            "user must be a string");
  EXPECT_EQ(error_of("/v1/chat/completions",
                     R"({"model": "tiny-moe", "messages": [{"role": "user", "content": null}]})",
                     400)["message"],
            "messages[0].content is required for a user message (a string or a list of text "
            "parts)");
  // A whole number written as a float is that number, as pydantic (vLLM) takes it.
  auto whole = Post("/v1/completions",
                    R"({"model": "tiny-moe", "prompt": "x", "max_tokens": 2.0, "seed": 7})");
  ASSERT_TRUE(whole);
  EXPECT_EQ(whole->status, 200) << whole->body;
  EXPECT_EQ(error_of("/v1/completions",
                     json{{"model", kModelName}, {"prompt", "x"}, {"best_of_luck", 1}}.dump(),
                     400)["param"],
            "best_of_luck");
  EXPECT_EQ(error_of("/v1/chat/completions", json{{"model", kModelName}}.dump(), 400)["param"],
            "messages");
  EXPECT_EQ(error_of("/v1/completions", json{{"prompt", "x"}}.dump(), 400)["param"], "model");
  // A request the coordinator refuses (an id outside the vocabulary) keeps its gRPC message.
  json refused = error_of(
      "/v1/completions",
      json{{"model", kModelName}, {"prompt", json::array({2, 1 << 30})}}.dump(), 400);
  EXPECT_TRUE(absl::StrContains(refused["message"].get<std::string>(), "vocabulary"))
      << refused.dump();
  // More than the body limit: 413, and the server still answers afterwards.
  const std::string huge(9 << 20, 'x');
  auto response = Post("/v1/completions", huge);
  ASSERT_TRUE(response);
  EXPECT_EQ(response->status, 413);
  auto ok = Post("/v1/completions",
                 json{{"model", kModelName}, {"prompt", kPrompt}, {"max_tokens", 2}}.dump());
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200) << ok->body;
}

// ignore_eos (vLLM's extension, which benchmark tools send): the same seeded sampling runs past
// the end id that stopped it, to exactly max_tokens. Hot sampling over the tiny vocabulary
// reaches an end id within a few hundred tokens.
TEST_F(OpenAiTest, IgnoreEosRunsPastTheEndIdToMaxTokens) {
  auto complete = [&](bool ignore_eos) {
    json body = {{"model", kModelName}, {"prompt", json::array({2, 17, 301})},
                 {"max_tokens", 3000}, {"temperature", 2}, {"seed", 11}};
    if (ignore_eos) body["ignore_eos"] = true;
    auto response = Post("/v1/completions", body.dump());
    EXPECT_TRUE(response && response->status == 200) << (response ? response->body : "");
    return response ? json::parse(response->body, nullptr, false) : json();
  };
  const json stopped = complete(false);
  const json ran_on = complete(true);
  ASSERT_EQ(stopped["choices"][0]["finish_reason"], "stop") << stopped.dump();
  EXPECT_LT(stopped["usage"]["completion_tokens"].get<int64_t>(), 3000);
  EXPECT_EQ(ran_on["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(ran_on["usage"]["completion_tokens"], 3000);
  EXPECT_TRUE(absl::StartsWith(ran_on["choices"][0]["text"].get<std::string>(),
                               stopped["choices"][0]["text"].get<std::string>()));
  auto refused = Post("/v1/completions", json{{"model", kModelName}, {"prompt", "x"},
                                              {"ignore_eos", "yes"}}.dump());
  ASSERT_TRUE(refused);
  EXPECT_EQ(refused->status, 400);
}

// POST /v1/batches checks its fields as OpenAI's does: completion_window is required, metadata
// is at most 16 string pairs of bounded size; a list's unknown cursor names the parameter the
// client sent (after), not the store's name for it.
TEST_F(OpenAiTest, BatchCreationAndListingCheckTheirFields) {
  auto error_of = [&](const std::string& body) {
    auto response = Post("/v1/batches", body);
    EXPECT_TRUE(response);
    if (!response) return json();
    EXPECT_EQ(response->status, 400) << body << " -> " << response->body;
    return json::parse(response->body, nullptr, false)["error"];
  };
  const json base = {{"input_file_id", "file-none"}, {"endpoint", "/v1/chat/completions"}};
  EXPECT_EQ(error_of(base.dump())["message"], "completion_window is required: \"24h\"");
  json many = base;
  many["completion_window"] = "24h";
  for (int i = 0; i < 17; ++i) many["metadata"][absl::StrCat("k", i)] = "v";
  json wrong = error_of(many.dump());
  EXPECT_EQ(wrong["message"], "metadata has 17 keys; at most 16");
  EXPECT_EQ(wrong["param"], "metadata");
  json text = base;
  text["completion_window"] = "24h";
  text["metadata"] = "not an object";
  EXPECT_EQ(error_of(text.dump())["message"], "metadata must be an object of strings");
  const size_t colon = http_address_.rfind(':');
  httplib::Client http(http_address_.substr(0, colon), std::stoi(http_address_.substr(colon + 1)));
  auto listed = http.Get("/v1/batches?after=batch_nope");
  ASSERT_TRUE(listed);
  EXPECT_EQ(listed->status, 400);
  EXPECT_TRUE(absl::StartsWith(
      json::parse(listed->body)["error"]["message"].get<std::string>(),
      "after=\"batch_nope\" names no batch you can see"))
      << listed->body;
}

// A request that names no max_tokens gets the default only as far as the context allows: a long
// input generates up to the context's end instead of being refused (the default is the
// server's, not the client's). A max_tokens the client names is still held to, with the room
// left named, and an input that fills the context is refused saying so.
TEST_F(OpenAiTest, AnUnnamedMaxTokensGivesWayToALongInput) {
  constexpr int64_t kContext = 4096;  // tiny-moe's max_position_embeddings
  json ids = json::array({2});
  for (int i = 1; i < kContext - 5; ++i) ids.push_back(100 + i % 50);  // 5 positions left
  auto served = Post("/v1/completions",
                     json{{"model", kModelName}, {"prompt", ids}, {"temperature", 0}}.dump());
  ASSERT_TRUE(served);
  ASSERT_EQ(served->status, 200) << served->body;
  json body = json::parse(served->body);
  EXPECT_EQ(body["usage"]["prompt_tokens"], kContext - 5);
  EXPECT_LE(body["usage"]["completion_tokens"].get<int64_t>(), 5) << served->body;
  EXPECT_LE(body["usage"]["total_tokens"].get<int64_t>(), kContext) << served->body;

  auto named = Post("/v1/completions", json{{"model", kModelName},
                                            {"prompt", ids},
                                            {"max_tokens", 16}}.dump());
  ASSERT_TRUE(named);
  EXPECT_EQ(named->status, 400) << named->body;
  EXPECT_TRUE(absl::StrContains(named->body, "at most 5")) << named->body;

  json full = ids;
  for (int i = 0; i < 5; ++i) full.push_back(7);
  auto no_room = Post("/v1/completions", json{{"model", kModelName}, {"prompt", full}}.dump());
  ASSERT_TRUE(no_room);
  EXPECT_EQ(no_room->status, 400) << no_room->body;
  EXPECT_TRUE(absl::StrContains(no_room->body, "leaves no room")) << no_room->body;

  // A chat of about 3800 tokens ("and " is two): the chat default (1024) would not fit; what
  // is left does.
  std::string words;
  for (int i = 0; i < 1900; ++i) words += "and ";
  auto chat = Post("/v1/chat/completions",
                   json{{"model", kModelName},
                        {"messages", json::array({{{"role", "user"}, {"content", words}}})},
                        {"temperature", 0}}
                       .dump());
  ASSERT_TRUE(chat);
  ASSERT_EQ(chat->status, 200) << chat->body.substr(0, 400);
  json chat_body = json::parse(chat->body);
  EXPECT_GT(chat_body["usage"]["prompt_tokens"].get<int64_t>(), kContext - 1024);
  EXPECT_LE(chat_body["usage"]["total_tokens"].get<int64_t>(), kContext);
}

}  // namespace
}  // namespace gemma::testing::cluster
