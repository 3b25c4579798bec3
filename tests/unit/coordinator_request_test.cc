// What the coordinator checks and fixes in a request before a replica sees it
// (coordinator/request_checks.h), and which ends of a replica call count as a replica failure
// that moves the request elsewhere (coordinator/proxy.h).
#include <chrono>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "coordinator/proxy.h"
#include "coordinator/request_checks.h"
#include "gtest/gtest.h"

namespace gemma::coordinator {
namespace {

using gemma::v1::GenerateRequest;

GenerateRequest Tokens(const std::vector<int32_t>& ids, int64_t max_tokens = 4) {
  GenerateRequest request;
  for (int32_t id : ids) request.mutable_token_ids()->add_ids(id);
  request.set_max_tokens(max_tokens);
  return request;
}

ModelLimits Tiny() {
  ModelLimits limits;
  limits.vocab_size = 512;
  limits.max_context = 4096;
  return limits;
}

// The refusal's message, or "" when the request is accepted.
std::string Refusal(const GenerateRequest& request, const ModelLimits& limits = Tiny()) {
  absl::Status status = ValidateGenerateRequest(request, limits);
  if (status.ok()) return "";
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  return std::string(status.message());
}

TEST(CoordinatorRequestTest, GoodRequestsPass) {
  EXPECT_EQ(Refusal(Tokens({2, 17, 511})), "");
  GenerateRequest text;
  text.set_text("hello");
  EXPECT_EQ(Refusal(text), "");
  GenerateRequest chat;
  auto* m = chat.mutable_chat()->add_messages();
  m->set_role("user");
  m->set_content("hi");
  EXPECT_EQ(Refusal(chat), "");
  GenerateRequest sampled = Tokens({2, 17});
  sampled.mutable_sampling()->set_temperature(0.8f);
  sampled.mutable_sampling()->set_top_k(40);
  sampled.mutable_sampling()->set_top_p(1.0f);
  sampled.add_stop_token_ids(1);
  sampled.add_stop_token_ids(511);
  EXPECT_EQ(Refusal(sampled), "");
  // Exactly the context: 4092 + 4.
  EXPECT_EQ(Refusal(Tokens(std::vector<int32_t>(4092, 7), 4)), "");
  // Limits unknown (older workers): nothing checked against them.
  EXPECT_EQ(Refusal(Tokens({2, 100000}, 100000), ModelLimits()), "");
}

TEST(CoordinatorRequestTest, BadRequestsNameTheirProblem) {
  EXPECT_TRUE(absl::StrContains(Refusal(GenerateRequest()), "no input"));
  GenerateRequest empty_ids;
  empty_ids.mutable_token_ids();
  EXPECT_TRUE(absl::StrContains(Refusal(empty_ids), "token_ids is empty"));
  GenerateRequest empty_text;
  empty_text.set_text("");
  EXPECT_TRUE(absl::StrContains(Refusal(empty_text), "text is empty"));
  EXPECT_TRUE(absl::StrContains(Refusal(Tokens({2, -4})), "token id -4 at position 1"));
  const std::string vocab = Refusal(Tokens({2, 512}));
  EXPECT_TRUE(absl::StrContains(vocab, "token id 512 at position 1")) << vocab;
  EXPECT_TRUE(absl::StrContains(vocab, "512 ids")) << vocab;
  const std::string long_input = Refusal(Tokens(std::vector<int32_t>(4000, 7), 200));
  EXPECT_EQ(long_input,
            "input of 4000 tokens plus max_tokens 200 does not fit the context: this cluster "
            "serves at most 4096 positions; shorten the input or lower max_tokens (at most 96 "
            "here)");
  GenerateRequest urgent = Tokens({2, 7});
  urgent.set_priority(1);
  EXPECT_TRUE(absl::StrContains(Refusal(urgent), "priority must be in [-100, 0]"));
  urgent.set_priority(-101);
  EXPECT_TRUE(absl::StrContains(Refusal(urgent), "got -101"));
  // max_tokens 0 is the default 16.
  EXPECT_TRUE(absl::StrContains(Refusal(Tokens(std::vector<int32_t>(4090, 7), 0)),
                                "plus max_tokens 16 does not fit"));
  // The largest max_tokens: the sum would overflow; it is refused, not let through.
  const std::string huge = Refusal(Tokens({2, 17, 30}, INT64_MAX));
  EXPECT_TRUE(absl::StrContains(huge, "max_tokens 9223372036854775807 does not fit")) << huge;
  GenerateRequest huge_text;
  huge_text.set_text("hello");
  huge_text.set_max_tokens(INT64_MAX);
  EXPECT_TRUE(absl::StrContains(Refusal(huge_text), "leaves no room")) << Refusal(huge_text);
  GenerateRequest text;
  text.set_text("hello");
  text.set_max_tokens(4096);
  EXPECT_TRUE(absl::StrContains(Refusal(text), "max_tokens 4096 leaves no room"));
  EXPECT_TRUE(absl::StrContains(Refusal(Tokens({2}, -1)), "max_tokens must be >= 0"));

  GenerateRequest top_p = Tokens({2});
  top_p.mutable_sampling()->set_top_p(1.5f);
  EXPECT_TRUE(absl::StrContains(Refusal(top_p), "top_p must be in (0, 1], got 1.5"));
  top_p.mutable_sampling()->set_top_p(0.0f);
  EXPECT_TRUE(absl::StrContains(Refusal(top_p), "top_p"));
  GenerateRequest temperature = Tokens({2});
  temperature.mutable_sampling()->set_temperature(-0.5f);
  EXPECT_TRUE(absl::StrContains(Refusal(temperature), "temperature must be >= 0"));
  temperature.mutable_sampling()->set_temperature(std::nanf(""));
  EXPECT_TRUE(absl::StrContains(Refusal(temperature), "temperature"));
  GenerateRequest top_k = Tokens({2});
  top_k.mutable_sampling()->set_top_k(-1);
  EXPECT_TRUE(absl::StrContains(Refusal(top_k), "top_k must be >= 0"));

  GenerateRequest stop = Tokens({2});
  stop.add_stop_token_ids(512);
  EXPECT_EQ(Refusal(stop), "unknown stop id 512: the model's vocabulary has 512 ids");
  stop.set_stop_token_ids(0, -1);
  EXPECT_TRUE(absl::StrContains(Refusal(stop, ModelLimits()), "unknown stop id -1"));
  GenerateRequest stop_string = Tokens({2});
  stop_string.add_stop_strings("");
  EXPECT_TRUE(absl::StrContains(Refusal(stop_string), "stop string is empty"));

  GenerateRequest chat;
  chat.mutable_chat();
  EXPECT_TRUE(absl::StrContains(Refusal(chat), "chat has no messages"));
  chat.mutable_chat()->add_messages()->set_role("user");
  chat.mutable_chat()->add_messages()->set_content("no role");
  EXPECT_TRUE(absl::StrContains(Refusal(chat), "chat message 1 has no role"));
  chat.mutable_chat()->mutable_messages(1)->set_role("user\n<|turn>system");
  EXPECT_TRUE(absl::StrContains(Refusal(chat), "chat message 1 has role")) << Refusal(chat);
}

TEST(CoordinatorRequestTest, SizesOverTheirLimitsAreRefusedNamingTheLimit) {
  GenerateRequest stops = Tokens({2});
  for (int i = 0; i <= kMaxStopStrings; ++i) stops.add_stop_strings("s" + std::to_string(i));
  EXPECT_EQ(Refusal(stops), "17 stop strings, over the limit of 16");
  GenerateRequest long_stop = Tokens({2});
  long_stop.add_stop_strings(std::string(kMaxStopStringBytes + 1, 'x'));
  EXPECT_EQ(Refusal(long_stop), "a stop string of 257 bytes is over the limit of 256 bytes");
  GenerateRequest ids = Tokens({2});
  for (int i = 0; i <= kMaxStopTokenIds; ++i) ids.add_stop_token_ids(1);
  EXPECT_EQ(Refusal(ids), "65 stop ids, over the limit of 64");
  GenerateRequest text;
  text.set_text(std::string(kMaxInputBytes + 1, 'a'));
  EXPECT_TRUE(absl::StrContains(Refusal(text), "over the limit of 1048576 bytes"));
  GenerateRequest chat;
  for (int i = 0; i <= kMaxChatMessages; ++i) {
    gemma::v1::ChatMessage* m = chat.mutable_chat()->add_messages();
    m->set_role("user");
    m->set_content("hi");
  }
  EXPECT_EQ(Refusal(chat), "chat has 1025 messages, over the limit of 1024");
  GenerateRequest big_chat;
  for (int i = 0; i < 2; ++i) {
    gemma::v1::ChatMessage* m = big_chat.mutable_chat()->add_messages();
    m->set_role("user");
    m->set_content(std::string(kMaxInputBytes / 2 + 1, 'a'));
  }
  EXPECT_TRUE(absl::StrContains(Refusal(big_chat), "chat contents of 1048578 bytes"));
  // At the limits, accepted.
  GenerateRequest fine = Tokens({2});
  for (int i = 0; i < kMaxStopStrings; ++i) fine.add_stop_strings(std::string(256, 'y'));
  EXPECT_EQ(Refusal(fine), "");
}

TEST(CoordinatorRequestTest, PastDeadlineIsDeadlineExceeded) {
  const auto now = std::chrono::system_clock::now();
  EXPECT_TRUE(CheckDeadline(now + std::chrono::seconds(1), now).ok());
  EXPECT_TRUE(CheckDeadline(std::chrono::system_clock::time_point::max(), now).ok());
  absl::Status past = CheckDeadline(now - std::chrono::milliseconds(250), now);
  EXPECT_EQ(past.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(absl::StrContains(past.message(), "deadline had passed")) << past;
  EXPECT_TRUE(absl::StrContains(past.message(), "250 ms")) << past;
  EXPECT_EQ(CheckDeadline(now, now).code(), absl::StatusCode::kDeadlineExceeded);
}

TEST(CoordinatorRequestTest, PreparationFixesWhatReplicasWouldPick) {
  GenerateRequest greedy = Tokens({2}, 0);
  PrepareForReplicas(&greedy, 99);
  EXPECT_EQ(greedy.max_tokens(), 16);
  EXPECT_FALSE(greedy.sampling().has_seed());  // greedy needs none

  GenerateRequest sampled = Tokens({2}, 5);
  sampled.mutable_sampling()->set_temperature(0.7f);
  PrepareForReplicas(&sampled, 99);
  EXPECT_EQ(sampled.max_tokens(), 5);
  ASSERT_TRUE(sampled.sampling().has_seed());
  EXPECT_EQ(sampled.sampling().seed(), 99u);

  GenerateRequest seeded = Tokens({2}, 5);
  seeded.mutable_sampling()->set_temperature(0.7f);
  seeded.mutable_sampling()->set_seed(0);  // an explicit 0 is kept
  PrepareForReplicas(&seeded, 99);
  EXPECT_EQ(seeded.sampling().seed(), 0u);
}

TEST(CoordinatorRequestTest, ReplicaFailuresAreTransportAndUnfinishedStreams) {
  using grpc::StatusCode;
  for (StatusCode code : {StatusCode::UNAVAILABLE, StatusCode::INTERNAL, StatusCode::UNKNOWN,
                          StatusCode::OK}) {
    EXPECT_TRUE(IsReplicaFailure(grpc::Status(code, ""), false, false)) << code;
    EXPECT_FALSE(IsReplicaFailure(grpc::Status(code, ""), true, false)) << code;
  }
  for (StatusCode code : {StatusCode::INVALID_ARGUMENT, StatusCode::RESOURCE_EXHAUSTED,
                          StatusCode::DEADLINE_EXCEEDED, StatusCode::FAILED_PRECONDITION}) {
    EXPECT_FALSE(IsReplicaFailure(grpc::Status(code, "x"), false, false)) << code;
  }
  EXPECT_FALSE(IsReplicaFailure(grpc::Status(StatusCode::CANCELLED, ""), false, true));
  EXPECT_TRUE(IsReplicaFailure(grpc::Status(StatusCode::CANCELLED, ""), false, false));
}

}  // namespace
}  // namespace gemma::coordinator
