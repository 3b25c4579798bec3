#include "worker/parallel/staging_communicator.h"

#include <cstring>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace gemma::parallel {
namespace {

class StagingCommunicator : public ForwardingCommunicator {
 public:
  StagingCommunicator(std::unique_ptr<Communicator> owned, Communicator* inner,
                      CommunicatorMemory inner_memory, MemorySpace* space,
                      StagingCounters* counters)
      : ForwardingCommunicator(inner),
        owned_(std::move(owned)),
        inner_memory_(inner_memory),
        space_(space),
        counters_(counters) {}

  absl::Status AllReduce(void* data, size_t count, DType dtype) override {
    RETURN_IF_ERROR(Begin());
    const size_t bytes = count * DTypeSize(dtype);
    ASSIGN_OR_RETURN(void* d, In(0, data, bytes));
    RETURN_IF_ERROR(inner().AllReduce(d, count, dtype));
    return Out(data, d, bytes);
  }

  absl::Status AllGather(const void* send, void* recv, size_t send_count, DType dtype) override {
    RETURN_IF_ERROR(Begin());
    const size_t elem = DTypeSize(dtype);
    const size_t send_bytes = send_count * elem;
    const size_t recv_bytes = send_bytes * static_cast<size_t>(world_size());
    ASSIGN_OR_RETURN(void* s, In(0, send, send_bytes));
    ASSIGN_OR_RETURN(void* r, Place(1, recv, recv_bytes));
    RETURN_IF_ERROR(inner().AllGather(s, r, send_count, dtype));
    return Out(recv, r, recv_bytes);
  }

  absl::Status ReduceScatter(const void* send, void* recv, size_t recv_count,
                             DType dtype) override {
    RETURN_IF_ERROR(Begin());
    const size_t elem = DTypeSize(dtype);
    const size_t recv_bytes = recv_count * elem;
    const size_t send_bytes = recv_bytes * static_cast<size_t>(world_size());
    ASSIGN_OR_RETURN(void* s, In(0, send, send_bytes));
    ASSIGN_OR_RETURN(void* r, Place(1, recv, recv_bytes));
    RETURN_IF_ERROR(inner().ReduceScatter(s, r, recv_count, dtype));
    return Out(recv, r, recv_bytes);
  }

  absl::Status AllToAllV(const void* send, absl::Span<const int64_t> send_counts, void* recv,
                         absl::Span<const int64_t> recv_counts, DType dtype) override {
    // Counts are checked before they size a copy (the inner communicator checks them again).
    RETURN_IF_ERROR(ValidateAllToAllCounts(CollectiveOp::kAllToAllV, rank(), world_size(),
                                           send_counts, recv_counts));
    RETURN_IF_ERROR(Begin());
    const size_t elem = DTypeSize(dtype);
    size_t send_bytes = 0, recv_bytes = 0;
    for (int64_t c : send_counts) send_bytes += static_cast<size_t>(c) * elem;
    for (int64_t c : recv_counts) recv_bytes += static_cast<size_t>(c) * elem;
    ASSIGN_OR_RETURN(void* s, In(0, send, send_bytes));
    ASSIGN_OR_RETURN(void* r, Place(1, recv, recv_bytes));
    RETURN_IF_ERROR(inner().AllToAllV(s, send_counts, r, recv_counts, dtype));
    return Out(recv, r, recv_bytes);
  }

  absl::Status Broadcast(void* data, size_t count, DType dtype, int root) override {
    RETURN_IF_ERROR(ValidateRoot(CollectiveOp::kBroadcast, rank(), world_size(), root));
    RETURN_IF_ERROR(Begin());
    const size_t bytes = count * DTypeSize(dtype);
    ASSIGN_OR_RETURN(void* d, In(0, data, bytes));
    RETURN_IF_ERROR(inner().Broadcast(d, count, dtype, root));
    return Out(data, d, bytes);
  }

  absl::Status Barrier() override {
    RETURN_IF_ERROR(Begin());
    return inner().Barrier();
  }

