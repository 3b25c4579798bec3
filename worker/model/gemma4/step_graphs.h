// The bookkeeping of step graphs (recorded decode steps replayed on a backend that has them,
// CUDA): the key of a step's shape, the fixed input buffers each graph was recorded on, the KV
// storage they refer to, and the choice between recording and replaying. The model decides
// which steps qualify and what a step runs.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "worker/backend/backend.h"
#include "worker/model/gemma4/kv_cache.h"

namespace gemma::gemma4 {

// Device copies of one step's metadata.
struct StepInputs {
  BufferPtr token_ids, positions, query_start, seq_lens, rows;
  BufferPtr page_tables[2], slots[2];
};

class StepGraphs {
 public:
  explicit StepGraphs(Backend& backend) : backend_(backend) {}
  // Drops the backend's graphs if this model recorded any: a graph holding a communicator's
  // collectives keeps NCCL from destroying that communicator while it lives.
  ~StepGraphs();
  StepGraphs(const StepGraphs&) = delete;
  StepGraphs& operator=(const StepGraphs&) = delete;

  // One graph serves every page-table width up to the next power of two (the kernels read a
  // sequence's pages up to its length only; the rest of its row is -1).
  static int64_t RoundPages(int64_t max_pages);

  // The inputs a step of this shape replays on, with `reuse` set when they already hold buffers
  // (write the step's values into them; otherwise allocate them). Nothing when the shape does
  // not fit a key. A cache other than the one the graphs were recorded on drops them all, as
  // does a 65th shape.
  struct Slot {
    StepInputs* inputs = nullptr;
    bool reuse = false;
    int64_t key = 0;
  };
  std::optional<Slot> Acquire(int64_t num_seqs, int64_t max_pages, int64_t num_rows,
                              KvCache& cache, int num_layers);

  // Records `step` under the slot's key when its inputs are new (or the backend lost the
  // graph), then replays it. A recording whose step failed is never kept (whatever the backend
  // made of it): every graph and input is dropped.
  absl::Status Run(const Slot& slot, const std::function<absl::Status()>& step);

  void Drop();
  int64_t captures() const { return captures_; }
  int64_t replays() const { return replays_; }

 private:
  Backend& backend_;
  std::map<int64_t, StepInputs> inputs_;
  // The KV storage the graphs were recorded on (page size, each layer's addresses).
  std::vector<uintptr_t> cache_id_;
  int64_t captures_ = 0;
  int64_t replays_ = 0;
};

}  // namespace gemma::gemma4
