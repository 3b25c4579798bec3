// The step plan: what the replica leader decided for one engine step (the tokens each sequence
// appends, at which position, which rows are sampled under which parameters, and the sequences
// that left the batch), its deterministic binary form
// and hash, and the channel that broadcasts it from rank 0 over the CPU control group.
// Knows nothing of the scheduler, the KV cache or the model: it carries ids and numbers only.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/sampling_params.h"
#include "worker/parallel/communicator.h"

namespace gemma::parallel {

// Work for one running sequence in this step.
struct StepEntry {
  uint64_t sequence_id = 0;
  int32_t num_new_tokens = 0;
  int32_t start_position = 0;
  // The tokens appended this step (num_new_tokens of them), and whether the last position is
  // sampled, under which parameters (every field, the request key and position included). A
  // follower meets a sequence id for the first time in the entry that starts it at position 0.
  std::vector<int32_t> token_ids;
  bool sample = false;
  // Every position's logits are kept (prompt scoring, gemma-forward); not sampled.
  bool all_logits = false;
  SamplingParams sampling;
  bool operator==(const StepEntry&) const = default;
};

struct StepPlan {
  uint64_t sequence_number = 0;  // 1 for the first plan of a channel, then +1 per step
  uint64_t placement_epoch = 0;  // expert placement the step runs with
  std::vector<uint64_t> finished;  // sequence ids leaving the batch
  std::vector<StepEntry> entries;
  bool stop = false;  // the replica is shutting down: followers leave their loop
  // A new expert placement (eplb::SerializePlacement) the ranks start loading in the background
  // now; the step whose placement_epoch is its epoch is the first to use it.
  std::string offered_placement;
  // After this step every rank of the group says whether the offered placement is loaded (one
  // all-reduce over the control group: the not-ready ranks, plus 1 << 20 per failed one).
  bool vote_placement = false;
  bool operator==(const StepPlan&) const = default;
};

// Little-endian, fixed-width, vectors as a u32 count then elements; identical plans give
// identical bytes.
std::string SerializeStepPlan(const StepPlan& plan);
// DATA_LOSS on truncated, oversized or trailing bytes.
absl::StatusOr<StepPlan> ParseStepPlan(absl::string_view bytes);
// 64-bit FNV-1a over `bytes`.
uint64_t HashStepPlanBytes(absl::string_view bytes);

// Broadcasts step plans from `root` (the replica leader) to every rank of a control group.
// Each plan is two broadcasts: a header [sequence number, hash, length] (3 x I64), then the bytes
// padded to whole I64 words. Receivers check the sequence number is exactly previous + 1 and the
// hash matches, so a rank that missed or misread a plan fails loudly instead of diverging.
// Not thread-safe; every rank must call Send/Receive once per step, in step order.
class StepPlanChannel {
 public:
  // `control` is not owned and must outlive the channel.
  explicit StepPlanChannel(Communicator* control, int root = 0);

  // Root only. FAILED_PRECONDITION if plan.sequence_number is not previous + 1 (first: 1).
  absl::Status Send(const StepPlan& plan);
  // Non-root only. FAILED_PRECONDITION "step plan gap: expected N got M", DATA_LOSS
  // "step plan hash mismatch at step N", or the communicator's error.
  absl::StatusOr<StepPlan> Receive();

  // Test hook for the root: broadcasts `bytes` under an arbitrary sequence number and hash, to
  // show that receivers detect dropped and corrupted plans. Does not advance the sender.
  absl::Status SendRawForTest(uint64_t sequence_number, uint64_t hash, absl::string_view bytes);

  // The last plan sent (root) or accepted (others); 0 before the first.
  uint64_t last_sequence_number() const { return last_sequence_number_; }

 private:
  absl::Status Broadcast(uint64_t sequence_number, uint64_t hash, absl::string_view bytes);

  Communicator* control_;
  int root_;
  uint64_t last_sequence_number_ = 0;
};

}  // namespace gemma::parallel