  // Stream-ordered sums are never staged (a copy would need the host to wait): the buffer must
  // already be where the inner communicator reads.
  absl::Status EnqueueAllReduce(void* data, size_t count, DType dtype, void* stream) override {
    if (count > 0 && Foreign(data)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "stream-ordered all-reduce of a buffer in ",
          inner_memory_ == CommunicatorMemory::kDevice ? "host" : "device", " memory over ",
          backend_name(), ", which reads the other; use AllReduce, which stages it"));
    }
    return inner().EnqueueAllReduce(data, count, dtype, stream);
  }

 private:
  // True when `ptr` is in the other memory than the inner communicator's.
  bool Foreign(const void* ptr) const {
    const bool device = space_->IsDevice(ptr);
    return inner_memory_ == CommunicatorMemory::kHost ? device : !device;
  }

  absl::Status Begin() {
    staged_this_call_ = false;
    // A device communicator may run on its own stream: what the caller queued must be done.
    if (inner_memory_ == CommunicatorMemory::kDevice) return space_->WaitForDevice();
    return absl::OkStatus();
  }

  // Where the inner communicator finds the `bytes` at `ptr`, a scratch slot when they are foreign.
  absl::StatusOr<void*> Place(int slot, const void* ptr, size_t bytes) {
    if (bytes == 0 || !Foreign(ptr)) return const_cast<void*>(ptr);
    if (inner_memory_ == CommunicatorMemory::kDevice) return space_->DeviceScratch(slot, bytes);
    std::vector<uint8_t>& host = host_scratch_[slot];
    if (host.size() < bytes) host.resize(bytes);
    return host.data();
  }

  // Place(), and copies the input there.
  absl::StatusOr<void*> In(int slot, const void* ptr, size_t bytes) {
    ASSIGN_OR_RETURN(void* placed, Place(slot, ptr, bytes));
    if (placed == ptr) return placed;
    Count();
    if (inner_memory_ == CommunicatorMemory::kDevice) {
      RETURN_IF_ERROR(space_->CopyToDevice(placed, ptr, bytes));
      if (counters_ != nullptr) counters_->bytes_to_device += bytes;
    } else {
      RETURN_IF_ERROR(space_->CopyToHost(placed, ptr, bytes));
      if (counters_ != nullptr) counters_->bytes_to_host += bytes;
    }
    return placed;
  }

  // Copies a staged output back to the caller's buffer.
  absl::Status Out(void* ptr, void* placed, size_t bytes) {
    if (placed == ptr) return absl::OkStatus();
    Count();
    if (inner_memory_ == CommunicatorMemory::kDevice) {
      if (counters_ != nullptr) counters_->bytes_to_host += bytes;
      return space_->CopyToHost(ptr, placed, bytes);
    }
    if (counters_ != nullptr) counters_->bytes_to_device += bytes;
    return space_->CopyToDevice(ptr, placed, bytes);
  }

  void Count() {
    if (!staged_this_call_ && counters_ != nullptr) ++counters_->calls_staged;
    staged_this_call_ = true;
  }

  std::unique_ptr<Communicator> owned_;
  CommunicatorMemory inner_memory_;
  MemorySpace* space_;
  StagingCounters* counters_;
  std::vector<uint8_t> host_scratch_[2];
  bool staged_this_call_ = false;
};

}  // namespace

std::unique_ptr<Communicator> WrapWithStaging(std::unique_ptr<Communicator> inner,
                                              CommunicatorMemory inner_memory, MemorySpace* space,
                                              StagingCounters* counters) {
  Communicator* raw = inner.get();
  return std::make_unique<StagingCommunicator>(std::move(inner), raw, inner_memory, space,
                                               counters);
}

std::unique_ptr<Communicator> WrapWithStaging(Communicator* inner, CommunicatorMemory inner_memory,
                                              MemorySpace* space, StagingCounters* counters) {
  return std::make_unique<StagingCommunicator>(nullptr, inner, inner_memory, space, counters);
}

CommunicatorMemory MemoryOf(const Communicator& comm) {
  return std::string(comm.backend_name()) == "nccl" ? CommunicatorMemory::kDevice
                                                    : CommunicatorMemory::kHost;
}

}  // namespace gemma::parallel
