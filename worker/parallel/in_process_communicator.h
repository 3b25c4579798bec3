// Ranks as threads of one process: an InProcessGroup of W ranks hands out one Communicator per
// rank. Used by unit and equivalence tests; copies through shared host memory.
// Knows nothing of sockets or devices; buffers are host memory.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "worker/parallel/communicator.h"

namespace gemma::parallel {

// State shared by the ranks of one group; defined in the .cc.
class InProcessGroupState;

// Create the group, then call communicator(r) once per rank and drive each from its own thread.
// Sums are computed in rank order (rank i reduces shard i of an AllReduce), so every rank gets
// bit-identical results that equal a serial rank-order sum.
//
// A rank whose call times out aborts the whole group (like an NCCL abort): ranks waiting in the
// same call fail with the same code, and later calls on any rank fail fast with UNAVAILABLE.
class InProcessGroup {
 public:
  explicit InProcessGroup(int world_size,
                          std::chrono::milliseconds timeout = kDefaultCollectiveTimeout);
  ~InProcessGroup();

  InProcessGroup(const InProcessGroup&) = delete;
  InProcessGroup& operator=(const InProcessGroup&) = delete;

  int world_size() const { return world_size_; }

  // The communicator of `rank` (0 <= rank < world_size; CHECKed). It shares the group's state and
  // may outlive this object. Call once per rank.
  std::unique_ptr<Communicator> communicator(int rank);

  // Fails current and later calls on every rank with UNAVAILABLE carrying `reason`.
  void Abort(absl::string_view reason);

 private:
  int world_size_;
  std::chrono::milliseconds timeout_;
  std::shared_ptr<InProcessGroupState> state_;
};

}  // namespace gemma::parallel
