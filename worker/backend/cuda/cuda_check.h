// Error plumbing of the CUDA backend's .cc files: GEMMA_CUDA_CHECK records a failed CUDA call
// as the backend's sticky error with file and line, and returns from the op.
#pragma once

#include "worker/backend/cuda/cuda_backend.h"

#define GEMMA_CUDA_CHECK(expr)                                       \
  do {                                                               \
    if (!this->Check((expr), __FILE__, __LINE__)) return;            \
  } while (false)

#define GEMMA_CUDA_CHECK_RET(expr, ret)                              \
  do {                                                               \
    if (!this->Check((expr), __FILE__, __LINE__)) return (ret);      \
  } while (false)

namespace gemma {

// The buffer as a CudaBuffer, checking it came from a CUDA backend.
const CudaBuffer& AsCuda(const Buffer& b);
CudaBuffer& AsCuda(Buffer& b);
// Typed device pointers, checking the dtype.
float* F32Ptr(const Buffer& b);
int32_t* I32Ptr(const Buffer& b);
// The storage type of a weight buffer (F32 or BF16).
kernels::ElemType WeightType(const Buffer& b);
// The element type of a KV-cache buffer (F32 or BF16).
kernels::ElemType KvType(const Buffer& b);

}  // namespace gemma
