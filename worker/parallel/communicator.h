// The collective-communication interface every rank uses for the data plane and the step plane,
// plus the traffic counters and the checks the implementations share.
// Knows nothing of models, engines or transports: implementations live in their own files.
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "common/dtype.h"

namespace gemma::parallel {

// Default bound on any one collective (and on joining a group).
inline constexpr std::chrono::milliseconds kDefaultCollectiveTimeout = std::chrono::seconds(60);

enum class CollectiveOp : uint8_t {
  kAllReduce,
  kAllGather,
  kReduceScatter,
  kAllToAllV,
  kBroadcast,
  kBarrier,
};
inline constexpr size_t kNumCollectiveOps = 6;

// "AllReduce", "AllGather", ...
const char* CollectiveOpName(CollectiveOp op);

// Bytes this rank sent, per op kind, and per destination peer for AllToAllV.
//
// Every implementation counts the same algorithm-independent payload volume (what a direct,
// bandwidth-optimal exchange moves), so counters are comparable across in-process, Gloo and NCCL:
//   AllReduce      N + (W-2)*c_r bytes, where c_r is this rank's shard of the buffer
//                  (reduce-scatter then all-gather over SplitEvenly shards; 2N(W-1)/W when W | N)
//   AllGather      send_bytes * (W-1)
//   ReduceScatter  recv_bytes * (W-1)
//   AllToAllV      sum of send_counts[p] bytes over peers p != rank (self-sends are a local copy,
//                  not network traffic, and are never counted)
//   Broadcast      bytes * (W-1) on the root, 0 elsewhere
//   Barrier        0
// Wire overhead (headers, algorithm detours) is not counted. W == 1 counts nothing.
struct TrafficCounters {
  std::array<uint64_t, kNumCollectiveOps> bytes_sent{};  // indexed by CollectiveOp
  std::array<uint64_t, kNumCollectiveOps> calls{};       // successful calls per op
  std::vector<uint64_t> all_to_all_bytes_to_peer;        // [world_size]; self entry stays 0

  uint64_t BytesSent(CollectiveOp op) const { return bytes_sent[static_cast<size_t>(op)]; }
  uint64_t Calls(CollectiveOp op) const { return calls[static_cast<size_t>(op)]; }
  uint64_t TotalBytesSent() const;
  // Zeroes everything, keeping the per-peer vector's size.
  void Reset();
};

// A group of `world_size()` ranks running the same collectives in the same order.
//
// Buffers are raw pointers: host memory for CPU implementations, device memory for NCCL. Counts
// are in elements of `dtype`. Every call blocks until this rank's part is complete (NCCL: until the
// work on its stream has finished) or the communicator's timeout passes. A timeout gives
// DEADLINE_EXCEEDED and a lost peer UNAVAILABLE, naming the op, this rank and the peer when known.
// After any failure the communicator is dead: later calls fail fast with UNAVAILABLE, and the
// owner should tear the replica down (design.md, "Durability and failures").
//
// Not thread-safe: one thread per rank drives its communicator.
class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // "in-process", "gloo", "nccl".
  virtual const char* backend_name() const = 0;

  // Element-wise sum over ranks, in place: [count] on every rank. F32, BF16, I32, I64.
  virtual absl::Status AllReduce(void* data, size_t count, DType dtype) = 0;

  // send: [send_count]; recv: [world_size * send_count], rank r's block at r * send_count.
  virtual absl::Status AllGather(const void* send, void* recv, size_t send_count, DType dtype) = 0;

  // send: [world_size * recv_count]; recv: [recv_count] = sum over ranks of block `rank()`.
  // F32, BF16, I32, I64. send and recv must not overlap.
  virtual absl::Status ReduceScatter(const void* send, void* recv, size_t recv_count,
                                     DType dtype) = 0;

  // send: blocks for peers 0..W-1 contiguous in rank order, send_counts[p] elements each;
  // recv likewise with recv_counts[p]. recv_counts[p] must equal peer p's send_counts[rank()].
  // Zero counts are allowed. send and recv must not overlap.
  virtual absl::Status AllToAllV(const void* send, absl::Span<const int64_t> send_counts,
                                 void* recv, absl::Span<const int64_t> recv_counts,
                                 DType dtype) = 0;

  // data: [count]; the root's contents are copied to every rank.
  virtual absl::Status Broadcast(void* data, size_t count, DType dtype, int root) = 0;

  virtual absl::Status Barrier() = 0;

  // ---- Stream-ordered sums (optional; NCCL has them) ----
  // EnqueueAllReduce queues the in-place sum of `data` on `stream` (the backend's
  // NativeStream(): a cudaStream_t for CUDA), after the work already queued there, and returns
  // without waiting for it, so that a step graph can record it among the step's kernels. Its
  // watchdog is AwaitStream(stream), called before anything else waits on that stream: it waits
  // until the stream has drained, polling for asynchronous errors, and past the timeout aborts
  // the communicator (DEADLINE_EXCEEDED); either way the communicator is dead after a failure.
  // Implementations without it say false here and UNIMPLEMENTED below.
  virtual bool SupportsStreamOrdered() const { return false; }
  virtual absl::Status EnqueueAllReduce(void* data, size_t count, DType dtype, void* stream);
  virtual absl::Status AwaitStream(void* stream);
  // Releases a failed communicator's transport at once (it is dead afterwards, failed or not).
  // NCCL defers its abort to this call once it has enqueued stream-ordered work, since step
  // graphs that recorded its collectives keep the abort waiting until they are destroyed: the
  // owner drops those graphs, then calls Abort. Others release on failure; for them a no-op.
  virtual void Abort() {}

