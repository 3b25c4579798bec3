// Expert parallelism across ranks (dp-ep): each rank sends its share of a layer's routed tokens
// to the ranks that hold a copy of their experts (eplb::Placement), runs its own slots on what
// arrives, and gets one result row per (token, expert) back, summed per token in logical-expert
// order, so where the experts sit never changes the order of the sum. Only the routing (ids and
// weights) goes through the host; activation rows are gathered, exchanged and summed in the
// backend's memory (device to device over NCCL; staged by the communicator's wrapper over Gloo
// or the in-process group).
#pragma once

#include <cstdint>
#include <functional>

#include "absl/status/status.h"
#include "eplb/placement.h"
#include "worker/backend/backend.h"
#include "worker/parallel/communicator.h"

namespace gemma::parallel {

struct ExpertDispatchShape {
  int64_t num_tokens = 0;  // T: the tokens of this rank's tp group in this step
  int64_t hidden = 0;      // H
  int64_t top_k = 0;       // experts per token (ids ascending per token)
  int layer = 0;           // the layer whose copies `copies` gives
  int tp_rank = 0;         // this rank dispatches tokens [T * tp_rank / tp_size, ...)
  int tp_size = 1;
};

// Runs this rank's slots on `rows` activation rows routed by (slots, weights) [rows, top_k]
// (local slot indices; -1 for none), writing [rows, H] weighted sums to `out`.
using LocalExperts = std::function<void(const Buffer& x, const Buffer& slots,
                                        const Buffer& weights, int64_t rows, int64_t top_k,
                                        Buffer& out)>;

// x_in [T, H], topk_ids / topk_weights [T, top_k] on `backend`; writes out [T, H]: each token of
// this rank's share gets the sum of its experts' outputs, the others zero (the tp all-reduce
// that follows fills them). Each (token, expert) goes to the copy eplb::ChooseCopy picks (this
// rank's own, else one on its node, else the copies in turn). Every rank of `comm` calls it for
// the same layer; `copies` and `topology` describe the same placement on all of them.
absl::Status DispatchExperts(Backend& backend, Communicator& comm,
                             const ExpertDispatchShape& shape, const eplb::CopyTable& copies,
                             const eplb::Topology& topology, const Buffer& topk_ids,
                             const Buffer& topk_weights, const Buffer& x_in, Buffer& out,
                             const LocalExperts& run_local);

}  // namespace gemma::parallel
