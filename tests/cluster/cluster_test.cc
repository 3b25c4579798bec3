// The cluster's first vertical slice end to end: a gemma-coordinator and one gemma-worker
// (tiny-moe, single CPU rank) on 127.0.0.1, driven through gRPC and gemmactl. Readiness is
// polled through grpc.health.v1 and Cluster.GetStatus; every call has a deadline.
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "gemma/internal/v1/worker.grpc.pb.h"
#include "gemma/v1/cluster.grpc.pb.h"
#include "gemma/v1/inference.grpc.pb.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/testing/child_process.h"

namespace gemma {
namespace {

using testing::ChildProcess;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
using std::chrono::seconds;

const std::string kBin = std::string(GEMMA_BINARY_DIR) + "/bin/";
const std::string kModel = std::string(GEMMA_SOURCE_DIR) + "/tests/golden/data/tiny-moe";

std::chrono::system_clock::time_point In(milliseconds ms) {
  return std::chrono::system_clock::now() + ms;
}

// One grpc.health.v1.Health/Check of the overall service: true when it answers SERVING. The
// request is the empty message; the response is field 1 (status) = 1 (SERVING): bytes 08 01.
bool HealthServing(grpc::GenericStub& stub) {
  grpc::ClientContext context;
  context.set_deadline(In(milliseconds(500)));
  grpc::CompletionQueue cq;
  grpc::ByteBuffer request;
  grpc::Slice empty("");
  request = grpc::ByteBuffer(&empty, 1);
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> call =
      stub.PrepareUnaryCall(&context, "/grpc.health.v1.Health/Check", request, &cq);
  call->StartCall();
  grpc::ByteBuffer response;
  grpc::Status status;
  call->Finish(&response, &status, reinterpret_cast<void*>(1));
  void* tag = nullptr;
  bool ok = false;
  cq.Next(&tag, &ok);
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  if (!status.ok()) return false;
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return false;
  std::string bytes;
  for (const grpc::Slice& slice : slices) bytes += std::string(slice.begin(), slice.end());
  return bytes == std::string("\x08\x01", 2);
}

bool WaitServing(const std::string& address, Clock::time_point deadline) {
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  while (Clock::now() < deadline) {
    if (HealthServing(stub)) return true;
    channel->WaitForConnected(In(milliseconds(100)));
  }
  return false;
}

struct StreamResult {
  grpc::Status status;
  std::vector<int32_t> ids;
  int num_responses = 0;
  v1::GenerateFinal final;
};

StreamResult Generate(v1::Inference::Stub& stub, const v1::GenerateRequest& request) {
  grpc::ClientContext context;
  context.set_deadline(In(seconds(20)));
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader =
      stub.Generate(&context, request);
  StreamResult result;
  v1::GenerateResponse response;
  while (reader->Read(&response)) {
    ++result.num_responses;
    result.ids.insert(result.ids.end(), response.token_ids().begin(), response.token_ids().end());
    if (response.has_final()) result.final = response.final();
  }
  result.status = reader->Finish();
  return result;
}

v1::GenerateRequest TokenRequest(const std::vector<int32_t>& prompt, int64_t max_tokens) {
  v1::GenerateRequest request;
  for (int32_t id : prompt) request.mutable_token_ids()->add_ids(id);
  request.set_max_tokens(max_tokens);
  return request;
}

// Runs a tool to completion; its stdout and stderr together.
std::string RunTool(std::vector<std::string> args, int* exit_code) {
  const std::string output = ::testing::TempDir() + "/tool_" + std::to_string(getpid()) + ".out";
  args[0] = kBin + args[0];
  ChildProcess child(args, output);
  *exit_code = child.WaitForExitCode(milliseconds(20000));
  return testing::ReadFileToString(output);
}

class ClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string dir = ::testing::TempDir() + "/cluster_" + std::to_string(getpid());
    std::filesystem::create_directories(dir);
    coordinator_address_ = absl::StrCat("127.0.0.1:", testing::FreeLocalPort());
    coordinator_ = std::make_unique<ChildProcess>(
        std::vector<std::string>{kBin + "gemma-coordinator", "--listen", coordinator_address_},
        dir + "/coordinator.log");
    ASSERT_TRUE(WaitServing(coordinator_address_, Clock::now() + seconds(10)))
        << testing::ReadFileToString(dir + "/coordinator.log");
    worker_address_ = absl::StrCat("127.0.0.1:", testing::FreeLocalPort());
    worker_ = std::make_unique<ChildProcess>(
        std::vector<std::string>{kBin + "gemma-worker", "--coordinator", coordinator_address_,
                                 "--model", kModel, "--listen", worker_address_, "--threads", "2"},
        dir + "/worker.log");
    ASSERT_TRUE(WaitServing(worker_address_, Clock::now() + seconds(15)))
        << testing::ReadFileToString(dir + "/worker.log");
    auto channel = grpc::CreateChannel(coordinator_address_, grpc::InsecureChannelCredentials());
    inference_ = v1::Inference::NewStub(channel);
    cluster_ = v1::Cluster::NewStub(channel);
    internal_ = internal::v1::Coordinator::NewStub(channel);
    // The worker serves before it registers: wait until the coordinator routes to it.
    const Clock::time_point deadline = Clock::now() + seconds(10);
    bool registered = false;
    while (!registered && Clock::now() < deadline) {
      v1::GetStatusResponse status = GetStatus();
      registered = status.replicas_size() == 1 && status.replicas(0).healthy();
      if (!registered) std::this_thread::sleep_for(milliseconds(20));
    }
    ASSERT_TRUE(registered) << testing::ReadFileToString(dir + "/worker.log");
  }

