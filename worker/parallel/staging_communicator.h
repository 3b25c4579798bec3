// Collectives over buffers in another memory space than the communicator's: a model on a GPU
// passes device pointers (activations) and host pointers (routing, sampling candidates) to the
// same communicator, while Gloo and the in-process group read host memory only and NCCL device
// memory only. The staging communicator wraps one of them and copies each buffer that lives in
// the wrong space through scratch of the right one, so the model never needs to know.
//
// Knows nothing of CUDA: the device side is the MemorySpace interface, which the GPU backend
// implements (worker/backend/cuda/cuda_staging.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/parallel/communicator.h"

namespace gemma::parallel {

// A device's memory, seen from the host. Copies are complete when they return, and are ordered
// after all work already queued on the device (so a copy out of a buffer a kernel is still
// writing sees the kernel's result).
class MemorySpace {
 public:
  virtual ~MemorySpace() = default;
  // True for an address in device memory (false for host memory, pinned or not).
  virtual bool IsDevice(const void* ptr) const = 0;
  // Blocks until the work queued on the device has finished (before another stream or another
  // process reads device buffers it writes).
  virtual absl::Status WaitForDevice() = 0;
  virtual absl::Status CopyToHost(void* host_dst, const void* device_src, size_t bytes) = 0;
  virtual absl::Status CopyToDevice(void* device_dst, const void* host_src, size_t bytes) = 0;
  // Device scratch of at least `bytes`; slot 0 and 1 are distinct and each stays valid until the
  // next call for the same slot.
  virtual absl::StatusOr<void*> DeviceScratch(int slot, size_t bytes) = 0;
};

// Which memory `inner` reads and writes.
enum class CommunicatorMemory { kHost, kDevice };

// Counts of what staging cost, for tests and step profiles.
struct StagingCounters {
  uint64_t calls_staged = 0;      // collectives that copied at least one buffer
  uint64_t bytes_to_host = 0;
  uint64_t bytes_to_device = 0;
};

// Wraps `inner` (which keeps its rank, size, name, health and traffic counters). Every collective
// is passed through unchanged when all its buffers are already where `inner` wants them, else
// staged: inputs copied into scratch of `inner`'s memory, the collective run there, outputs
// copied back. With a device-memory `inner`, every call first waits for the device (the inner
// communicator may run on a stream of its own). `space` must outlive the wrapper.
std::unique_ptr<Communicator> WrapWithStaging(std::unique_ptr<Communicator> inner,
                                              CommunicatorMemory inner_memory, MemorySpace* space,
                                              StagingCounters* counters = nullptr);

// As above, for an `inner` owned by someone else (who keeps it alive longer than the wrapper).
std::unique_ptr<Communicator> WrapWithStaging(Communicator* inner, CommunicatorMemory inner_memory,
                                              MemorySpace* space,
                                              StagingCounters* counters = nullptr);

// The memory a communicator reads: device for "nccl", host for every other backend.
CommunicatorMemory MemoryOf(const Communicator& comm);

}  // namespace gemma::parallel
