// RMSNorm kernels: plain (optional weight), fused with the residual add and the layer scalar,
// and the per-head norm fused with the half-split rotary embedding.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/kernel_types.h"

namespace gemma::kernels {

// out[r] = x[r] / rms(x[r]) * w (w null: no weight). x, out [rows, dim] f32; out may alias x.
cudaError_t RmsNorm(const float* x, const void* w, ElemType w_type, int64_t rows, int64_t dim,
                    float eps, float* out, cudaStream_t stream);

// residual[r] = (residual[r] + x[r] / rms(x[r]) * w) * scalar[0]; scalar null means 1.
struct AddRmsNormParams {
  float* residual = nullptr;     // [rows, dim] f32, updated in place
  const float* x = nullptr;      // [rows, dim] f32
  const void* w = nullptr;       // [dim]
  ElemType w_type = ElemType::kF32;
  const void* scalar = nullptr;  // [1] or null
  ElemType scalar_type = ElemType::kF32;
  int64_t rows = 0;
  int64_t dim = 0;
  float eps = 1e-6f;
};
cudaError_t AddRmsNorm(const AddRmsNormParams& p, cudaStream_t stream);

// Per (token, head) of x [num_tokens, num_heads, rope.head_dim], in place: RMSNorm with weight w
// ([head_dim] or null), then RoPE at positions[token] (skipped when rope.rotary_pairs == 0).
struct HeadNormRopeParams {
  float* x = nullptr;
  const void* w = nullptr;
  ElemType w_type = ElemType::kF32;
  const int32_t* positions = nullptr;  // [num_tokens] i32
  int64_t num_tokens = 0;
  int64_t num_heads = 0;
  Rope rope;
  float eps = 1e-6f;
};
cudaError_t HeadNormRope(const HeadNormRopeParams& p, cudaStream_t stream);

}  // namespace gemma::kernels
