// Sampling kernels. Argmax and log-sum-exp are one block per row (argmax: see below). The sort is CUB's segmented
// radix sort (stable: equal keys keep their input order, so ties list the lower id first, as
// the reference does). The draw walks the sorted row in tiles of the block with a block-wide
// inclusive scan in double, stopping at the first tile that holds the answer.
#include <cub/block/block_scan.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>

#include "kernels/device_utils.cuh"
#include "kernels/sampling.h"

namespace gemma::kernels {
namespace {

constexpr int kThreads = 256;

// Argmax: one block of kArgmaxThreads per row. On 16-byte aligned rows each thread reads
// float4s, kArgmaxUnroll of them in flight, so that one block pulls a 262144-entry row at a
// good share of the bandwidth one multiprocessor can draw.
constexpr int kArgmaxThreads = 1024;
constexpr int kArgmaxUnroll = 4;

// (value, index): the larger value wins, then the lower index; `idx == cols` (nothing yet)
// loses to anything.
__device__ __forceinline__ void ArgmaxTake(float xv, int64_t j, int64_t cols, float& v,
                                           int64_t& idx) {
  if (xv > v || idx == cols) {
    v = xv;
    idx = j;
  }
}

template <bool kVec>
__global__ void __launch_bounds__(kArgmaxThreads) ArgmaxKernel(const float* x, int64_t cols,
                                                               int32_t* ids) {
  __shared__ float best_v[kArgmaxThreads / 32];
  __shared__ int64_t best_i[kArgmaxThreads / 32];
  const float* row = x + blockIdx.x * cols;
  float v = -INFINITY;
  int64_t idx = cols;  // past the end: loses every comparison
  if constexpr (kVec) {
    const float4* row4 = reinterpret_cast<const float4*>(row);
    const int64_t vecs = cols / 4;
    constexpr int64_t kStride = int64_t{kArgmaxThreads} * kArgmaxUnroll;
    for (int64_t base = threadIdx.x; base < vecs; base += kStride) {
      float4 q[kArgmaxUnroll];
#pragma unroll
      for (int u = 0; u < kArgmaxUnroll; ++u) {
        const int64_t i = base + int64_t{u} * kArgmaxThreads;
        q[u] = i < vecs ? row4[i] : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
      }
#pragma unroll
      for (int u = 0; u < kArgmaxUnroll; ++u) {
        const int64_t i = base + int64_t{u} * kArgmaxThreads;
        if (i < vecs) {
          ArgmaxTake(q[u].x, 4 * i, cols, v, idx);
          ArgmaxTake(q[u].y, 4 * i + 1, cols, v, idx);
          ArgmaxTake(q[u].z, 4 * i + 2, cols, v, idx);
          ArgmaxTake(q[u].w, 4 * i + 3, cols, v, idx);
        }
      }
    }
  } else {
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) ArgmaxTake(row[j], j, cols, v, idx);
  }
  // Across lanes, then warps: larger value, then lower index.
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float ov = __shfl_xor_sync(kFullMask, v, offset);
    const int64_t oi = __shfl_xor_sync(kFullMask, idx, offset);
    if (oi != cols && (idx == cols || ov > v || (ov == v && oi < idx))) {
      v = ov;
      idx = oi;
    }
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) {
    best_v[warp] = v;
    best_i[warp] = idx;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kArgmaxThreads / 32; ++w) {
      const float ov = best_v[w];
      const int64_t oi = best_i[w];
      if (oi != cols && (idx == cols || ov > v || (ov == v && oi < idx))) {
        v = ov;
        idx = oi;
      }
    }
    ids[blockIdx.x] = static_cast<int32_t>(idx < cols ? idx : 0);
  }
}

