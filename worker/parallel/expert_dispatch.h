// Expert parallelism across ranks (dp-ep): each rank sends its share of a layer's routed tokens
// to the ranks that own their experts, runs its own experts on what arrives, and gets the
// partial results back, summed per token in expert order. Staged through host memory over any
// Communicator (Gloo, in-process, NCCL with host buffers).
#pragma once

#include <cstdint>
#include <functional>

#include "absl/status/status.h"
#include "worker/backend/backend.h"
#include "worker/parallel/communicator.h"

namespace gemma::parallel {

struct ExpertDispatchShape {
  int64_t num_tokens = 0;        // T: the tokens of this rank's tp group in this step
  int64_t hidden = 0;            // H
  int64_t top_k = 0;             // experts per token (ids ascending per token)
  int64_t experts_per_rank = 0;  // rank r owns experts [r * per_rank, (r + 1) * per_rank)
  int tp_rank = 0;               // this rank dispatches tokens [T * tp_rank / tp_size, ...)
  int tp_size = 1;
};

// Runs this rank's experts on `rows` activation rows routed by (ids, weights) [rows, top_k]
// (ids outside this rank's experts are -1), writing [rows, H] partial sums to `out`.
using LocalExperts = std::function<void(const Buffer& x, const Buffer& ids, const Buffer& weights,
                                        int64_t rows, Buffer& out)>;

// x_in [T, H], topk_ids / topk_weights [T, top_k] on `backend`; writes out [T, H]: each token of
// this rank's share gets the sum of its experts' outputs, the others zero (the tp all-reduce
// that follows fills them). Every rank of `comm` calls it for the same layer.
absl::Status DispatchExperts(Backend& backend, Communicator& comm,
                             const ExpertDispatchShape& shape, const Buffer& topk_ids,
                             const Buffer& topk_weights, const Buffer& x_in, Buffer& out,
                             const LocalExperts& run_local);

}  // namespace gemma::parallel
