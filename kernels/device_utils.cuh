// Device-only helpers shared by the kernels: typed weight loads, warp and block reductions,
// the tanh GELU and the rotary inverse frequency. Included by .cu files only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/kernel_types.h"

namespace gemma::kernels {

constexpr unsigned kFullMask = 0xffffffffu;

// Element i of an f32 or bf16 array as float.
__device__ __forceinline__ float LoadElem(const void* p, ElemType type, int64_t i) {
  return type == ElemType::kF32 ? static_cast<const float*>(p)[i]
                                : __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

template <typename T>
__device__ __forceinline__ T WarpSum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 values; the call ends with a barrier so it can be reused at once.
template <typename T>
__device__ __forceinline__ T BlockSum(T v, T* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  v = WarpSum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = lane < num_warps ? scratch[lane] : T(0);
  total = WarpSum(total);
  __syncthreads();
  return total;
}

__device__ __forceinline__ float BlockMax(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  v = WarpMax(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float m = lane < num_warps ? scratch[lane] : -INFINITY;
  m = WarpMax(m);
  __syncthreads();
  return m;
}

__device__ __forceinline__ float GeluTanh(float x) {
  constexpr float kSqrt2OverPi = 0.7978845608028654f;
  return 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + 0.044715f * x * x * x)));
}

// Inverse frequency of pair i, computed as the CPU reference does: exponent 2i/head_dim in f32,
// theta^exponent in double, reciprocal in f32, divided by factor.
__device__ __forceinline__ float RopeInvFreq(int64_t i, const Rope& rope) {
  float exponent = static_cast<float>(2 * i) / static_cast<float>(rope.head_dim);
  float inv = 1.0f / static_cast<float>(pow(rope.theta, static_cast<double>(exponent)));
  return static_cast<float>(inv / rope.factor);
}

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Multiprocessors of the current device, read once per process (132, an H100's or H200's, if
// the query fails). Launch shapes use it to fill the device.
inline int NumSms() {
  static const int sms = [] {
    int device = 0, count = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        count <= 0) {
      cudaGetLastError();  // clear the failed query
      return 132;
    }
    return count;
  }();
  return sms;
}

}  // namespace gemma::kernels