__global__ void __launch_bounds__(kThreads) LogSumExpKernel(const float* x, int64_t cols,
                                                            const float* temperature,
                                                            float* max_out, float* sum_out) {
  __shared__ float scratch_f[32];
  __shared__ double scratch_d[32];
  const float* row = x + blockIdx.x * cols;
  const float t = temperature[blockIdx.x];
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) m = fmaxf(m, row[j]);
  m = BlockMax(m, scratch_f);
  const float max_scaled = m / t;
  double total = 0.0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    total += exp(static_cast<double>(row[j] / t) - static_cast<double>(max_scaled));
  }
  total = BlockSum(total, scratch_d);
  if (threadIdx.x == 0) {
    max_out[blockIdx.x] = max_scaled;
    sum_out[blockIdx.x] = static_cast<float>(total);
  }
}

__global__ void IotaRowsKernel(int64_t rows, int64_t cols, int32_t* ids, int32_t* offsets) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    ids[i] = static_cast<int32_t>(i % cols);
    if (i % cols == 0) offsets[i / cols] = static_cast<int32_t>(i);
    if (i == total - 1) offsets[rows] = static_cast<int32_t>(total);
  }
}

__global__ void TakeTopKKernel(const float* sorted_values, const int32_t* sorted_ids,
                               int64_t cols, int64_t k, int64_t id_offset, float* values,
                               int32_t* ids) {
  const int64_t r = blockIdx.x;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    values[r * k + i] = sorted_values[r * cols + i];
    ids[r * k + i] = static_cast<int32_t>(sorted_ids[r * cols + i] + id_offset);
  }
}

using BlockScanD = cub::BlockScan<double, kThreads>;

// The first index i < limit (in tiles of the block) where the running sum of term(i) satisfies
// `reached(cumulative)`, or limit if none; `term` is evaluated per element.
template <typename Term, typename Reached>
__device__ int64_t FirstReaching(int64_t limit, Term term, Reached reached,
                                 typename BlockScanD::TempStorage& temp, int64_t* found_s) {
  double carry = 0.0;
  for (int64_t base = 0; base < limit; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    const double v = i < limit ? term(i) : 0.0;
    double inclusive, tile_total;
    BlockScanD(temp).InclusiveSum(v, inclusive, tile_total);
    if (threadIdx.x == 0) *found_s = limit;
    __syncthreads();
    if (i < limit && reached(carry + inclusive)) atomicMin(reinterpret_cast<unsigned long long*>(found_s), static_cast<unsigned long long>(i));
    __syncthreads();
    const int64_t found = *found_s;
    __syncthreads();
    if (found < limit) return found;
    carry += tile_total;
  }
  return limit;
}

__global__ void __launch_bounds__(kThreads) SampleSortedKernel(const float* sorted_values,
                                                               const int32_t* sorted_ids,
                                                               int64_t cols,
                                                               const SampleRow* params,
                                                               int32_t* ids) {
  __shared__ typename BlockScanD::TempStorage temp;
  __shared__ double scratch[32];
  __shared__ int64_t found_s;
  const SampleRow p = params[blockIdx.x];
  if (p.temperature <= 0.0f) return;
  const float* row = sorted_values + blockIdx.x * cols;
  const int64_t keep = p.top_k > 0 && p.top_k < cols ? int64_t{p.top_k} : cols;
  const double max_scaled = static_cast<double>(row[0] / p.temperature);
  auto prob = [&](int64_t i) { return exp(static_cast<double>(row[i] / p.temperature) - max_scaled); };
  double total = 0.0;
  for (int64_t i = threadIdx.x; i < keep; i += blockDim.x) total += prob(i);
  total = BlockSum(total, scratch);
  // Top-p: the smallest prefix whose probability reaches top_p.
  int64_t nucleus = keep;
  if (p.top_p < 1.0f) {
    const double top_p = p.top_p;
    const int64_t last = FirstReaching(
        keep, [&](int64_t i) { return prob(i) / total; },
        [&](double c) { return c >= top_p; }, temp, &found_s);
    nucleus = last < keep ? last + 1 : keep;
  }
  double nucleus_total = 0.0;
  for (int64_t i = threadIdx.x; i < nucleus; i += blockDim.x) nucleus_total += prob(i);
  nucleus_total = BlockSum(nucleus_total, scratch);
  const double target = p.uniform * nucleus_total;
  const int64_t chosen =
      FirstReaching(nucleus, prob, [&](double c) { return target < c; }, temp, &found_s);
  if (threadIdx.x == 0) {
    ids[blockIdx.x] = sorted_ids[blockIdx.x * cols + (chosen < nucleus ? chosen : nucleus - 1)];
  }
}

