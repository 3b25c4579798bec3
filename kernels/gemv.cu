// Few-row matrix product: one warp per weight row, all m activation rows per warp (the x rows
// are small and stay in L1/L2), lanes striding over k in 16-byte vectors when aligned.
#include <cuda_bf16.h>

#include <algorithm>

#include "kernels/device_utils.cuh"
#include "kernels/gemv.h"

namespace gemma::kernels {
namespace {

constexpr int kWarps = 8;

template <typename T>
__device__ __forceinline__ float ToFloat(T v);
template <>
__device__ __forceinline__ float ToFloat<float>(float v) { return v; }
template <>
__device__ __forceinline__ float ToFloat<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// kVec: weights per 16-byte load (1 on the unaligned path).
template <typename T, int kVec>
__global__ void __launch_bounds__(kWarps * 32) GemvKernel(const float* x, const T* w, int64_t m,
                                                          int64_t n, int64_t k, float* y,
                                                          int64_t ldy) {
  const int lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x * int64_t{kWarps} + (threadIdx.x >> 5);
  if (row >= n) return;
  const T* wr = w + row * k;
  float acc[kGemvMaxRows];
#pragma unroll
  for (int r = 0; r < kGemvMaxRows; ++r) acc[r] = 0.0f;
  for (int64_t c = int64_t{lane} * kVec; c < k; c += 32 * kVec) {
    // 16-byte aligned: the vector path stores a uint4 into it.
    alignas(16) T wv[kVec];
    if constexpr (kVec > 1) {
      *reinterpret_cast<uint4*>(wv) = *reinterpret_cast<const uint4*>(wr + c);
    } else {
      wv[0] = wr[c];
    }
#pragma unroll
    for (int r = 0; r < kGemvMaxRows; ++r) {
      if (r < m) {
        const float* xr = x + r * k + c;
#pragma unroll
        for (int v = 0; v < kVec; ++v) acc[r] += xr[v] * ToFloat(wv[v]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kGemvMaxRows; ++r) {
    if (r < m) {
      const float s = WarpSum(acc[r]);
      if (lane == 0) y[r * ldy + row] = s;
    }
  }
}

template <typename T>
cudaError_t LaunchTyped(const float* x, const void* w, int64_t m, int64_t n, int64_t k, float* y,
                        int64_t ldy, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const unsigned blocks = static_cast<unsigned>(CeilDiv(n, kWarps));
  const T* wt = static_cast<const T*>(w);
  const bool aligned = k % kVec == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
  if (aligned) {
    GemvKernel<T, kVec><<<blocks, kWarps * 32, 0, stream>>>(x, wt, m, n, k, y, ldy);
  } else {
    GemvKernel<T, 1><<<blocks, kWarps * 32, 0, stream>>>(x, wt, m, n, k, y, ldy);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t Gemv(const float* x, const void* w, ElemType w_type, int64_t m, int64_t n, int64_t k,
                 float* y, int64_t ldy, cudaStream_t stream) {
  if (m == 0 || n == 0) return cudaSuccess;
  if (m > kGemvMaxRows) return cudaErrorInvalidValue;
  return w_type == ElemType::kF32 ? LaunchTyped<float>(x, w, m, n, k, y, ldy, stream)
                                  : LaunchTyped<__nv_bfloat16>(x, w, m, n, k, y, ldy, stream);
}

}  // namespace gemma::kernels
