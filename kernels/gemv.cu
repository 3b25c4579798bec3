// Few-row matrix product y[m, n] = x[m, k] . w[n, k]^T for m <= kGemvMaxRows: each warp owns
// kRows consecutive weight rows and every activation row. Lanes stride over k in 16-byte weight
// vectors, one per owned row in flight (four ahead when a warp owns one row); each
// activation vector, read as float4s from L1/L2, serves all kRows weight rows before the next
// is read, so activations cost 1/kRows of what one row per warp would read. Accumulation in
// f32, in the same order per lane as one vector at a time; one warp sum per output.
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

// kVec: weights per 16-byte load (1 on the unaligned path). kRows: weight rows per warp.
// kXVec: the activation rows are 16-byte aligned at every vector (read as float4).
template <typename T, int kVec, int kRows, bool kXVec>
__global__ void __launch_bounds__(kWarps * 32) GemvKernel(const float* x, const T* w, int64_t m,
                                                          int64_t n, int64_t k, float* y,
                                                          int64_t ldy) {
  const int lane = threadIdx.x & 31;
  const int64_t row0 = (blockIdx.x * int64_t{kWarps} + (threadIdx.x >> 5)) * kRows;
  if (row0 >= n) return;
  // Rows past n repeat the last row (read, never written), so the loads stay unconditional.
  const T* wr[kRows];
#pragma unroll
  for (int j = 0; j < kRows; ++j) wr[j] = w + min(row0 + j, n - 1) * k;
  float acc[kGemvMaxRows][kRows];
#pragma unroll
  for (int r = 0; r < kGemvMaxRows; ++r) {
#pragma unroll
    for (int j = 0; j < kRows; ++j) acc[r][j] = 0.0f;
  }
  // A warp of one weight row loads kUnroll vectors before using the first, so that each lane
  // keeps 4 loads in flight as a warp of 4 rows does (one in flight cannot cover the memory
  // latency). Warps of 2 or 4 rows load one vector a row: more in flight cost them occupancy
  // (the 31B's products ran 20% slower on an H200 with 8 loads in flight).
  constexpr int kUnroll = kRows == 1 ? 4 : 1;
  constexpr int64_t kStride = 32 * kVec;
  for (int64_t base = int64_t{lane} * kVec; base < k; base += kStride * kUnroll) {
    // 16-byte aligned: the vector path stores a uint4 into each row.
    alignas(16) T wv[kUnroll][kRows][kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = base + u * kStride;
      if (c < k) {
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
          if constexpr (kVec > 1) {
            *reinterpret_cast<uint4*>(wv[u][j]) = *reinterpret_cast<const uint4*>(wr[j] + c);
          } else {
            wv[u][j][0] = wr[j][c];
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = base + u * kStride;
      if (c >= k) break;
      float wf[kRows][kVec];
#pragma unroll
      for (int j = 0; j < kRows; ++j) {
#pragma unroll
        for (int v = 0; v < kVec; ++v) wf[j][v] = ToFloat(wv[u][j][v]);
      }
#pragma unroll
      for (int r = 0; r < kGemvMaxRows; ++r) {
        if (r < m) {
          const float* xr = x + r * k + c;
          float xv[kVec];
          if constexpr (kXVec) {
#pragma unroll
            for (int v = 0; v < kVec; v += 4) {
              const float4 q = *reinterpret_cast<const float4*>(xr + v);
              xv[v] = q.x;
              xv[v + 1] = q.y;
              xv[v + 2] = q.z;
              xv[v + 3] = q.w;
            }
          } else {
#pragma unroll
            for (int v = 0; v < kVec; ++v) xv[v] = xr[v];
          }
#pragma unroll
          for (int j = 0; j < kRows; ++j) {
#pragma unroll
            for (int v = 0; v < kVec; ++v) acc[r][j] += xv[v] * wf[j][v];
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kGemvMaxRows; ++r) {
    if (r < m) {
#pragma unroll
      for (int j = 0; j < kRows; ++j) {
        const float s = WarpSum(acc[r][j]);
        if (lane == 0 && row0 + j < n) y[r * ldy + row0 + j] = s;
      }
    }
  }
}

template <typename T, int kVec, int kRows>
cudaError_t LaunchRows(const float* x, const T* w, int64_t m, int64_t n, int64_t k, float* y,
                       int64_t ldy, bool x_vec, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(CeilDiv(n, int64_t{kWarps} * kRows));
  if constexpr (kVec % 4 == 0) {
    if (x_vec) {
      GemvKernel<T, kVec, kRows, true><<<blocks, kWarps * 32, 0, stream>>>(x, w, m, n, k, y, ldy);
      return cudaGetLastError();
    }
  }
  GemvKernel<T, kVec, kRows, false><<<blocks, kWarps * 32, 0, stream>>>(x, w, m, n, k, y, ldy);
  return cudaGetLastError();
}

template <typename T, int kVec>
cudaError_t LaunchVec(const float* x, const T* w, int64_t m, int64_t n, int64_t k, float* y,
                      int64_t ldy, bool x_vec, cudaStream_t stream) {
  // The most rows per warp that still gives every multiprocessor a block.
  const int64_t sms = NumSms();
  if (CeilDiv(n, int64_t{kWarps} * 4) >= sms) {
    return LaunchRows<T, kVec, 4>(x, w, m, n, k, y, ldy, x_vec, stream);
  }
  if (CeilDiv(n, int64_t{kWarps} * 2) >= sms) {
    return LaunchRows<T, kVec, 2>(x, w, m, n, k, y, ldy, x_vec, stream);
  }
  return LaunchRows<T, kVec, 1>(x, w, m, n, k, y, ldy, x_vec, stream);
}

template <typename T>
cudaError_t LaunchTyped(const float* x, const void* w, int64_t m, int64_t n, int64_t k, float* y,
                        int64_t ldy, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const T* wt = static_cast<const T*>(w);
  const bool aligned = k % kVec == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
  // Every x vector x + r * k + c (c a multiple of kVec) is 16-byte aligned.
  const bool x_vec = aligned && k % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  if (aligned) return LaunchVec<T, kVec>(x, wt, m, n, k, y, ldy, x_vec, stream);
  return LaunchVec<T, 1>(x, wt, m, n, k, y, ldy, false, stream);
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