unsigned FlatBlocks(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(CeilDiv(n, kThreads), 65536)));
}

// Scratch layout: iota ids [rows * cols] i32, offsets [rows + 1] i32, then CUB's temporary
// storage, each 256-byte aligned.
size_t Align(size_t v) { return (v + 255) / 256 * 256; }

size_t CubBytes(int64_t rows, int64_t cols) {
  size_t bytes = 0;
  cub::DeviceSegmentedRadixSort::SortPairsDescending(
      nullptr, bytes, static_cast<const float*>(nullptr), static_cast<float*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
      static_cast<int>(rows * cols), static_cast<int>(rows), static_cast<const int32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr));
  return bytes;
}

}  // namespace

cudaError_t Argmax(const float* x, int64_t rows, int64_t cols, int32_t* ids, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (cols % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0) {
    ArgmaxKernel<true><<<static_cast<unsigned>(rows), kArgmaxThreads, 0, stream>>>(x, cols, ids);
  } else {
    ArgmaxKernel<false><<<static_cast<unsigned>(rows), kArgmaxThreads, 0, stream>>>(x, cols, ids);
  }
  return cudaGetLastError();
}

cudaError_t LogSumExp(const float* x, int64_t rows, int64_t cols, const float* temperature,
                      float* max_out, float* sum_out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  LogSumExpKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(x, cols, temperature,
                                                                        max_out, sum_out);
  return cudaGetLastError();
}

size_t SortRowsScratchBytes(int64_t rows, int64_t cols) {
  return Align(sizeof(int32_t) * rows * cols) + Align(sizeof(int32_t) * (rows + 1)) +
         Align(CubBytes(rows, cols));
}

cudaError_t SortRows(const float* x, int64_t rows, int64_t cols, float* sorted_values,
                     int32_t* sorted_ids, void* scratch, size_t scratch_bytes,
                     cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (rows * cols > INT32_MAX || scratch_bytes < SortRowsScratchBytes(rows, cols)) {
    return cudaErrorInvalidValue;
  }
  auto* base = static_cast<char*>(scratch);
  auto* iota = reinterpret_cast<int32_t*>(base);
  auto* offsets = reinterpret_cast<int32_t*>(base + Align(sizeof(int32_t) * rows * cols));
  void* cub_temp = base + Align(sizeof(int32_t) * rows * cols) + Align(sizeof(int32_t) * (rows + 1));
  size_t cub_bytes = CubBytes(rows, cols);
  IotaRowsKernel<<<FlatBlocks(rows * cols), kThreads, 0, stream>>>(rows, cols, iota, offsets);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return cub::DeviceSegmentedRadixSort::SortPairsDescending(
      cub_temp, cub_bytes, x, sorted_values, iota, sorted_ids, static_cast<int>(rows * cols),
      static_cast<int>(rows), offsets, offsets + 1, 0, static_cast<int>(sizeof(float) * 8),
      stream);
}

cudaError_t TakeTopK(const float* sorted_values, const int32_t* sorted_ids, int64_t rows,
                     int64_t cols, int64_t k, int64_t id_offset, float* values, int32_t* ids,
                     cudaStream_t stream) {
  if (rows == 0 || k == 0) return cudaSuccess;
  if (k > cols) return cudaErrorInvalidValue;
  TakeTopKKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      sorted_values, sorted_ids, cols, k, id_offset, values, ids);
  return cudaGetLastError();
}

cudaError_t SampleSorted(const float* sorted_values, const int32_t* sorted_ids, int64_t rows,
                         int64_t cols, const SampleRow* params, int32_t* ids,
                         cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  SampleSortedKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      sorted_values, sorted_ids, cols, params, ids);
  return cudaGetLastError();
}

}  // namespace gemma::kernels
