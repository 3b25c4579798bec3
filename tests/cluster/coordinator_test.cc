// The gemma-coordinator binary on 127.0.0.1, driven through gRPC:
// - against fake replicas served by this process (scripted streams that fail after N tokens,
//   end without a final response, refuse the request, stop heartbeating, come back): failover
//   with re-queue (the client's stream goes on, no token lost or repeated, the replica that
//   takes over gets the prompt ids and the ids already streamed), the bound on attempts, the
//   bounded wait for a healthy replica, and request errors relayed without a re-queue;
// - against real gemma-workers (tiny-moe, one CPU rank each): bad requests refused with a
//   status and a message naming the problem, admission (RESOURCE_EXHAUSTED when full), and a
//   worker SIGKILLed mid-stream, its stream finished by another worker or by the same worker
//   restarted.
// Readiness is polled through grpc.health.v1 and Cluster.GetStatus; every call has a deadline.
#include <signal.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "glog/logging.h"
#include "grpcpp/generic/generic_stub.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "tests/cluster/cluster_harness.h"

namespace gemma::testing::cluster {
namespace {

namespace v1 = gemma::v1;
namespace iv1 = gemma::internal::v1;
using std::chrono::milliseconds;
using std::chrono::seconds;

// The replica (by address) that has `n` requests outstanding; "" when none.
std::string AddressWithOutstanding(Cluster& cluster, int64_t n) {
  const v1::GetStatusResponse status = cluster.Status();
  for (const v1::ReplicaStatus& r : status.replicas()) {
    if (r.outstanding() == n) return r.address();
  }
  return "";
}

// A gemma-coordinator in a cluster of its own (a fresh log directory each time one starts).
class CoordinatorTest : public ::testing::Test {
 protected:
  // Starts a coordinator with `flags`, replacing the one (and the workers) started before.
  void StartCoordinator(const std::vector<std::string>& flags = {}) {
    static int counter = 0;
    cluster_ = std::make_unique<Cluster>(absl::StrCat("coordinator_test_", counter++));
    std::string error;
    ASSERT_TRUE(cluster_->StartCoordinator(flags, &error)) << error;
  }
  bool WaitHealthyReplicas(int n, milliseconds timeout = milliseconds(15000)) {
    return cluster_->WaitHealthy(n, Clock::now() + timeout);
  }
  std::string CoordinatorLog() { return cluster_->Log("coordinator"); }
  void TearDown() override {
    if (cluster_ != nullptr && HasFailure()) LOG(INFO) << CoordinatorLog();
  }

  std::unique_ptr<Cluster> cluster_;
};

// ---------------------------------------------------------------------------------------------
// Fake replicas

constexpr char kFakeFingerprint[] = "fa4efa4efa4efa4e";

// The fake model: the next id is a hash of the seed and every id before it, so a stream resumed
// anywhere with the same seed goes on exactly as it would have.
// Ids are in [5, vocab_size), at most 504.
int32_t FakeNextToken(const std::vector<int32_t>& ids, uint64_t seed, int32_t vocab_size = 512) {
  uint64_t h = 1469598103934665603ull ^ seed;
  for (int32_t id : ids) {
    h ^= static_cast<uint32_t>(id);
    h *= 1099511628211ull;
  }
  return static_cast<int32_t>(5 + (h >> 17) % std::min<uint64_t>(500, vocab_size - 5));
}

std::vector<int32_t> FakeStream(std::vector<int32_t> prompt, uint64_t seed, int64_t n) {
  std::vector<int32_t> out;
  for (int64_t i = 0; i < n; ++i) {
    out.push_back(FakeNextToken(prompt, seed));
    prompt.push_back(out.back());
  }
  return out;
}

struct FakeOptions {
  int fail_after = -1;  // ids a failing call streams before it fails; -1: no call fails
  int failing_calls = 1000000;  // calls that fail; the later ones are served
  grpc::Status failure{grpc::StatusCode::UNAVAILABLE, "the fake replica broke"};  // OK: no final
  bool dies = false;  // stops heartbeating when it fails
  bool omit_final = false;  // streams every id but never a final response
  milliseconds token_interval{5};
  // A failing call that misbehaves instead of failing: streams an id outside the vocabulary,
  // or more ids than max_tokens.
  enum class Rogue { kNone, kBadId, kTooMany } rogue = Rogue::kNone;
  // A failing call that stops streaming (but stays open) instead of failing.
  bool hangs = false;
  int32_t vocab_size = 512;
  int64_t max_context = 4096;
};

// A replica whose calls fail after `fail_after` ids, and that stops heartbeating then.
FakeOptions Dying(int fail_after) {
  FakeOptions options;
  options.fail_after = fail_after;
  options.dies = true;
  return options;
}

// A replica leader served by this process: registers with the coordinator, heartbeats every
// 100 ms (registering again when the coordinator answers known = false), and streams the fake
// model's ids.
class FakeReplica final : public iv1::Replica::Service {
 public:
  FakeReplica(const std::string& coordinator, FakeOptions options) : options_(options) {
    failing_calls_left_ = options_.fail_after >= 0 ? options_.failing_calls : 0;
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(this);
    server_ = builder.BuildAndStart();
    CHECK(server_ != nullptr && port != 0);
    address_ = absl::StrCat("127.0.0.1:", port);
    stub_ = iv1::Coordinator::NewStub(
        grpc::CreateChannel(coordinator, grpc::InsecureChannelCredentials()));
    heartbeats_ = std::thread([this] { HeartbeatLoop(); });
  }
  ~FakeReplica() override {
    stop_.store(true);
    heartbeats_.join();
    server_->Shutdown(In(milliseconds(200)));
  }

  const std::string& address() const { return address_; }
  std::vector<iv1::ReplicaGenerateRequest> requests() {
    absl::MutexLock lock(&mutex_);
    return requests_;
  }
  // Heartbeats again after it "died", and serves every call from now on.
  void Revive() {
    absl::MutexLock lock(&mutex_);
    failing_calls_left_ = 0;
    alive_ = true;
  }

