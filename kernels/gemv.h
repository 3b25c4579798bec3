// Matrix products with few rows of activations (decode): y[m, n] = x[m, k] . w[n, k]^T with x
// f32 and w f32 or bf16, accumulated in f32. Memory-bound: each weight row is read once, by one
// warp, with 16-byte loads when the row is 16-byte aligned. Larger m goes to cuBLASLt.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/kernel_types.h"

namespace gemma::kernels {

// Largest m the kernel serves.
inline constexpr int64_t kGemvMaxRows = 8;

// w points at the first weight row used; x [m, k], y [m, n] with row stride ldy (>= n).
cudaError_t Gemv(const float* x, const void* w, ElemType w_type, int64_t m, int64_t n, int64_t k,
                 float* y, int64_t ldy, cudaStream_t stream);

}  // namespace gemma::kernels
