// Element-wise kernels: grid-stride loops for flat arrays, one block per row for row copies.
#include <cuda_bf16.h>

#include <algorithm>

#include "kernels/device_utils.cuh"
#include "kernels/elementwise.h"

namespace gemma::kernels {
namespace {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n elements (capped; the loop covers the rest).
unsigned FlatBlocks(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(CeilDiv(n, kThreads), 65536)));
}

__global__ void EmbedKernel(const int32_t* ids, const void* table, ElemType table_type,
                            int64_t vocab, int64_t vocab_offset, int64_t hidden, float scale,
                            float* out) {
  const int64_t t = blockIdx.x;
  const int64_t local = static_cast<int64_t>(ids[t]) - vocab_offset;
  float* row = out + t * hidden;
  const bool inside = local >= 0 && local < vocab;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    row[i] = inside ? LoadElem(table, table_type, local * hidden + i) * scale : 0.0f;
  }
}

__global__ void AddKernel(const float* a, const float* b, int64_t n, float* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = a[i] + b[i];
  }
}

__global__ void GeluMulKernel(const float* gate_up, int64_t n, int64_t inter, float* out) {
  const int64_t total = n * inter;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = idx / inter;
    const int64_t i = idx - t * inter;
    const float* g = gate_up + t * 2 * inter;
    out[idx] = GeluTanh(g[i]) * g[inter + i];
  }
}

__global__ void SoftcapKernel(float* x, int64_t n, float cap) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    x[i] = cap * tanhf(x[i] / cap);
  }
}

__global__ void GatherRowsKernel(const float* x, int64_t x_rows, const int32_t* rows, int64_t dim,
                                 float* out) {
  const int64_t r = blockIdx.x;
  const int64_t src = rows[r];
  const bool valid = src >= 0 && src < x_rows;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    out[r * dim + i] = valid ? x[src * dim + i] : __int_as_float(0x7fc00000);
  }
}

__global__ void GatherSumRowsKernel(const float* x, int64_t x_rows, const int32_t* idx, int64_t k,
                                    int64_t dim, float* out) {
  const int64_t r = blockIdx.x;
  const int32_t* ids = idx + r * k;
  for (int64_t i = blockIdx.y * int64_t{blockDim.x} + threadIdx.x; i < dim;
       i += int64_t{gridDim.y} * blockDim.x) {
    float acc = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t src = ids[j];
      if (src < 0) continue;
      acc = src < x_rows ? acc + x[src * dim + i] : __int_as_float(0x7fc00000);
    }
    out[r * dim + i] = acc;
  }
}

__device__ __forceinline__ void StoreKv(float* dst, float x) { *dst = x; }
__device__ __forceinline__ void StoreKv(__nv_bfloat16* dst, float x) {
  *dst = __float2bfloat16_rn(x);
}

template <typename CacheT>
__global__ void WriteKvKernel(const float* k, const float* v, const int32_t* slots,
                              int64_t row_elems, int64_t cache_rows, CacheT* k_cache,
                              CacheT* v_cache) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slots[t];
  if (slot < 0 || slot >= cache_rows) return;
  for (int64_t i = blockIdx.y * int64_t{blockDim.x} + threadIdx.x; i < row_elems;
       i += int64_t{gridDim.y} * blockDim.x) {
    StoreKv(v_cache + slot * row_elems + i, v[t * row_elems + i]);
    if (k_cache != nullptr) StoreKv(k_cache + slot * row_elems + i, k[t * row_elems + i]);
  }
}

__global__ void F32ToBf16Kernel(const float* src, int64_t n, __nv_bfloat16* dst) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = __float2bfloat16_rn(src[i]);
  }
}

__global__ void FillKernel(float* x, int64_t n, float value) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    x[i] = value;
  }
}

// Threads per row-copy block: the row length rounded up to a warp, at most kThreads.
unsigned RowThreads(int64_t dim) {
  return static_cast<unsigned>(std::min<int64_t>(kThreads, std::max<int64_t>(32, CeilDiv(dim, 32) * 32)));
}

}  // namespace