  grpc::Status Generate(grpc::ServerContext* context, const iv1::ReplicaGenerateRequest* call,
                        grpc::ServerWriter<iv1::ReplicaGenerateResponse>* writer) override {
    bool fail;
    {
      absl::MutexLock lock(&mutex_);
      requests_.push_back(*call);
      fail = failing_calls_left_ > 0;
      if (fail) --failing_calls_left_;
    }
    const v1::GenerateRequest& request = call->request();
    std::vector<int32_t> prompt;
    if (request.has_token_ids()) {
      prompt.assign(request.token_ids().ids().begin(), request.token_ids().ids().end());
    } else if (request.input_case() == v1::GenerateRequest::kText) {
      prompt.push_back(2);
      for (unsigned char c : request.text()) prompt.push_back(5 + c);
    } else {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "the fake replica needs an input");
    }
    const uint64_t seed =
        request.sampling().has_seed() ? request.sampling().seed() : std::random_device{}();
    const int64_t max_tokens = request.max_tokens() > 0 ? request.max_tokens() : 16;
    std::vector<int32_t> ids = prompt;
    ids.insert(ids.end(), call->resume_token_ids().begin(), call->resume_token_ids().end());
    int64_t generated = call->resume_token_ids_size();
    int streamed = 0;
    while (generated < max_tokens) {
      if (context->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
      if (fail && streamed == options_.fail_after && options_.rogue != FakeOptions::Rogue::kNone) {
        iv1::ReplicaGenerateResponse rogue;
        if (streamed == 0) rogue.mutable_prompt_token_ids()->Add(prompt.begin(), prompt.end());
        if (options_.rogue == FakeOptions::Rogue::kBadId) {
          rogue.mutable_response()->add_token_ids(options_.vocab_size + 7);
        } else {
          for (int64_t i = generated; i < max_tokens + 2; ++i) {
            rogue.mutable_response()->add_token_ids(FakeNextToken(ids, seed, options_.vocab_size));
          }
        }
        writer->Write(rogue);
        return grpc::Status::OK;
      }
      if (fail && streamed == options_.fail_after && options_.hangs) {
        while (!context->IsCancelled()) std::this_thread::sleep_for(milliseconds(10));
        return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled while hanging");
      }
      if (fail && streamed == options_.fail_after) {
        if (options_.dies) {
          absl::MutexLock lock(&mutex_);
          alive_ = false;
        }
        return options_.failure;
      }
      iv1::ReplicaGenerateResponse message;
      if (streamed == 0) message.mutable_prompt_token_ids()->Add(prompt.begin(), prompt.end());
      ids.push_back(FakeNextToken(ids, seed, options_.vocab_size));
      ++generated;
      ++streamed;
      message.mutable_response()->add_token_ids(ids.back());
      if (generated == max_tokens && !options_.omit_final) {
        v1::GenerateFinal* final = message.mutable_response()->mutable_final();
        final->set_finish_reason("max_tokens");
        final->set_prompt_tokens(static_cast<int64_t>(prompt.size()));
        final->set_generated_tokens(generated);
      }
      if (!writer->Write(message)) return grpc::Status(grpc::StatusCode::CANCELLED, "gone");
      std::this_thread::sleep_for(options_.token_interval);
    }
    return grpc::Status::OK;
  }

 private:
  void HeartbeatLoop() {
    std::string id;
    while (!stop_.load()) {
      bool alive;
      {
        absl::MutexLock lock(&mutex_);
        alive = alive_;
      }
      if (alive) {
        bool known = false;
        if (!id.empty()) {
          iv1::HeartbeatRequest beat;
          beat.set_replica_id(id);
          iv1::HeartbeatResponse reply;
          grpc::ClientContext context;
          context.set_deadline(In(milliseconds(500)));
          known = stub_->Heartbeat(&context, beat, &reply).ok() && reply.known();
        }
        if (!known) {
          iv1::RegisterRequest request;
          request.set_protocol_version(1);
          request.set_model_fingerprint(kFakeFingerprint);
          request.set_address(address_);
          request.set_vocab_size(options_.vocab_size);
          request.set_max_context(options_.max_context);
          request.set_world_size(1);
          request.set_parallel("single");
          iv1::RegisterResponse response;
          grpc::ClientContext context;
          context.set_deadline(In(milliseconds(500)));
          if (stub_->Register(&context, request, &response).ok()) id = response.replica_id();
        }
      }
      std::this_thread::sleep_for(milliseconds(100));
    }
  }

