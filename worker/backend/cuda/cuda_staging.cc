#include "worker/backend/cuda/cuda_staging.h"

#include <cuda_runtime.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace gemma {
namespace {

absl::Status CopyStatus(cudaError_t err, const char* what, size_t bytes) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(__FILE__, ": staging ", what, " of ", bytes,
                                          " bytes: ", cudaGetErrorString(err)));
}

}  // namespace

bool CudaMemorySpace::IsDevice(const void* ptr) const {
  if (ptr == nullptr) return false;
  cudaPointerAttributes attributes{};
  if (cudaPointerGetAttributes(&attributes, ptr) != cudaSuccess) {
    cudaGetLastError();  // clear: an unknown host pointer is not an error
    return false;
  }
  return attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged;
}

absl::Status CudaMemorySpace::WaitForDevice() { return backend_.Synchronize(); }

absl::Status CudaMemorySpace::CopyToHost(void* host_dst, const void* device_src, size_t bytes) {
  RETURN_IF_ERROR(CopyStatus(cudaMemcpyAsync(host_dst, device_src, bytes, cudaMemcpyDeviceToHost,
                                             backend_.stream()),
                             "device-to-host copy", bytes));
  return backend_.Synchronize();
}

absl::Status CudaMemorySpace::CopyToDevice(void* device_dst, const void* host_src, size_t bytes) {
  RETURN_IF_ERROR(CopyStatus(cudaMemcpyAsync(device_dst, host_src, bytes, cudaMemcpyHostToDevice,
                                             backend_.stream()),
                             "host-to-device copy", bytes));
  return backend_.Synchronize();
}

absl::StatusOr<void*> CudaMemorySpace::DeviceScratch(int slot, size_t bytes) {
  if (slot < 0 || slot > 1) return absl::InvalidArgumentError("scratch slot must be 0 or 1");
  BufferPtr& buffer = scratch_[slot];
  const int64_t words = static_cast<int64_t>((bytes + 3) / 4);
  if (buffer == nullptr || buffer->numel() < words) {
    buffer.reset();  // give the old block back first
    ASSIGN_OR_RETURN(buffer, backend_.Alloc(DType::kI32, std::max<int64_t>(words, 1024)));
  }
  return backend_.RawData(*buffer);
}

}  // namespace gemma
