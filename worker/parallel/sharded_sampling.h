// Sampling over a vocabulary split across a tensor-parallel group, without gathering whole
// rows of logits: each shard's log-sum-exp pieces and its top candidates are gathered, widening
// the candidates only when a draw falls past them. Greedy and seeded draws equal those from the
// full logits (SamplingUniform, as every backend's sampler).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "common/sampling_params.h"
#include "worker/backend/backend.h"
#include "worker/parallel/communicator.h"

namespace gemma::parallel {

struct ShardedLogitsShape {
  int64_t rows = 0;          // logit rows
  int64_t local_vocab = 0;   // this rank's columns
  int64_t vocab_offset = 0;  // the vocabulary id of this rank's first column
  int64_t vocab = 0;         // the whole vocabulary
};

// One token per row of `logits` [rows, local_vocab] drawn under params[row]; every rank of
// `comm` calls it with its own shard and gets the same tokens.
absl::StatusOr<std::vector<int32_t>> SampleSharded(Backend& backend, Communicator& comm,
                                                   const Buffer& logits,
                                                   const ShardedLogitsShape& shape,
                                                   const std::vector<SamplingParams>& params);

}  // namespace gemma::parallel
