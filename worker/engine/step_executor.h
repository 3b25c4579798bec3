// The seam between the engine loop and the model: one step's batch (which tokens of which
// sequence, into which pages, sampled how) and the executor that runs it. The single-rank
// executor calls the model directly; a multi-rank one broadcasts the step plan first.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/backend/backend.h"
#include "worker/model/gemma4/kv_cache.h"
#include "worker/model/gemma4/model.h"

namespace gemma::engine {

// One sequence's share of a step: `tokens` go to positions kv->length, ... (the scheduler has
// already grown kv's pages to cover them). When `sample` is set the last position's logits are
// sampled under `sampling` (whose position is kv->length + tokens.size()). When `all_logits` is
// set instead, every position's logits are kept for Model::LogitsToHost (prompt scoring); the
// caller then reads them with LogitsToHost, a gather in which a replica's followers take part.
struct StepEntry {
  uint64_t sequence_id = 0;
  std::span<const int32_t> tokens;
  SequenceKv* kv = nullptr;
  bool sample = false;
  bool all_logits = false;
  SamplingParams sampling;

  gemma4::LogitsMode logits_mode() const { return gemma4::LogitsModeOf(sample, all_logits); }
};

struct StepBatch {
  uint64_t step_number = 0;  // 1 for the first step, then +1 per executed step
  std::vector<StepEntry> entries;
  // Sequences whose pages were all released since the previous batch (finished, cancelled or
  // preempted): what a multi-rank executor must tell its followers to forget.
  std::vector<uint64_t> released;
};

class StepExecutor {
 public:
  virtual ~StepExecutor() = default;
  // Runs one forward call over `batch` and returns one token per entry with `sample` set, in
  // entry order. Advances each entry's kv->length by its token count. Called from the engine's
  // stepping thread only.
  virtual absl::StatusOr<std::vector<int32_t>> Execute(const StepBatch& batch,
                                                       KvCache& cache) = 0;
};

// Runs the batch on one rank: Model::Forward, then Model::Sample of the rows that sample.
class SingleRankExecutor : public StepExecutor {
 public:
  explicit SingleRankExecutor(gemma4::Model* model) : model_(model) {}
  absl::StatusOr<std::vector<int32_t>> Execute(const StepBatch& batch, KvCache& cache) override;

 private:
  gemma4::Model* model_;  // not owned
  std::vector<gemma4::SequenceStep> steps_;
  std::vector<SamplingParams> params_;
};

}  // namespace gemma::engine
