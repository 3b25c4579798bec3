// The CUDA backend's device memory as a parallel::MemorySpace, so that a staging communicator
// (worker/parallel/staging_communicator.h) can move collective buffers between the backend's
// device memory and the host in the backend's stream order.
#pragma once

#include <cstddef>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/backend/cuda/cuda_backend.h"
#include "worker/parallel/staging_communicator.h"

namespace gemma {

class CudaMemorySpace final : public parallel::MemorySpace {
 public:
  // `backend` must outlive this object.
  explicit CudaMemorySpace(CudaBackend& backend) : backend_(backend) {}

  // Device (or managed) memory per cudaPointerGetAttributes; host memory otherwise.
  bool IsDevice(const void* ptr) const override;
  // Synchronize(): waits for the backend's stream and returns its sticky error.
  absl::Status WaitForDevice() override;
  // Copies on the backend's stream (after the work queued there) and waits for them.
  absl::Status CopyToHost(void* host_dst, const void* device_src, size_t bytes) override;
  absl::Status CopyToDevice(void* device_dst, const void* host_src, size_t bytes) override;
  // Buffers from the backend's arena, grown on demand and kept.
  absl::StatusOr<void*> DeviceScratch(int slot, size_t bytes) override;

 private:
  CudaBackend& backend_;
  BufferPtr scratch_[2];
};

}  // namespace gemma