  // False once any call has failed.
  virtual bool healthy() const = 0;

  virtual const TrafficCounters& traffic() const = 0;
  virtual void ResetTraffic() = 0;
};

// Passes every call to `inner` (not owned, outliving this object): the base of decorators,
// which override the collectives they change and keep the inner one's identity, health and
// traffic counters.
class ForwardingCommunicator : public Communicator {
 public:
  explicit ForwardingCommunicator(Communicator* inner) : inner_(inner) {}
  int rank() const override { return inner_->rank(); }
  int world_size() const override { return inner_->world_size(); }
  const char* backend_name() const override { return inner_->backend_name(); }
  bool healthy() const override { return inner_->healthy(); }
  const TrafficCounters& traffic() const override { return inner_->traffic(); }
  void ResetTraffic() override { inner_->ResetTraffic(); }
  absl::Status AllReduce(void* data, size_t count, DType dtype) override {
    return inner_->AllReduce(data, count, dtype);
  }
  absl::Status AllGather(const void* send, void* recv, size_t send_count, DType dtype) override {
    return inner_->AllGather(send, recv, send_count, dtype);
  }
  absl::Status ReduceScatter(const void* send, void* recv, size_t recv_count,
                             DType dtype) override {
    return inner_->ReduceScatter(send, recv, recv_count, dtype);
  }
  absl::Status AllToAllV(const void* send, absl::Span<const int64_t> send_counts, void* recv,
                         absl::Span<const int64_t> recv_counts, DType dtype) override {
    return inner_->AllToAllV(send, send_counts, recv, recv_counts, dtype);
  }
  absl::Status Broadcast(void* data, size_t count, DType dtype, int root) override {
    return inner_->Broadcast(data, count, dtype, root);
  }
  absl::Status Barrier() override { return inner_->Barrier(); }
  bool SupportsStreamOrdered() const override { return inner_->SupportsStreamOrdered(); }
  absl::Status EnqueueAllReduce(void* data, size_t count, DType dtype, void* stream) override {
    return inner_->EnqueueAllReduce(data, count, dtype, stream);
  }
  absl::Status AwaitStream(void* stream) override { return inner_->AwaitStream(stream); }
  void Abort() override { inner_->Abort(); }

 protected:
  Communicator& inner() const { return *inner_; }

 private:
  Communicator* inner_;
};

// The identity, health and traffic counters every implementation keeps, and the fail-fast
// check of a dead communicator.
class CommunicatorBase : public Communicator {
 public:
  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  bool healthy() const override { return dead_reason_.empty(); }
  const TrafficCounters& traffic() const override { return traffic_; }
  void ResetTraffic() override { traffic_.Reset(); }

 protected:
  CommunicatorBase(int rank, int world_size) : rank_(rank), world_size_(world_size) {
    traffic_.all_to_all_bytes_to_peer.assign(world_size, 0);
  }
  // OK while healthy; afterwards UNAVAILABLE "<prefix><op on rank r of W>: communicator is
  // dead after: <first failure>".
  absl::Status Precheck(CollectiveOp op) const;
  // "Gloo ", "NCCL ", or "" for the in-process group.
  virtual const char* error_prefix() const { return ""; }

  const int rank_;
  const int world_size_;
  std::string dead_reason_;  // empty while healthy
  TrafficCounters traffic_;
};

// ---- Shared by implementations --------------------------------------------------------------

// Argument checks common to all implementations; INVALID_ARGUMENT naming the op and rank.
absl::Status ValidateAllToAllCounts(CollectiveOp op, int rank, int world_size,
                                    absl::Span<const int64_t> send_counts,
                                    absl::Span<const int64_t> recv_counts);
absl::Status ValidateRoot(CollectiveOp op, int rank, int world_size, int root);
// OK for dtypes a sum is defined on here (F32, BF16, I32, I64).
absl::Status ValidateReducible(CollectiveOp op, int rank, DType dtype);

// dst[i] += src[i] for `count` elements (BF16 summed in F32 and rounded once per add).
void AccumulateSum(DType dtype, void* dst, const void* src, size_t count);

// Adds the payload volume of one successful call to `counters` (see TrafficCounters).
// `count` is the op's characteristic element count: AllReduce/Broadcast count, AllGather
// send_count, ReduceScatter recv_count. `send_counts` is used by AllToAllV only.
void CountTraffic(CollectiveOp op, int rank, int world_size, size_t count, DType dtype,
                  absl::Span<const int64_t> send_counts, int root, TrafficCounters* counters);

// "AllReduce on rank 2 of 4" prefix for error messages.
std::string OpContext(CollectiveOp op, int rank, int world_size);

}  // namespace gemma::parallel
