// The cluster's first vertical slice end to end: a gemma-coordinator and one gemma-worker
// (tiny-moe, single CPU rank) on 127.0.0.1, driven through gRPC and gemmactl. Readiness is
// polled through grpc.health.v1 and Cluster.GetStatus; every call has a deadline.
#include <signal.h>

#include <chrono>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "tests/cluster/cluster_harness.h"

namespace gemma::testing::cluster {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
namespace v1 = gemma::v1;
namespace iv1 = gemma::internal::v1;

class ClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string error;
    ASSERT_TRUE(cluster_.StartCoordinator({}, &error)) << error;
    worker_address_ = absl::StrCat("127.0.0.1:", FreeLocalPort());
    cluster_.StartWorker(kTinyMoe, {"--listen", worker_address_, "--threads", "2"});
    ASSERT_TRUE(WaitServing(worker_address_, Clock::now() + seconds(15)))
        << cluster_.Log("worker0");
    // The worker serves before it registers: wait until the coordinator routes to it.
    ASSERT_TRUE(cluster_.WaitHealthy(1, Clock::now() + seconds(10))) << cluster_.Log("worker0");
  }

  Cluster cluster_{"cluster"};
  std::string worker_address_;
};

constexpr int64_t kNewTokens = 12;

TEST_F(ClusterTest, StreamedTokenIdsEqualGemmaGenerate) {
  const std::vector<std::vector<int32_t>> prompts = {{2, 17, 301}, {2, 45, 46, 47, 300, 11}};
  for (const std::vector<int32_t>& prompt : prompts) {
    int exit_code = -1;
    const std::string expected_text =
        GemmaGenerateOutput(kTinyMoe, prompt, kNewTokens, /*threads=*/2, &exit_code);
    ASSERT_EQ(exit_code, 0) << expected_text;
    const std::vector<int32_t> expected = ParseIds(expected_text);
    ASSERT_FALSE(expected.empty()) << expected_text;
    StreamResult result = Generate(cluster_.inference(), TokenRequest(prompt, kNewTokens));
    ASSERT_TRUE(result.status.ok()) << result.status.error_message();
    EXPECT_EQ(result.ids, expected);
    // Streamed: one response per generated token at least (the final one may carry none).
    EXPECT_GE(result.num_responses, static_cast<int>(expected.size()));
    EXPECT_EQ(result.final.prompt_tokens(), static_cast<int64_t>(prompt.size()));
    EXPECT_EQ(result.final.generated_tokens(), static_cast<int64_t>(expected.size()));
    EXPECT_FALSE(result.final.finish_reason().empty());
  }
}

