// Step plans: deterministic serialization and hash, and the channel over an in-process control
// group of three ranks, including detection of dropped and corrupted plans.
#include "worker/parallel/step_plan.h"

#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "worker/parallel/in_process_communicator.h"

namespace gemma::parallel {
namespace {

StepPlan MakePlan(uint64_t sequence_number) {
  StepPlan plan;
  plan.sequence_number = sequence_number;
  plan.placement_epoch = 7 + sequence_number / 3;
  if (sequence_number % 3 == 0) plan.finished = {1000 + sequence_number - 2, 42};
  plan.entries = {{.sequence_id = 1000 + sequence_number,
                   .num_new_tokens = 6,
                   .start_position = 0,
                   .token_ids = {2, 10, 11, 12, 13, static_cast<int32_t>(sequence_number)},
                   .sample = false,
                   .all_logits = sequence_number % 2 == 1,
                   .sampling = {}},
                  {.sequence_id = 42,
                   .num_new_tokens = 1,
                   .start_position = 311,
                   .token_ids = {99},
                   .sample = true,
                   .sampling = {.temperature = 0.5f, .top_k = 0, .top_p = 1.0f, .seed = 3,
                                .request_key = 8, .position = 312}}};
  if (sequence_number % 2 == 1) plan.entries[1].sampling.seed.reset();
  plan.stop = sequence_number == 6;
  return plan;
}

TEST(StepPlanTest, SerializationRoundTripsAndIsDeterministic) {
  for (uint64_t s = 1; s <= 6; ++s) {
    const StepPlan plan = MakePlan(s);
    const std::string bytes = SerializeStepPlan(plan);
    EXPECT_EQ(bytes, SerializeStepPlan(MakePlan(s)));
    EXPECT_EQ(HashStepPlanBytes(bytes), HashStepPlanBytes(SerializeStepPlan(MakePlan(s))));
    absl::StatusOr<StepPlan> parsed = ParseStepPlan(bytes);
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, plan);
  }
  EXPECT_NE(HashStepPlanBytes(SerializeStepPlan(MakePlan(1))),
            HashStepPlanBytes(SerializeStepPlan(MakePlan(3))));
  // FNV-1a reference values.
  EXPECT_EQ(HashStepPlanBytes(""), 0xcbf29ce484222325ull);
  EXPECT_EQ(HashStepPlanBytes("a"), 0xaf63dc4c8601ec8cull);
}

TEST(StepPlanTest, TruncatedOrExtendedBytesAreDataLoss) {
  const std::string bytes = SerializeStepPlan(MakePlan(3));
  for (size_t len : {size_t{0}, size_t{3}, bytes.size() / 2, bytes.size() - 1}) {
    EXPECT_EQ(ParseStepPlan(bytes.substr(0, len)).status().code(), absl::StatusCode::kDataLoss)
        << "length " << len;
  }
  EXPECT_EQ(ParseStepPlan(bytes + "x").status().code(), absl::StatusCode::kDataLoss);
  // A huge element count must not allocate or read out of bounds.
  std::string lying = bytes;
  lying[20] = '\xff';
  lying[21] = '\xff';
  lying[22] = '\xff';
  lying[23] = '\x7f';
  EXPECT_EQ(ParseStepPlan(lying).status().code(), absl::StatusCode::kDataLoss);
}

// Runs the leader function on rank 0 and `follower` on ranks 1..2 of an in-process group.
void RunGroup(const std::function<void(StepPlanChannel&)>& leader,
              const std::function<void(int, StepPlanChannel&)>& follower) {
  InProcessGroup group(3, std::chrono::seconds(10));
  std::vector<std::unique_ptr<Communicator>> comms;
  for (int r = 0; r < 3; ++r) comms.push_back(group.communicator(r));
  std::vector<std::thread> threads;
  for (int r = 0; r < 3; ++r) {
    threads.emplace_back([&, r] {
      StepPlanChannel channel(comms[r].get());
      if (r == 0) {
        leader(channel);
      } else {
        follower(r, channel);
      }
    });
  }
  for (std::thread& t : threads) t.join();
}

TEST(StepPlanChannelTest, PlansArriveIntactOnEveryRank) {
  constexpr int kSteps = 6;
  std::vector<std::vector<StepPlan>> received(3);
  RunGroup(
      [](StepPlanChannel& channel) {
        for (uint64_t s = 1; s <= kSteps; ++s) ASSERT_TRUE(channel.Send(MakePlan(s)).ok());
      },
      [&](int rank, StepPlanChannel& channel) {
        for (int s = 1; s <= kSteps; ++s) {
          absl::StatusOr<StepPlan> plan = channel.Receive();
          ASSERT_TRUE(plan.ok()) << plan.status();
          received[rank].push_back(*plan);
        }
        EXPECT_EQ(channel.last_sequence_number(), static_cast<uint64_t>(kSteps));
      });
  for (int rank = 1; rank < 3; ++rank) {
    ASSERT_EQ(received[rank].size(), static_cast<size_t>(kSteps));
    for (int s = 0; s < kSteps; ++s) EXPECT_EQ(received[rank][s], MakePlan(s + 1));
  }
}

TEST(StepPlanChannelTest, SenderRefusesOutOfOrderPlans) {
  InProcessGroup group(1);
  std::unique_ptr<Communicator> comm = group.communicator(0);
  StepPlanChannel channel(comm.get());
  absl::Status status = channel.Send(MakePlan(2));
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
}

TEST(StepPlanChannelTest, DroppedPlanIsAGap) {
  std::vector<absl::Status> second(3);
  RunGroup(
      [](StepPlanChannel& channel) {
        ASSERT_TRUE(channel.Send(MakePlan(1)).ok());
        // Plan 2 is dropped: plan 3 goes out next.
        const std::string bytes = SerializeStepPlan(MakePlan(3));
        ASSERT_TRUE(channel.SendRawForTest(3, HashStepPlanBytes(bytes), bytes).ok());
      },
      [&](int rank, StepPlanChannel& channel) {
        ASSERT_TRUE(channel.Receive().ok());
        second[rank] = channel.Receive().status();
      });
  for (int rank = 1; rank < 3; ++rank) {
    EXPECT_EQ(second[rank].code(), absl::StatusCode::kFailedPrecondition) << second[rank];
    EXPECT_EQ(second[rank].message(), "step plan gap: expected 2 got 3");
  }
}

TEST(StepPlanChannelTest, CorruptedPlanIsAHashMismatch) {
  std::vector<absl::Status> second(3);
  RunGroup(
      [](StepPlanChannel& channel) {
        ASSERT_TRUE(channel.Send(MakePlan(1)).ok());
        std::string bytes = SerializeStepPlan(MakePlan(2));
        const uint64_t hash = HashStepPlanBytes(bytes);
        bytes[bytes.size() - 3] ^= 0x10;  // one flipped bit in transit
        ASSERT_TRUE(channel.SendRawForTest(2, hash, bytes).ok());
      },
      [&](int rank, StepPlanChannel& channel) {
        ASSERT_TRUE(channel.Receive().ok());
        second[rank] = channel.Receive().status();
        EXPECT_EQ(channel.last_sequence_number(), 1u);
      });
  for (int rank = 1; rank < 3; ++rank) {
    EXPECT_EQ(second[rank].code(), absl::StatusCode::kDataLoss) << second[rank];
    EXPECT_EQ(second[rank].message(), "step plan hash mismatch at step 2");
  }
}

}  // namespace
}  // namespace gemma::parallel