cudaError_t Embed(const int32_t* ids, const void* table, ElemType table_type, int64_t n,
                  int64_t vocab, int64_t vocab_offset, int64_t hidden, float scale, float* out,
                  cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  EmbedKernel<<<static_cast<unsigned>(n), RowThreads(hidden), 0, stream>>>(
      ids, table, table_type, vocab, vocab_offset, hidden, scale, out);
  return cudaGetLastError();
}

cudaError_t Add(const float* a, const float* b, int64_t n, float* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  AddKernel<<<FlatBlocks(n), kThreads, 0, stream>>>(a, b, n, out);
  return cudaGetLastError();
}

cudaError_t GeluMul(const float* gate_up, int64_t n, int64_t inter, float* out,
                    cudaStream_t stream) {
  if (n * inter == 0) return cudaSuccess;
  GeluMulKernel<<<FlatBlocks(n * inter), kThreads, 0, stream>>>(gate_up, n, inter, out);
  return cudaGetLastError();
}

cudaError_t Softcap(float* x, int64_t n, float cap, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  SoftcapKernel<<<FlatBlocks(n), kThreads, 0, stream>>>(x, n, cap);
  return cudaGetLastError();
}

cudaError_t GatherRows(const float* x, int64_t x_rows, const int32_t* rows, int64_t num_rows,
                       int64_t dim, float* out, cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  GatherRowsKernel<<<static_cast<unsigned>(num_rows), RowThreads(dim), 0, stream>>>(
      x, x_rows, rows, dim, out);
  return cudaGetLastError();
}

cudaError_t GatherSumRows(const float* x, int64_t x_rows, const int32_t* idx, int64_t rows,
                          int64_t k, int64_t dim, float* out, cudaStream_t stream) {
  if (rows == 0 || dim == 0) return cudaSuccess;
  // A row over several blocks: few tokens come back per step in decode, each a row of hidden.
  const unsigned threads = RowThreads(dim);
  dim3 grid(static_cast<unsigned>(rows),
            static_cast<unsigned>(std::min<int64_t>(CeilDiv(dim, threads), 16)));
  GatherSumRowsKernel<<<grid, threads, 0, stream>>>(x, x_rows, idx, k, dim, out);
  return cudaGetLastError();
}

cudaError_t WriteKv(const float* k, const float* v, const int32_t* slots, int64_t num_tokens,
                    int64_t row_elems, int64_t cache_rows, void* k_cache, void* v_cache,
                    ElemType cache_type, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  // A row over several blocks (a decode step writes one row of up to 4096 values per layer).
  const unsigned threads = RowThreads(row_elems);
  dim3 grid(static_cast<unsigned>(num_tokens),
            static_cast<unsigned>(std::min<int64_t>(CeilDiv(row_elems, threads), 64)));
  if (cache_type == ElemType::kF32) {
    WriteKvKernel<<<grid, threads, 0, stream>>>(k, v, slots, row_elems, cache_rows,
                                                 static_cast<float*>(k_cache),
                                                 static_cast<float*>(v_cache));
  } else {
    WriteKvKernel<<<grid, threads, 0, stream>>>(k, v, slots, row_elems, cache_rows,
                                                 static_cast<__nv_bfloat16*>(k_cache),
                                                 static_cast<__nv_bfloat16*>(v_cache));
  }
  return cudaGetLastError();
}

cudaError_t F32ToBf16(const float* src, int64_t n, void* dst, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  F32ToBf16Kernel<<<FlatBlocks(n), kThreads, 0, stream>>>(src, n,
                                                          static_cast<__nv_bfloat16*>(dst));
  return cudaGetLastError();
}

cudaError_t Fill(float* x, int64_t n, float value, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  FillKernel<<<FlatBlocks(n), kThreads, 0, stream>>>(x, n, value);
  return cudaGetLastError();
}

}  // namespace gemma::kernels