TEST_F(ClusterTest, ConcurrentStreamsEqualTheirSingleResults) {
  constexpr int kStreams = 8;
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < kStreams; ++i) prompts.push_back({2, 30 + 7 * i, 101 + i, 400 - 3 * i});
  std::vector<std::vector<int32_t>> single(kStreams);
  for (int i = 0; i < kStreams; ++i) {
    StreamResult result = Generate(cluster_.inference(), TokenRequest(prompts[i], kNewTokens));
    ASSERT_TRUE(result.status.ok()) << result.status.error_message();
    ASSERT_FALSE(result.ids.empty());
    single[i] = result.ids;
  }
  std::vector<StreamResult> concurrent(kStreams);
  std::vector<std::thread> threads;
  for (int i = 0; i < kStreams; ++i) {
    threads.emplace_back([&, i] {
      concurrent[i] = Generate(cluster_.inference(), TokenRequest(prompts[i], kNewTokens));
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (int i = 0; i < kStreams; ++i) {
    ASSERT_TRUE(concurrent[i].status.ok()) << i << ": " << concurrent[i].status.error_message();
    EXPECT_EQ(concurrent[i].ids, single[i]) << "stream " << i;
  }
}

TEST_F(ClusterTest, BadRequestsAreInvalidArgument) {
  std::vector<std::pair<std::string, v1::GenerateRequest>> cases;
  cases.push_back({"no input", v1::GenerateRequest()});
  v1::GenerateRequest empty_ids;
  empty_ids.mutable_token_ids();
  cases.push_back({"empty token_ids", empty_ids});
  v1::GenerateRequest top_p = TokenRequest({2, 17}, 4);
  top_p.mutable_sampling()->set_top_p(1.5f);
  cases.push_back({"top_p 1.5", top_p});
  v1::GenerateRequest zero_top_p = TokenRequest({2, 17}, 4);
  zero_top_p.mutable_sampling()->set_top_p(0.0f);
  cases.push_back({"top_p 0", zero_top_p});
  v1::GenerateRequest temperature = TokenRequest({2, 17}, 4);
  temperature.mutable_sampling()->set_temperature(-0.5f);
  cases.push_back({"temperature -0.5", temperature});
  cases.push_back({"max_tokens -1", TokenRequest({2, 17}, -1)});
  cases.push_back({"id outside the vocabulary", TokenRequest({2, 100000}, 4)});
  v1::GenerateRequest text;
  text.set_text("");
  cases.push_back({"empty text", text});
  for (const auto& [name, request] : cases) {
    StreamResult result = Generate(cluster_.inference(), request);
    EXPECT_EQ(result.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << name << ": " << result.status.error_message();
    EXPECT_FALSE(result.status.error_message().empty()) << name;
    EXPECT_TRUE(result.ids.empty()) << name;
  }
  StreamResult text_result = Generate(cluster_.inference(), text);
  EXPECT_NE(text_result.status.error_message().find("text is empty"), std::string::npos)
      << text_result.status.error_message();
  // The replica is still serving after the refusals.
  EXPECT_TRUE(Generate(cluster_.inference(), TokenRequest({2, 17}, 2)).status.ok());
}

TEST_F(ClusterTest, WorkerWithAnotherFingerprintIsRefused) {
  const v1::GetStatusResponse status = cluster_.Status();
  ASSERT_EQ(status.model_fingerprint().size(), 16u);
  iv1::RegisterRequest request;
  request.set_protocol_version(status.protocol_version());
  request.set_model_fingerprint("0123456789abcdef");
  request.set_address("127.0.0.1:1");
  iv1::RegisterResponse response;
  grpc::ClientContext context;
  context.set_deadline(In(seconds(2)));
  grpc::Status refused = cluster_.internal().Register(&context, request, &response);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(refused.error_message().find("0123456789abcdef"), std::string::npos)
      << refused.error_message();
  EXPECT_NE(refused.error_message().find(status.model_fingerprint()), std::string::npos)
      << refused.error_message();

  request.set_model_fingerprint(status.model_fingerprint());
  request.set_protocol_version(status.protocol_version() + 1);
  grpc::ClientContext context2;
  context2.set_deadline(In(seconds(2)));
  refused = cluster_.internal().Register(&context2, request, &response);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(refused.error_message().find("protocol version"), std::string::npos);
  EXPECT_EQ(cluster_.Status().replicas_size(), 1);
}

TEST_F(ClusterTest, GemmactlShowsStatusAndGenerates) {
  int exit_code = -1;
  std::string output =
      RunTool({"gemmactl", "--coordinator", cluster_.coordinator_address(), "status"}, &exit_code);
  EXPECT_EQ(exit_code, 0) << output;
  EXPECT_NE(output.find(worker_address_), std::string::npos) << output;
  EXPECT_NE(output.find("healthy"), std::string::npos) << output;
  EXPECT_EQ(output.find("UNHEALTHY"), std::string::npos) << output;

  StreamResult expected = Generate(cluster_.inference(), TokenRequest({2, 17, 301}, 6));
  ASSERT_TRUE(expected.status.ok());
  output = RunTool({"gemmactl", "--coordinator", cluster_.coordinator_address(), "generate",
                    "--tokens", "2,17,301", "--max-tokens", "6"},
                   &exit_code);
  EXPECT_EQ(exit_code, 0) << output;
  EXPECT_NE(output.find(absl::StrJoin(expected.ids, " ")), std::string::npos) << output;

  output = RunTool({"gemmactl", "--coordinator", cluster_.coordinator_address(), "generate",
                    "--tokens", "2,100000"},
                   &exit_code);
  EXPECT_EQ(exit_code, 1) << output;
  EXPECT_NE(output.find("INVALID_ARGUMENT"), std::string::npos) << output;
}

TEST_F(ClusterTest, ClientDeadlineEndsTheReplicaCall) {
  v1::GenerateRequest request = TokenRequest({2, 17, 301}, 4000);
  grpc::ClientContext context;
  context.set_deadline(In(milliseconds(300)));
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader =
      cluster_.inference().Generate(&context, request);
  v1::GenerateResponse response;
  int num_responses = 0;
  while (reader->Read(&response)) ++num_responses;
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_GT(num_responses, 0);
  // The coordinator's call to the replica ends too, and the replica serves the next request.
  const Clock::time_point deadline = Clock::now() + seconds(5);
  int64_t outstanding = -1;
  while (Clock::now() < deadline) {
    outstanding = cluster_.Status().replicas(0).outstanding();
    if (outstanding == 0) break;
    std::this_thread::sleep_for(milliseconds(20));
  }
  EXPECT_EQ(outstanding, 0);
  StreamResult next = Generate(cluster_.inference(), TokenRequest({2, 17}, 3));
  EXPECT_TRUE(next.status.ok()) << next.status.error_message();
  EXPECT_EQ(next.ids.size(), 3u);
}

TEST_F(ClusterTest, ProcessesExitCleanlyOnSigterm) {
  cluster_.worker(0).Signal(SIGTERM);
  EXPECT_EQ(cluster_.worker(0).WaitForExitCode(milliseconds(8000)), 0);
  cluster_.coordinator().Signal(SIGTERM);
  EXPECT_EQ(cluster_.coordinator().WaitForExitCode(milliseconds(8000)), 0);
}

TEST(ClusterNoReplicaTest, CoordinatorWithoutReplicasAnswersUnavailable) {
  Cluster lonely("lonely_coordinator");
  std::string error;
  ASSERT_TRUE(lonely.StartCoordinator({"--queue-wait-ms", "300"}, &error)) << error;
  v1::Inference::Stub* stub = &lonely.inference();
  StreamResult result = Generate(*stub, TokenRequest({2, 17}, 4));
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::UNAVAILABLE)
      << result.status.error_message();
  // It waited in the admission queue for a replica first.
  EXPECT_TRUE(absl::StrContains(result.status.error_message(), "ms in the admission queue"))
      << result.status.error_message();
  // A bad request is refused as such even without replicas.
  EXPECT_EQ(Generate(*stub, TokenRequest({2, 17}, -3)).status.error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
}

TEST(GemmactlTest, UnreachableCoordinatorIsAClearError) {
  const std::string address = absl::StrCat("127.0.0.1:", FreeLocalPort());
  int exit_code = -1;
  const std::string output = RunTool(
      {"gemmactl", "--coordinator", address, "--connect-timeout-ms", "300", "status"}, &exit_code);
  EXPECT_EQ(exit_code, 1) << output;
  EXPECT_NE(output.find("cannot reach the coordinator at " + address), std::string::npos)
      << output;
}

}  // namespace
}  // namespace gemma::testing::cluster