  void TearDown() override {
    if (worker_ != nullptr) worker_->Kill();
    if (coordinator_ != nullptr) coordinator_->Kill();
  }

  v1::GetStatusResponse GetStatus() {
    grpc::ClientContext context;
    context.set_deadline(In(seconds(2)));
    v1::GetStatusResponse response;
    grpc::Status status = cluster_->GetStatus(&context, v1::GetStatusRequest(), &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response;
  }

  std::string coordinator_address_;
  std::string worker_address_;
  std::unique_ptr<ChildProcess> coordinator_;
  std::unique_ptr<ChildProcess> worker_;
  std::unique_ptr<v1::Inference::Stub> inference_;
  std::unique_ptr<v1::Cluster::Stub> cluster_;
  std::unique_ptr<internal::v1::Coordinator::Stub> internal_;
};

std::vector<int32_t> ParseIds(const std::string& line) {
  std::vector<int32_t> ids;
  for (absl::string_view item : absl::StrSplit(line, ' ', absl::SkipWhitespace())) {
    int32_t id = 0;
    if (absl::SimpleAtoi(item, &id)) ids.push_back(id);
  }
  return ids;
}

constexpr int64_t kNewTokens = 12;

TEST_F(ClusterTest, StreamedTokenIdsEqualGemmaGenerate) {
  const std::vector<std::vector<int32_t>> prompts = {{2, 17, 301}, {2, 45, 46, 47, 300, 11}};
  for (const std::vector<int32_t>& prompt : prompts) {
    int exit_code = -1;
    const std::string expected_text = RunTool(
        {"gemma-generate", "--model", kModel, "--tokens", absl::StrJoin(prompt, ","),
         "--max-new-tokens", std::to_string(kNewTokens), "--stop-at-eos", "--threads", "2"},
        &exit_code);
    ASSERT_EQ(exit_code, 0) << expected_text;
    const std::vector<int32_t> expected = ParseIds(expected_text);
    ASSERT_FALSE(expected.empty()) << expected_text;
    StreamResult result = Generate(*inference_, TokenRequest(prompt, kNewTokens));
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
    StreamResult result = Generate(*inference_, TokenRequest(prompts[i], kNewTokens));
    ASSERT_TRUE(result.status.ok()) << result.status.error_message();
    ASSERT_FALSE(result.ids.empty());
    single[i] = result.ids;
  }
  std::vector<StreamResult> concurrent(kStreams);
  std::vector<std::thread> threads;
  for (int i = 0; i < kStreams; ++i) {
    threads.emplace_back([&, i] {
      concurrent[i] = Generate(*inference_, TokenRequest(prompts[i], kNewTokens));
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
    StreamResult result = Generate(*inference_, request);
    EXPECT_EQ(result.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << name << ": " << result.status.error_message();
    EXPECT_FALSE(result.status.error_message().empty()) << name;
    EXPECT_TRUE(result.ids.empty()) << name;
  }
  StreamResult text_result = Generate(*inference_, text);
  EXPECT_NE(text_result.status.error_message().find("text is empty"), std::string::npos)
      << text_result.status.error_message();
  // The replica is still serving after the refusals.
  EXPECT_TRUE(Generate(*inference_, TokenRequest({2, 17}, 2)).status.ok());
}

TEST_F(ClusterTest, WorkerWithAnotherFingerprintIsRefused) {
  const v1::GetStatusResponse status = GetStatus();
  ASSERT_EQ(status.model_fingerprint().size(), 16u);
  internal::v1::RegisterRequest request;
  request.set_protocol_version(status.protocol_version());
  request.set_model_fingerprint("0123456789abcdef");
  request.set_address("127.0.0.1:1");
  internal::v1::RegisterResponse response;
  grpc::ClientContext context;
  context.set_deadline(In(seconds(2)));
  grpc::Status refused = internal_->Register(&context, request, &response);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(refused.error_message().find("0123456789abcdef"), std::string::npos)
      << refused.error_message();
  EXPECT_NE(refused.error_message().find(status.model_fingerprint()), std::string::npos)
      << refused.error_message();

  request.set_model_fingerprint(status.model_fingerprint());
  request.set_protocol_version(status.protocol_version() + 1);
  grpc::ClientContext context2;
  context2.set_deadline(In(seconds(2)));
  refused = internal_->Register(&context2, request, &response);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(refused.error_message().find("protocol version"), std::string::npos);
  EXPECT_EQ(GetStatus().replicas_size(), 1);
}

TEST_F(ClusterTest, GemmactlShowsStatusAndGenerates) {
  int exit_code = -1;
  std::string output =
      RunTool({"gemmactl", "--coordinator", coordinator_address_, "status"}, &exit_code);
  EXPECT_EQ(exit_code, 0) << output;
  EXPECT_NE(output.find(worker_address_), std::string::npos) << output;
  EXPECT_NE(output.find("healthy"), std::string::npos) << output;
  EXPECT_EQ(output.find("UNHEALTHY"), std::string::npos) << output;

  StreamResult expected = Generate(*inference_, TokenRequest({2, 17, 301}, 6));
  ASSERT_TRUE(expected.status.ok());
  output = RunTool({"gemmactl", "--coordinator", coordinator_address_, "generate", "--tokens",
                    "2,17,301", "--max-tokens", "6"},
                   &exit_code);
  EXPECT_EQ(exit_code, 0) << output;
  EXPECT_NE(output.find(absl::StrJoin(expected.ids, " ")), std::string::npos) << output;

  output = RunTool({"gemmactl", "--coordinator", coordinator_address_, "generate", "--tokens",
                    "2,100000"},
                   &exit_code);
  EXPECT_EQ(exit_code, 1) << output;
  EXPECT_NE(output.find("INVALID_ARGUMENT"), std::string::npos) << output;
}

TEST_F(ClusterTest, ClientDeadlineEndsTheReplicaCall) {
  v1::GenerateRequest request = TokenRequest({2, 17, 301}, 4000);
  grpc::ClientContext context;
  context.set_deadline(In(milliseconds(300)));
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader =
      inference_->Generate(&context, request);
  v1::GenerateResponse response;
  int num_responses = 0;
  while (reader->Read(&response)) ++num_responses;
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_GT(num_responses, 0);
  // The coordinator's call to the replica ends too, and the replica serves the next request.
  const Clock::time_point deadline = Clock::now() + seconds(5);
  int64_t outstanding = -1;
  while (Clock::now() < deadline) {
    outstanding = GetStatus().replicas(0).outstanding();
    if (outstanding == 0) break;
    std::this_thread::sleep_for(milliseconds(20));
  }
  EXPECT_EQ(outstanding, 0);
  StreamResult next = Generate(*inference_, TokenRequest({2, 17}, 3));
  EXPECT_TRUE(next.status.ok()) << next.status.error_message();
  EXPECT_EQ(next.ids.size(), 3u);
}

TEST_F(ClusterTest, ProcessesExitCleanlyOnSigterm) {
  worker_->Signal(SIGTERM);
  EXPECT_EQ(worker_->WaitForExitCode(milliseconds(8000)), 0);
  coordinator_->Signal(SIGTERM);
  EXPECT_EQ(coordinator_->WaitForExitCode(milliseconds(8000)), 0);
}

TEST(ClusterNoReplicaTest, CoordinatorWithoutReplicasAnswersUnavailable) {
  const std::string address = absl::StrCat("127.0.0.1:", testing::FreeLocalPort());
  ChildProcess coordinator({kBin + "gemma-coordinator", "--listen", address},
                           ::testing::TempDir() + "/lonely_coordinator_" + std::to_string(getpid()) + ".log");
  ASSERT_TRUE(WaitServing(address, Clock::now() + seconds(10)));
  auto stub = v1::Inference::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  StreamResult result = Generate(*stub, TokenRequest({2, 17}, 4));
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::UNAVAILABLE)
      << result.status.error_message();
  // A bad request is refused as such even without replicas.
  EXPECT_EQ(Generate(*stub, TokenRequest({2, 17}, -3)).status.error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
}

TEST(GemmactlTest, UnreachableCoordinatorIsAClearError) {
  const std::string address = absl::StrCat("127.0.0.1:", testing::FreeLocalPort());
  int exit_code = -1;
  const std::string output = RunTool(
      {"gemmactl", "--coordinator", address, "--connect-timeout-ms", "300", "status"}, &exit_code);
  EXPECT_EQ(exit_code, 1) << output;
  EXPECT_NE(output.find("cannot reach the coordinator at " + address), std::string::npos)
      << output;
}

}  // namespace
}  // namespace gemma