  const FakeOptions options_;
  std::string address_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<iv1::Coordinator::Stub> stub_;
  std::atomic<bool> stop_{false};
  absl::Mutex mutex_;
  std::vector<iv1::ReplicaGenerateRequest> requests_ ABSL_GUARDED_BY(mutex_);
  int failing_calls_left_ ABSL_GUARDED_BY(mutex_) = 0;
  bool alive_ ABSL_GUARDED_BY(mutex_) = true;
  std::thread heartbeats_;  // last: starts once the rest is built
};

class FakeReplicaTest : public CoordinatorTest {
 protected:
  // A fake replica, once the coordinator counts it healthy (they register in this order, and
  // the coordinator routes ties to the earliest registered).
  std::unique_ptr<FakeReplica> AddReplica(FakeOptions options = FakeOptions()) {
    const int healthy = cluster_->HealthyReplicas();
    auto replica = std::make_unique<FakeReplica>(cluster_->coordinator_address(), options);
    EXPECT_TRUE(WaitHealthyReplicas(healthy + 1)) << CoordinatorLog();
    return replica;
  }
};

// A sampled request without a seed: the coordinator picks one, so the stream after a failure
// goes on as the failed replica's would have.
TEST_F(FakeReplicaTest, FailedStreamResumesOnAnotherReplica) {
  StartCoordinator();
  FakeOptions failing;
  failing.fail_after = 3;
  failing.failing_calls = 1;
  std::unique_ptr<FakeReplica> a = AddReplica(failing);
  std::unique_ptr<FakeReplica> b = AddReplica();
  v1::GenerateRequest request = TokenRequest({2, 17, 301}, 12);
  request.mutable_sampling()->set_temperature(0.8f);
  request.set_request_id("resume-me");
  StreamResult result = Generate(cluster_->inference(), request);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();

  ASSERT_EQ(a->requests().size(), 1u);
  ASSERT_EQ(b->requests().size(), 1u);
  const iv1::ReplicaGenerateRequest first = a->requests()[0];
  const iv1::ReplicaGenerateRequest second = b->requests()[0];
  ASSERT_TRUE(first.request().sampling().has_seed());
  EXPECT_EQ(first.request().max_tokens(), 12);
  EXPECT_EQ(first.resume_token_ids_size(), 0);
  const uint64_t seed = first.request().sampling().seed();
  const std::vector<int32_t> expected = FakeStream({2, 17, 301}, seed, 12);
  EXPECT_EQ(result.ids, expected);  // nothing lost, nothing repeated
  ASSERT_TRUE(result.has_final);
  EXPECT_EQ(result.final.generated_tokens(), 12);
  EXPECT_EQ(result.final.prompt_tokens(), 3);
  // The replica that took over got the prompt as ids and the 3 ids already streamed.
  EXPECT_EQ(second.request().sampling().seed(), seed);
  EXPECT_EQ(second.request().max_tokens(), 12);
  EXPECT_EQ(second.request().request_id(), "resume-me");
  ASSERT_TRUE(second.request().has_token_ids());
  EXPECT_EQ(std::vector<int32_t>(second.request().token_ids().ids().begin(),
                                 second.request().token_ids().ids().end()),
            (std::vector<int32_t>{2, 17, 301}));
  EXPECT_EQ(std::vector<int32_t>(second.resume_token_ids().begin(),
                                 second.resume_token_ids().end()),
            std::vector<int32_t>(expected.begin(), expected.begin() + 3));

  v1::GetStatusResponse status = cluster_->Status();
  EXPECT_EQ(status.requests_requeued(), 1);
  EXPECT_EQ(status.requests_in_flight(), 0);
  // The failed replica was out at once; its next heartbeat is answered known = false, it
  // registers again and is back in rotation.
  EXPECT_TRUE(WaitHealthyReplicas(2, milliseconds(5000))) << CoordinatorLog();
  StreamResult again = Generate(cluster_->inference(), TokenRequest({2, 5}, 4));
  EXPECT_TRUE(again.status.ok()) << again.status.error_message();
  EXPECT_TRUE(absl::StrContains(CoordinatorLog(), "re-queued")) << CoordinatorLog();
}

// A replica that streams what no replica may (an id outside the vocabulary, more ids than
// max_tokens) is failed like a broken one: nothing of it reaches the client, the request moves
// on, and the client's stream is what a sound replica gives.
TEST_F(FakeReplicaTest, ARogueReplicasIdsAreCheckedAndItsRequestMovesOn) {
  for (auto rogue : {FakeOptions::Rogue::kBadId, FakeOptions::Rogue::kTooMany}) {
    StartCoordinator();  // a fresh one for each case
    FakeOptions options;
    options.fail_after = 2;
    options.failing_calls = 1;
    options.rogue = rogue;
    std::unique_ptr<FakeReplica> a = AddReplica(options);  // ties go to the first registered
    std::unique_ptr<FakeReplica> b = AddReplica();
    v1::GenerateRequest request = TokenRequest({2, 17, 301}, 8);
    request.mutable_sampling()->set_seed(11);
    StreamResult result = Generate(cluster_->inference(), request);
    ASSERT_EQ(a->requests().size(), 1u);
    ASSERT_EQ(b->requests().size(), 1u);
    ASSERT_TRUE(result.status.ok()) << result.status.error_message();
    EXPECT_EQ(result.ids, FakeStream({2, 17, 301}, 11, 8));
    EXPECT_TRUE(result.has_final);
    EXPECT_TRUE(absl::StrContains(CoordinatorLog(),
                                  rogue == FakeOptions::Rogue::kBadId
                                      ? "outside its vocabulary of 512"
                                      : "tokens for max_tokens 8"))
        << CoordinatorLog();
    EXPECT_GE(cluster_->Status().requests_requeued(), 1);
  }
}

// A replica that accepts a call and then streams nothing, its heartbeats fine, is caught by the
// progress watchdog: the request moves on and the client's stream completes.
TEST_F(FakeReplicaTest, AStalledStreamIsMovedOnByTheWatchdog) {
  StartCoordinator({"--stall-timeout-ms", "400"});
  FakeOptions stalls;
  stalls.fail_after = 2;
  stalls.failing_calls = 1;
  stalls.hangs = true;
  std::unique_ptr<FakeReplica> a = AddReplica(stalls);  // ties go to the first registered
  std::unique_ptr<FakeReplica> b = AddReplica();
  v1::GenerateRequest request = TokenRequest({2, 17, 301}, 8);
  request.mutable_sampling()->set_seed(5);
  StreamResult result = Generate(cluster_->inference(), request, std::chrono::seconds(20));
  ASSERT_EQ(a->requests().size(), 1u);
  ASSERT_EQ(b->requests().size(), 1u);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  EXPECT_EQ(result.ids, FakeStream({2, 17, 301}, 5, 8));
  EXPECT_TRUE(absl::StrContains(CoordinatorLog(), "streamed nothing for")) << CoordinatorLog();
}

TEST_F(FakeReplicaTest, TransportErrorsAndUnfinishedStreamsAreFailures) {
  struct Case {
    grpc::Status failure;
    int fail_after;
  };
  const std::vector<Case> cases = {
      {grpc::Status::OK, 2},  // ended without a final response
      {grpc::Status(grpc::StatusCode::INTERNAL, "stream reset"), 1},
      {grpc::Status(grpc::StatusCode::UNKNOWN, "?"), 4},
      {grpc::Status(grpc::StatusCode::UNAVAILABLE, "gone"), 0},  // before the first response
      {grpc::Status(grpc::StatusCode::CANCELLED, "shutting down"), 3},  // not by the client
  };
  for (const Case& c : cases) {
    StartCoordinator();  // a fresh one for each case
    FakeOptions failing;
    failing.fail_after = c.fail_after;
    failing.failure = c.failure;
    failing.failing_calls = 1;
    std::unique_ptr<FakeReplica> a = AddReplica(failing);
    std::unique_ptr<FakeReplica> b = AddReplica();
    v1::GenerateRequest request = TokenRequest({2, 9}, 8);
    request.mutable_sampling()->set_seed(77);
    StreamResult result = Generate(cluster_->inference(), request);
    ASSERT_TRUE(result.status.ok()) << c.failure.error_code() << ": "
                                    << result.status.error_message();
    EXPECT_EQ(result.ids, FakeStream({2, 9}, 77, 8)) << c.failure.error_code();
    ASSERT_EQ(b->requests().size(), 1u);
    EXPECT_EQ(b->requests()[0].resume_token_ids_size(), c.fail_after);
    EXPECT_EQ(cluster_->Status().requests_requeued(), 1);
  }
}

TEST_F(FakeReplicaTest, StreamWithEveryIdButNoFinalIsEndedByTheCoordinator) {
  StartCoordinator();
  FakeOptions no_final;
  no_final.omit_final = true;
  std::unique_ptr<FakeReplica> a = AddReplica(no_final);
  std::unique_ptr<FakeReplica> b = AddReplica();
  v1::GenerateRequest request = TokenRequest({2, 8}, 6);
  request.mutable_sampling()->set_seed(3);
  StreamResult result = Generate(cluster_->inference(), request);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  EXPECT_EQ(result.ids, FakeStream({2, 8}, 3, 6));
  ASSERT_TRUE(result.has_final);
  EXPECT_EQ(result.final.generated_tokens(), 6);
  EXPECT_EQ(result.final.prompt_tokens(), 2);
  EXPECT_TRUE(b->requests().empty());  // nothing left to resume
  EXPECT_EQ(cluster_->Status().requests_requeued(), 0);
}

TEST_F(FakeReplicaTest, FailureBeforeTheFirstResponseResendsTheRequestUnchanged) {
  StartCoordinator();
  FakeOptions failing;
  failing.fail_after = 0;
  std::unique_ptr<FakeReplica> a = AddReplica(failing);
  std::unique_ptr<FakeReplica> b = AddReplica();
  v1::GenerateRequest request;
  request.set_text("hi");
  request.set_max_tokens(5);
  StreamResult result = Generate(cluster_->inference(), request);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  EXPECT_EQ(result.ids.size(), 5u);
  ASSERT_EQ(b->requests().size(), 1u);
  EXPECT_EQ(b->requests()[0].request().text(), "hi");
  EXPECT_EQ(b->requests()[0].resume_token_ids_size(), 0);
  EXPECT_EQ(b->requests()[0].request().SerializeAsString(),
            a->requests()[0].request().SerializeAsString());
}

TEST_F(FakeReplicaTest, RequestErrorsAreRelayedNotRequeued) {
  for (grpc::StatusCode code : {grpc::StatusCode::INVALID_ARGUMENT,
                                grpc::StatusCode::RESOURCE_EXHAUSTED,
                                grpc::StatusCode::FAILED_PRECONDITION}) {
    StartCoordinator();  // a fresh one for each case
    FakeOptions refusing;
    refusing.fail_after = 0;
    refusing.failure = grpc::Status(code, "the replica's own words");
    std::unique_ptr<FakeReplica> a = AddReplica(refusing);
    std::unique_ptr<FakeReplica> b = AddReplica();
    v1::GenerateRequest text;
    text.set_text("a long text");
    StreamResult result = Generate(cluster_->inference(), text);
    EXPECT_EQ(result.status.error_code(), code);
    EXPECT_EQ(result.status.error_message(), "the replica's own words");
    EXPECT_TRUE(b->requests().empty());
    EXPECT_EQ(cluster_->Status().requests_requeued(), 0);
    EXPECT_EQ(cluster_->HealthyReplicas(), 2);  // nobody was blamed
  }
}

TEST_F(FakeReplicaTest, GivesUpAfterMaxAttempts) {
  StartCoordinator({"--max-attempts", "2"});
  FakeOptions failing;
  failing.fail_after = 1;
  std::unique_ptr<FakeReplica> a = AddReplica(failing);
  std::unique_ptr<FakeReplica> b = AddReplica(failing);
  std::unique_ptr<FakeReplica> c = AddReplica(failing);
  StreamResult result = Generate(cluster_->inference(), TokenRequest({2, 3}, 10));
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  const std::string& message = result.status.error_message();
  EXPECT_TRUE(absl::StrContains(message, "gave up after 2 attempts")) << message;
  EXPECT_TRUE(absl::StrContains(message, a->address() + " failed after 1 streamed token ("))
      << message;
  EXPECT_TRUE(absl::StrContains(message, "failed after 2 streamed tokens")) << message;
  EXPECT_TRUE(absl::StrContains(message, "the fake replica broke")) << message;
  // What was streamed before the failures reached the client, once.
  EXPECT_EQ(result.ids.size(), 2u);
  EXPECT_FALSE(result.has_final);
  EXPECT_EQ(cluster_->Status().requests_requeued(), 1);
}

TEST_F(FakeReplicaTest, NoReplicaLeftWaitsThenFailsSayingWhatHappened) {
  StartCoordinator({"--heartbeat-timeout-ms", "800"});
  std::unique_ptr<FakeReplica> a = AddReplica(Dying(2));
  const Clock::time_point start = Clock::now();
  StreamResult result = Generate(cluster_->inference(), TokenRequest({2, 3}, 10));
  const milliseconds elapsed = std::chrono::duration_cast<milliseconds>(Clock::now() - start);
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  const std::string& message = result.status.error_message();
  EXPECT_TRUE(absl::StrContains(message, a->address())) << message;
  EXPECT_TRUE(absl::StrContains(message, "failed after 2 streamed tokens")) << message;
  EXPECT_TRUE(absl::StrContains(message, "no healthy replica took the request over within 800 ms"))
      << message;
  EXPECT_GE(elapsed, milliseconds(800));
  EXPECT_EQ(result.ids.size(), 2u);
  EXPECT_EQ(cluster_->Status().requests_in_flight(), 0);
}

TEST_F(FakeReplicaTest, ReplicaThatComesBackTakesTheStreamOver) {
  StartCoordinator({"--heartbeat-timeout-ms", "10000"});
  std::unique_ptr<FakeReplica> a = AddReplica(Dying(3));
  v1::GenerateRequest request = TokenRequest({2, 3, 4}, 10);
  request.mutable_sampling()->set_seed(5);
  std::thread revive([&] {
    // Comes back (registers again) a while after its failure.
    PollUntil([&] { return cluster_->HealthyReplicas() == 0; }, milliseconds(5000));
    std::this_thread::sleep_for(milliseconds(300));
    a->Revive();
  });
  StreamResult result = Generate(cluster_->inference(), request);
  revive.join();
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  EXPECT_EQ(result.ids, FakeStream({2, 3, 4}, 5, 10));
  ASSERT_EQ(a->requests().size(), 2u);
  EXPECT_EQ(a->requests()[1].resume_token_ids_size(), 3);
  EXPECT_EQ(cluster_->Status().requests_requeued(), 1);
}

TEST_F(FakeReplicaTest, ClientDeadlineEndsTheWaitForAReplica) {
  StartCoordinator({"--heartbeat-timeout-ms", "10000"});
  std::unique_ptr<FakeReplica> a = AddReplica(Dying(1));
  StreamResult result =
      Generate(cluster_->inference(), TokenRequest({2, 3}, 10), milliseconds(600));
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_EQ(result.ids.size(), 1u);
  EXPECT_TRUE(
      PollUntil([&] { return cluster_->Status().requests_in_flight() == 0; }, milliseconds(3000)));
  // The coordinator is fine: a replica that comes back serves the next request.
  a->Revive();
  ASSERT_TRUE(WaitHealthyReplicas(1, milliseconds(5000)));
  EXPECT_TRUE(Generate(cluster_->inference(), TokenRequest({2, 3}, 3)).status.ok());
}

TEST_F(FakeReplicaTest, LimitsFromRegistrationRefuseBadRequests) {
  StartCoordinator();
  FakeOptions small;
  small.vocab_size = 100;
  small.max_context = 64;
  std::unique_ptr<FakeReplica> a = AddReplica(small);
  StreamResult vocab = Generate(cluster_->inference(), TokenRequest({2, 100}, 4));
  EXPECT_EQ(vocab.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(vocab.status.error_message(), "token id 100"))
      << vocab.status.error_message();
  v1::GenerateRequest stop = TokenRequest({2, 3}, 4);
  stop.add_stop_token_ids(100);
  StreamResult stop_result = Generate(cluster_->inference(), stop);
  EXPECT_EQ(stop_result.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(stop_result.status.error_message(),
            "unknown stop id 100: the model's vocabulary has 100 ids");
  StreamResult context =
      Generate(cluster_->inference(), TokenRequest(std::vector<int32_t>(60, 3), 5));
  EXPECT_EQ(context.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(context.status.error_message(),
            "input of 60 tokens plus max_tokens 5 does not fit the context: this cluster "
            "serves at most 64 positions; shorten the input or lower max_tokens (at most 4 "
            "here)");
  EXPECT_TRUE(a->requests().empty());
  StreamResult fits = Generate(cluster_->inference(), TokenRequest(std::vector<int32_t>(60, 3), 4));
  EXPECT_TRUE(fits.status.ok()) << fits.status.error_message();
}

// ---------------------------------------------------------------------------------------------
// A request body that is not the method's message: INVALID_ARGUMENT naming the method (gRPC's
// callback servers answer UNIMPLEMENTED with no message), and the coordinator serves on.

TEST_F(CoordinatorTest, UnparsableRequestIsInvalidArgumentNamingTheMethod) {
  ASSERT_NO_FATAL_FAILURE(StartCoordinator());
  auto channel =
      grpc::CreateChannel(cluster_->coordinator_address(), grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  // One request of raw bytes to `method`; its status.
  auto call = [&](const std::string& method, const std::string& body) {
    grpc::Slice slice(body);
    grpc::ByteBuffer request(&slice, 1);
    grpc::ClientContext context;
    context.set_deadline(In(seconds(10)));
    grpc::CompletionQueue queue;
    std::unique_ptr<grpc::GenericClientAsyncResponseReader> reader =
        stub.PrepareUnaryCall(&context, method, request, &queue);
    reader->StartCall();
    grpc::ByteBuffer response;
    grpc::Status status;
    reader->Finish(&response, &status, reinterpret_cast<void*>(1));
    void* tag = nullptr;
    bool ok = false;
    EXPECT_TRUE(queue.Next(&tag, &ok));
    queue.Shutdown();
    while (queue.Next(&tag, &ok)) {
    }
    return status;
  };
  // A length-delimited field whose length runs past the end, and a tag varint that never ends.
  for (const std::string& body : {std::string("\x0a\x7f\x01", 3), std::string(12, '\xff')}) {
    for (const char* method : {"/gemma.v1.Inference/Generate", "/gemma.v1.Cluster/GetStatus",
                               "/gemma.v1.Cluster/WatchExpertLoad"}) {
      SCOPED_TRACE(method);
      const grpc::Status status = call(method, body);
      EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
          << status.error_code() << ": " << status.error_message();
      EXPECT_TRUE(absl::StrContains(status.error_message(), "could not be parsed"))
          << status.error_message();
      EXPECT_TRUE(absl::StrContains(status.error_message(), method)) << status.error_message();
    }
  }
  // An unknown method is still UNIMPLEMENTED, and a good request is answered.
  EXPECT_EQ(call("/gemma.v1.Cluster/NoSuchMethod", "").error_code(),
            grpc::StatusCode::UNIMPLEMENTED);
  grpc::ClientContext context;
  v1::GetStatusResponse status_response;
  EXPECT_TRUE(cluster_->cluster().GetStatus(&context, v1::GetStatusRequest(), &status_response).ok());
}

// ---------------------------------------------------------------------------------------------
// The rendezvous store over gRPC

class StoreTest : public CoordinatorTest {
 protected:
  void SetUp() override { ASSERT_NO_FATAL_FAILURE(StartCoordinator()); }
  grpc::Status Set(const std::string& key, const std::string& value) {
    iv1::StoreSetRequest request;
    request.set_key(key);
    request.set_value(value);
    iv1::StoreSetResponse response;
    grpc::ClientContext context;
    context.set_deadline(In(seconds(5)));
    return cluster_->internal().StoreSet(&context, request, &response);
  }
  // The value, or the status's code and message.
  grpc::Status Get(const std::string& key, int64_t timeout_ms, std::string* value,
                   milliseconds deadline = milliseconds(10000)) {
    iv1::StoreGetRequest request;
    request.set_key(key);
    request.set_timeout_ms(timeout_ms);
    iv1::StoreGetResponse response;
    grpc::ClientContext context;
    context.set_deadline(In(deadline));
    grpc::Status status = cluster_->internal().StoreGet(&context, request, &response);
    *value = response.value();
    return status;
  }

};

TEST_F(StoreTest, SetGetAddAndDeleteOverGrpc) {
  ASSERT_TRUE(Set("replica-7/rank0", std::string("\x01\x00\x02", 3)).ok());
  std::string value;
  ASSERT_TRUE(Get("replica-7/rank0", 0, &value).ok());
  EXPECT_EQ(value, std::string("\x01\x00\x02", 3));

  // A get that waits is answered by a set from another client.
  std::thread setter([&] {
    std::this_thread::sleep_for(milliseconds(100));
    EXPECT_TRUE(Set("replica-7/rank1", "late").ok());
  });
  grpc::Status waited = Get("replica-7/rank1", 5000, &value);
  setter.join();
  ASSERT_TRUE(waited.ok()) << waited.error_message();
  EXPECT_EQ(value, "late");

  grpc::Status missing = Get("replica-7/never", 100, &value);
  EXPECT_EQ(missing.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(absl::StrContains(missing.error_message(), "replica-7/never"))
      << missing.error_message();

  for (int i = 1; i <= 3; ++i) {
    iv1::StoreAddRequest add;
    add.set_key("replica-7/joined");
    add.set_delta(1);
    iv1::StoreAddResponse added;
    grpc::ClientContext context;
    context.set_deadline(In(seconds(5)));
    ASSERT_TRUE(cluster_->internal().StoreAdd(&context, add, &added).ok());
    EXPECT_EQ(added.value(), i);
  }
  ASSERT_TRUE(Get("replica-7/joined", 0, &value).ok());
  EXPECT_EQ(value, "3");

  iv1::StoreDeletePrefixRequest del;
  del.set_prefix("replica-7/");
  iv1::StoreDeletePrefixResponse deleted;
  grpc::ClientContext context;
  context.set_deadline(In(seconds(5)));
  ASSERT_TRUE(cluster_->internal().StoreDeletePrefix(&context, del, &deleted).ok());
  EXPECT_EQ(deleted.deleted(), 3);
  EXPECT_EQ(Get("replica-7/rank0", 0, &value).error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);

  grpc::Status empty = Set("", "v");
  EXPECT_EQ(empty.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(empty.error_message(), "key is empty"));
  grpc::Status long_key = Set(std::string(5000, 'k'), "v");
  EXPECT_EQ(long_key.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(long_key.error_message(), "5000 bytes"));
  grpc::Status big = Set("big", std::string((1 << 20) + 1, 'v'));
  EXPECT_EQ(big.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  grpc::Status bad_timeout = Get("k", -5, &value);
  EXPECT_EQ(bad_timeout.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(bad_timeout.error_message(), "timeout_ms"));
}

TEST_F(StoreTest, ClientDeadlineEndsAWaitingGet) {
  std::string value;
  const Clock::time_point start = Clock::now();
  grpc::Status status = Get("k", 60000, &value, milliseconds(300));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_LT(Clock::now() - start, seconds(5));
  // The store still answers, and a later set is seen.
  ASSERT_TRUE(Set("k", "v").ok());
  ASSERT_TRUE(Get("k", 0, &value).ok());
  EXPECT_EQ(value, "v");
}

TEST_F(StoreTest, SigtermEndsWaitingCallsAndExitsCleanly) {
  std::string value;
  grpc::Status waiting;
  std::thread get([&] { waiting = Get("never", 60000, &value, milliseconds(60000)); });
  // A Generate waiting for a replica after its replica died.
  auto replica = std::make_unique<FakeReplica>(cluster_->coordinator_address(), Dying(1));
  ASSERT_TRUE(WaitHealthyReplicas(1));
  StreamResult generate;
  std::thread stream([&] { generate = Generate(cluster_->inference(), TokenRequest({2, 3}, 10)); });
  ASSERT_TRUE(PollUntil([&] { return cluster_->HealthyReplicas() == 0; }, seconds(5)));
  cluster_->coordinator().Signal(SIGTERM);
  EXPECT_EQ(cluster_->coordinator().WaitForExitCode(milliseconds(8000)), 0) << CoordinatorLog();
  get.join();
  stream.join();
  EXPECT_FALSE(waiting.ok());
  EXPECT_FALSE(generate.status.ok());
  EXPECT_EQ(generate.ids.size(), 1u);
}

// ---------------------------------------------------------------------------------------------
// Real workers

class RealClusterTest : public CoordinatorTest {
 protected:
  // A single-rank gemma-worker at `address` (a free port when empty); waits until the
  // coordinator counts `healthy_after` healthy replicas.
  void StartWorker(int healthy_after, std::string address = "") {
    if (address.empty()) address = absl::StrCat("127.0.0.1:", FreeLocalPort());
    const int index = cluster_->StartWorker(kTinyMoe, {"--listen", address, "--threads", "2"});
    addresses_.push_back(address);
    ASSERT_TRUE(WaitHealthyReplicas(healthy_after, milliseconds(30000)))
        << cluster_->Log(absl::StrCat("worker", index)) << CoordinatorLog();
  }

  std::vector<std::string> addresses_;  // of the workers, by index
};

TEST_F(RealClusterTest, BadRequestsAreRefusedNamingTheProblem) {
  StartCoordinator();
  StartWorker(1);
  struct Case {
    std::string name;
    v1::GenerateRequest request;
    std::vector<std::string> message_has;  // every one in the message
  };
  std::vector<Case> cases;
  cases.push_back({"no input", v1::GenerateRequest(), {"no input"}});
  v1::GenerateRequest empty_ids;
  empty_ids.mutable_token_ids();
  cases.push_back({"empty token_ids", empty_ids, {"token_ids is empty"}});
  v1::GenerateRequest empty_text;
  empty_text.set_text("");
  cases.push_back({"empty text", empty_text, {"text is empty"}});
  v1::GenerateRequest empty_chat;
  empty_chat.mutable_chat();
  cases.push_back({"empty chat", empty_chat, {"chat has no messages"}});
  // 4000 + 200 positions; the model has 4096. Refused by the coordinator when the worker sent
  // its max_context, else by the worker's engine: either message names the positions.
  cases.push_back({"too-long token input", TokenRequest(std::vector<int32_t>(4000, 7), 200),
                   {"4000 tokens plus max_tokens 200", "positions"}});
  v1::GenerateRequest top_p = TokenRequest({2, 17}, 4);
  top_p.mutable_sampling()->set_top_p(1.5f);
  cases.push_back({"top_p 1.5", top_p, {"top_p must be in (0, 1], got 1.5"}});
  v1::GenerateRequest temperature = TokenRequest({2, 17}, 4);
  temperature.mutable_sampling()->set_temperature(-0.5f);
  cases.push_back({"temperature -0.5", temperature, {"temperature must be >= 0", "-0.5"}});
  v1::GenerateRequest negative_stop = TokenRequest({2, 17}, 4);
  negative_stop.add_stop_token_ids(-3);
  cases.push_back({"negative stop id", negative_stop, {"unknown stop id -3"}});
  const v1::GetStatusResponse status = cluster_->Status();
  ASSERT_EQ(status.replicas_size(), 1);
  if (status.replicas(0).max_context() > 0) {
    // The worker registered its limits (vocabulary 512 ids).
    v1::GenerateRequest unknown_stop = TokenRequest({2, 17}, 4);
    unknown_stop.add_stop_token_ids(512);
    cases.push_back({"unknown stop id", unknown_stop,
                     {"unknown stop id 512: the model's vocabulary has 512 ids"}});
  } else {
    LOG(WARNING) << "the worker registered no limits; the unknown stop id case is skipped";
  }
  for (const Case& c : cases) {
    StreamResult result = Generate(cluster_->inference(), c.request);
    EXPECT_EQ(result.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << c.name << ": " << result.status.error_message();
    for (const std::string& part : c.message_has) {
      EXPECT_TRUE(absl::StrContains(result.status.error_message(), part))
          << c.name << ": " << result.status.error_message() << " has no '" << part << "'";
    }
    EXPECT_TRUE(result.ids.empty()) << c.name;
  }

  // A deadline already past: DEADLINE_EXCEEDED (from the client's own library, which does not
  // send such a call; the coordinator refuses one that arrives past its deadline the same way).
  {
    grpc::ClientContext context;
    context.set_deadline(In(milliseconds(-1000)));
    auto reader = cluster_->inference().Generate(&context, TokenRequest({2, 17}, 4));
    v1::GenerateResponse response;
    EXPECT_FALSE(reader->Read(&response));
    grpc::Status past = reader->Finish();
    EXPECT_EQ(past.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
    EXPECT_TRUE(absl::StrContains(absl::AsciiStrToLower(past.error_message()), "deadline"))
        << past.error_message();
  }
  // Nothing was blamed on the replica, which still serves.
  StreamResult ok = Generate(cluster_->inference(), TokenRequest({2, 17}, 3));
  EXPECT_TRUE(ok.status.ok()) << ok.status.error_message();
  EXPECT_EQ(ok.ids.size(), 3u);
  EXPECT_EQ(cluster_->Status().requests_requeued(), 0);
}

TEST_F(RealClusterTest, FullClusterIsResourceExhausted) {
  StartCoordinator({"--max-outstanding-per-replica", "1", "--queue-wait-ms", "0"});
  StartWorker(1);
  EXPECT_EQ(cluster_->Status().max_outstanding_per_replica(), 1);
  const std::string replica_id = cluster_->Status().replicas(0).id();
  // A long request in flight.
  grpc::ClientContext long_context;
  long_context.set_deadline(In(seconds(60)));
  auto long_reader =
      cluster_->inference().Generate(&long_context, TokenRequest({2, 17, 301}, 4000));
  v1::GenerateResponse response;
  ASSERT_TRUE(long_reader->Read(&response));
  StreamResult refused = Generate(cluster_->inference(), TokenRequest({2, 17}, 4));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << refused.status.error_message();
  EXPECT_TRUE(absl::StrContains(refused.status.error_message(),
                                "the cluster is full: 1 requests in flight on 1 healthy replica "
                                "(limit 1 each); retry later or add replicas"))
      << refused.status.error_message();
  EXPECT_EQ(cluster_->Status().requests_in_flight(), 1);
  long_context.TryCancel();
  while (long_reader->Read(&response)) {
  }
  EXPECT_EQ(long_reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  // Admission opens again once the replica's call has ended.
  ASSERT_TRUE(
      PollUntil([&] { return AddressWithOutstanding(*cluster_, 0) != ""; }, milliseconds(5000)));
  StreamResult admitted = Generate(cluster_->inference(), TokenRequest({2, 17}, 4));
  EXPECT_TRUE(admitted.status.ok()) << admitted.status.error_message();
  // The client's cancellation was not blamed on the replica.
  const v1::GetStatusResponse status = cluster_->Status();
  EXPECT_EQ(status.requests_requeued(), 0);
  ASSERT_EQ(status.replicas_size(), 1);
  EXPECT_EQ(status.replicas(0).id(), replica_id);
  EXPECT_TRUE(status.replicas(0).healthy());
}

// With every replica full a request waits in the admission queue instead of being refused,
// and runs once a slot frees; past the queue's bound the next is refused at once, saying so.
TEST_F(RealClusterTest, AdmissionQueueHoldsARequestUntilAReplicaFrees) {
  const std::string http = absl::StrCat("127.0.0.1:", FreeLocalPort());
  StartCoordinator({"--max-outstanding-per-replica", "1", "--queue-wait-ms", "30000",
                    "--max-queued", "1", "--http-listen", http});
  httplib::Client scraper("127.0.0.1", std::stoi(http.substr(http.rfind(':') + 1)));
  auto metric = [&](const std::string& sample) {
    auto scraped = scraper.Get("/metrics");
    if (!scraped || scraped->status != 200) return -1.0;
    for (absl::string_view line : absl::StrSplit(scraped->body, '\n')) {
      double v = 0;
      if (absl::StartsWith(line, sample + " ") &&
          absl::SimpleAtod(line.substr(sample.size() + 1), &v)) {
        return v;
      }
    }
    return 0.0;
  };
  StartWorker(1);
  grpc::ClientContext long_context;
  long_context.set_deadline(In(seconds(60)));
  auto long_reader =
      cluster_->inference().Generate(&long_context, TokenRequest({2, 17, 301}, 4000));
  v1::GenerateResponse response;
  ASSERT_TRUE(long_reader->Read(&response));
  StreamResult queued;
  std::thread waiter([&] { queued = Generate(cluster_->inference(), TokenRequest({2, 17}, 4)); });
  ASSERT_TRUE(PollUntil([&] { return cluster_->Status().requests_queued() == 1; },
                        milliseconds(10000)));
  StreamResult refused = Generate(cluster_->inference(), TokenRequest({2, 18}, 4));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_TRUE(absl::StrContains(refused.status.error_message(),
                                "the admission queue is full (1 requests waiting)"))
      << refused.status.error_message();
  // Both in the metrics: the queue (what an autoscaler reads) and the refusal.
  EXPECT_EQ(metric("gemma:num_requests_queued"), 1);
  EXPECT_EQ(metric("gemma:request_failure_total{model_name=\"gemma-4\",reason=\"resource_exhausted\"}"),
            1);
  long_context.TryCancel();
  while (long_reader->Read(&response)) {
  }
  waiter.join();
  EXPECT_TRUE(queued.status.ok()) << queued.status.error_message();
  EXPECT_FALSE(queued.ids.empty());
  EXPECT_EQ(cluster_->Status().requests_queued(), 0);
  EXPECT_EQ(metric("gemma:num_requests_queued"), 0);
}

// Streams `request`, SIGKILLs the worker serving it after a few ids (then runs `after_kill`),
// and returns what the client got.
StreamResult StreamAndKill(Cluster& cluster, const v1::GenerateRequest& request,
                           const std::vector<std::string>& addresses,
                           const std::function<void(const std::string&)>& after_kill) {
  bool killed = false;
  return Generate(cluster.inference(), request, seconds(60), [&](const StreamResult& result) {
    if (killed || result.ids.size() < 5) return;
    killed = true;
    const std::string serving = AddressWithOutstanding(cluster, 1);
    EXPECT_FALSE(serving.empty());
    for (size_t i = 0; i < addresses.size(); ++i) {
      if (addresses[i] == serving) {
        LOG(INFO) << "SIGKILL the worker at " << serving << " after " << result.ids.size()
                  << " ids";
        cluster.worker(static_cast<int>(i)).Kill();
      }
    }
    after_kill(serving);
  });
}

v1::GenerateRequest LongSampledRequest() {
  v1::GenerateRequest request = TokenRequest({2, 17, 301}, 3000);
  request.mutable_sampling()->set_temperature(1.0f);
  request.mutable_sampling()->set_seed(1234);
  return request;
}

TEST_F(RealClusterTest, KilledWorkersStreamIsFinishedByAnother) {
  StartCoordinator();
  StartWorker(1);
  StartWorker(2);
  const v1::GenerateRequest request = LongSampledRequest();
  const StreamResult expected = Generate(cluster_->inference(), request);
  ASSERT_TRUE(expected.status.ok()) << expected.status.error_message();
  ASSERT_GE(expected.ids.size(), 100u) << "the reference stream ended early";
  StreamResult result = StreamAndKill(*cluster_, request, addresses_, [](const std::string&) {});
  ASSERT_TRUE(result.status.ok()) << result.status.error_message() << CoordinatorLog();
  EXPECT_EQ(result.ids.size(), expected.ids.size());
  EXPECT_EQ(result.ids, expected.ids);
  EXPECT_EQ(result.final.generated_tokens(), expected.final.generated_tokens());
  const v1::GetStatusResponse status = cluster_->Status();
  EXPECT_EQ(status.requests_requeued(), 1) << CoordinatorLog();
  EXPECT_EQ(status.requests_in_flight(), 0);
}

TEST_F(RealClusterTest, RestartedWorkerTakesItsStreamOver) {
  // The wait for a healthy replica after a failure is the heartbeat timeout: long enough for
  // the worker to start again.
  StartCoordinator({"--heartbeat-timeout-ms", "30000"});
  const std::string address = absl::StrCat("127.0.0.1:", FreeLocalPort());
  StartWorker(1, address);
  const v1::GenerateRequest request = LongSampledRequest();
  const StreamResult expected = Generate(cluster_->inference(), request);
  ASSERT_TRUE(expected.status.ok()) << expected.status.error_message();
  ASSERT_GE(expected.ids.size(), 100u) << "the reference stream ended early";
  // The worker started again at the same address, with the same flags.
  StreamResult result = StreamAndKill(*cluster_, request, addresses_,
                                      [&](const std::string&) { cluster_->RestartWorker(0); });
  ASSERT_TRUE(result.status.ok()) << result.status.error_message() << CoordinatorLog()
                                  << cluster_->Log("worker0");
  EXPECT_EQ(result.ids, expected.ids);
  const v1::GetStatusResponse status = cluster_->Status();
  EXPECT_EQ(status.requests_requeued(), 1);
  ASSERT_EQ(status.replicas_size(), 1);  // the new registration replaced the failed one
  EXPECT_TRUE(status.replicas(0).healthy());
}

// A coordinator SIGKILLed and restarted on its port issues replica ids from r1 again; every
// worker must be back in rotation, under its own id, after each restart (an id alone used to let
// a worker's stale heartbeats pass for another's). Five restarts with three workers.
TEST_F(RealClusterTest, EveryWorkerIsBackAfterEachCoordinatorRestart) {
  StartCoordinator({"--heartbeat-timeout-ms", "1500", "--forget-after-ms", "4000"});
  for (int w = 0; w < 3; ++w) StartWorker(w + 1);
  for (int restart = 0; restart < 5; ++restart) {
    std::string error;
    ASSERT_TRUE(cluster_->RestartCoordinator(&error)) << error;
    // Every worker's address registered, each once, all healthy.
    std::set<std::string> listed;
    const bool back = PollUntil(
        [&] {
          listed.clear();
          int healthy = 0;
          const gemma::v1::GetStatusResponse status = cluster_->Status();
          for (const auto& r : status.replicas()) {
            listed.insert(r.address());
            healthy += r.healthy() ? 1 : 0;
          }
          return healthy == 3 && listed == std::set<std::string>(addresses_.begin(),
                                                                 addresses_.end());
        },
        milliseconds(15000));
    ASSERT_TRUE(back) << "restart " << restart << ": listed " << listed.size()
                      << " of 3 addresses\n" << CoordinatorLog();
    // And they serve.
    StreamResult result = Generate(cluster_->inference(), TokenRequest({2, 17, 301}, 2));
    ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  }
}

// The coordinator SIGKILLed under streaming clients: gemmactl and the official OpenAI client
// each end at once with an error that says the stream was cut (neither hangs nor passes a short
// answer off as whole), and so do the gRPC streams beside them; after a restart the worker is
// back and serves.
TEST_F(RealClusterTest, ACoordinatorKilledMidStreamGivesStreamingClientsAClearError) {
  const std::string http = absl::StrCat("127.0.0.1:", FreeLocalPort());
  // Heartbeats stop while the worker is frozen: not for long enough to count.
  StartCoordinator({"--http-listen", http, "--heartbeat-timeout-ms", "30000"});
  const int index = cluster_->StartWorker(kTinyMoe, {"--threads", "1"});
  ASSERT_TRUE(WaitHealthyReplicas(1, milliseconds(30000))) << cluster_->Log("worker0");
  // The prompt runs to max_tokens on the tiny checkpoint (no end id on the way), and the tiny
  // model streams a thousand tokens in well under a second: the worker is frozen (SIGSTOP)
  // while the clients start (the OpenAI client, gemmactl and six gRPC streams, all within the
  // worker's 16384 cached positions), thawed until each has streamed, and frozen again, so
  // that every stream is in flight when the coordinator dies.
  std::vector<pid_t> worker_pids = cluster_->RankPids(index);
  worker_pids.push_back(cluster_->worker(index).pid());
  auto freeze = [&](bool frozen) {
    for (pid_t pid : worker_pids) kill(pid, frozen ? SIGSTOP : SIGCONT);
  };
  const std::string script = WriteFile(cluster_->dir() + "/stream.py", R"(
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="-", max_retries=0)
chunks = 0
try:
    stream = client.completions.create(model="gemma-4", prompt=[2, 17, 301], max_tokens=3900,
                                       stream=True)
    for chunk in stream:
        chunks += 1
        print("chunk", chunks, flush=True)
    print("finished after", chunks, "chunks", flush=True)
except Exception as error:
    print("error after", chunks, "chunks:", type(error).__name__, error, flush=True)
    sys.exit(3)
)");
  const std::string py_out = cluster_->dir() + "/openai.out";
  freeze(true);
  ChildProcess openai({GEMMA_TEST_PYTHON, script, absl::StrCat("http://", http, "/v1")}, py_out);
  std::vector<std::thread> threads;
  std::vector<grpc::Status> statuses(6);
  std::atomic<int> streaming{0};
  ThreadJoiner joiner([&] { freeze(false); }, &threads);
  for (int i = 0; i < 6; ++i) {
    threads.emplace_back([&, i] {
      bool counted = false;
      statuses[i] = Generate(cluster_->inference(), TokenRequest({2, 17, 301}, 1000),
                             milliseconds(120000),
                             [&](const StreamResult& so_far) {
                               if (!counted && !so_far.ids.empty()) {
                                 counted = true;
                                 streaming.fetch_add(1);
                               }
                             })
                        .status;
    });
  }
  const std::string out = cluster_->dir() + "/gemmactl.out";
  ChildProcess gemmactl({kBin + "gemmactl", "--coordinator", cluster_->coordinator_address(),
                         "generate", "--tokens", "2,17,301", "--max-tokens", "1000"},
                        out);
  // Every request sent to the replica (the status counts them), then a few steps each.
  ASSERT_TRUE(PollUntil(
      [&] {
        const gemma::v1::GetStatusResponse status = cluster_->Status();
        return status.replicas_size() == 1 && status.replicas(0).outstanding() == 8;
      },
      milliseconds(30000)))
      << cluster_->Status().DebugString() << ReadFileToString(py_out);
  freeze(false);
  ASSERT_TRUE(PollUntil(
      [&] {
        return ReadFileToString(out).size() > 10 && streaming.load() == 6 &&
               absl::StrContains(ReadFileToString(py_out), "chunk 1");
      },
      milliseconds(30000)))
      << ReadFileToString(out) << streaming.load() << ReadFileToString(py_out);
  freeze(true);
  cluster_->coordinator().Kill();
  const auto killed = Clock::now();

  EXPECT_EQ(gemmactl.WaitForExitCode(milliseconds(10000)), 1) << ReadFileToString(out);
  const std::string said = ReadFileToString(out);
  EXPECT_TRUE(absl::StrContains(said, "the connection to the coordinator at " +
                                          cluster_->coordinator_address() + " was lost after"))
      << said;
  EXPECT_TRUE(absl::StrContains(said, "the output above is incomplete")) << said;
  EXPECT_EQ(openai.WaitForExitCode(milliseconds(10000)), 3) << ReadFileToString(py_out);
  EXPECT_TRUE(absl::StrContains(ReadFileToString(py_out), "error after"))
      << ReadFileToString(py_out);
  for (std::thread& t : threads) t.join();
  for (const grpc::Status& status : statuses) {
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  }
  EXPECT_LT(Clock::now() - killed, std::chrono::seconds(10));
  freeze(false);

  std::string error;
  ASSERT_TRUE(cluster_->RestartCoordinator(&error)) << error;
  ASSERT_TRUE(WaitHealthyReplicas(1, milliseconds(15000)))
      << cluster_->Log(absl::StrCat("worker", index)) << CoordinatorLog();
  StreamResult again = Generate(cluster_->inference(), TokenRequest({2, 17, 301}, 8));
  EXPECT_TRUE(again.status.ok()) << again.status.error_message();
  EXPECT_EQ(again.ids, GemmaGenerate(kTinyMoe, {2, 17, 301}, 8));
}

}  // namespace
}  // namespace gemma::testing::cluster
