// The expert products of the grouped MoE path, scheduled on the device: the rows of each local
// expert lie contiguous (MoePermute), and MoeScheduleRows has cut each expert's range into
// tiles of kMoeGemmRows rows and numbered them over all experts (tile_start). A block takes one
// tile (blockIdx.x) and 64 output columns (blockIdx.y), finds the tile's expert by binary search
// over tile_start, and computes out[rows, cols] = in[rows, :] W_e[cols, :]^T:
//   - 4 warps, each a 32 x 32 part of the 64 x 64 tile as 2 x 2 wmma 16x16x16 bf16 fragments
//     with f32 accumulators;
//   - k walked in steps of 32: the step's 64 input rows and 64 weight rows are copied to shared
//     memory as bf16 (16-byte vectors where k and the base allow, else element by element),
//     zeros past the tile's rows, past n_out and past k;
//   - the accumulators go through shared memory so that only the rows of the tile's expert and
//     the columns below n_out are written.
// Nothing here reads a count on the host, so the products can follow the router without a
// synchronisation and can be recorded in a CUDA graph.
#include <cuda_bf16.h>
#include <mma.h>

#include <climits>
#include <cstdint>

#include "kernels/moe.h"

namespace gemma::kernels {
namespace {

using namespace nvcuda;

constexpr int kRows = static_cast<int>(kMoeGemmRows);  // rows of a tile
constexpr int kCols = 64;                                // output columns of a block
constexpr int kStep = 32;                                // k per shared-memory stage
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMma = 16;
// Shared rows padded by 8 bf16 (16 bytes) and 4 f32 (16 bytes): fragment pointers stay 32-byte
// aligned, leading dimensions multiples of 16 bytes, and the 16-row loads spread over banks.
constexpr int kLdIn = kStep + 8;
constexpr int kLdOut = kCols + 4;
static_assert(kCols == kRows, "LoadStage fills kRows rows of input and of weights alike");

struct __align__(128) Shared {
  __nv_bfloat16 in[kRows * kLdIn];
  __nv_bfloat16 w[kCols * kLdIn];
  float out[kRows * kLdOut];
};

// Copies rows [0, rows) x columns [k0, k0 + kStep) of a row-major bf16 matrix with leading
// dimension k into dst [kRows][kLdIn], zeros elsewhere (rows past `rows`, columns past k).
__device__ __forceinline__ void LoadStage(const __nv_bfloat16* src, int64_t rows, int64_t k,
                                          int64_t k0, bool vec, __nv_bfloat16* dst) {
  constexpr int kVec = 8;  // bf16 per 16-byte vector
  constexpr int kVecsPerRow = kStep / kVec;
  const __nv_bfloat16 zero = __float2bfloat16_rn(0.0f);
  for (int v = threadIdx.x; v < kRows * kVecsPerRow; v += kThreads) {
    const int r = v / kVecsPerRow;
    const int c = (v % kVecsPerRow) * kVec;
    __nv_bfloat16* d = dst + r * kLdIn + c;
    const int64_t col = k0 + c;
    if (r < rows && vec && col + kVec <= k) {
      *reinterpret_cast<uint4*>(d) = *reinterpret_cast<const uint4*>(src + r * k + col);
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        d[i] = r < rows && col + i < k ? src[r * k + col + i] : zero;
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads) MoeGroupedGemmKernel(MoeGroupedGemmParams p) {
  __shared__ Shared sm;
  __shared__ int64_t expert_s;
  const int64_t tile = blockIdx.x;
  if (threadIdx.x == 0) {
    // The last expert e with tile_start[e] <= tile (experts without rows share their start with
    // the next one, so the search lands on the one that owns the tile); -1 past the last tile.
    int64_t lo = 0, hi = p.num_local;  // answer in [lo, hi)
    if (tile >= p.tile_start[p.num_local]) {
      lo = -1;
    } else {
      while (hi - lo > 1) {
        const int64_t mid = (lo + hi) / 2;
        if (p.tile_start[mid] <= tile) {
          lo = mid;
        } else {
          hi = mid;
        }
      }
    }
    expert_s = lo;
  }
  __syncthreads();
  const int64_t e = expert_s;
  if (e < 0) return;
  const int64_t row0 = p.offsets[e] + (tile - p.tile_start[e]) * kRows;
  const int64_t rows = min(static_cast<int64_t>(kRows), p.offsets[e + 1] - row0);
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kCols;
  const int64_t cols = min(static_cast<int64_t>(kCols), p.n_out - col0);
  const auto* in = static_cast<const __nv_bfloat16*>(p.in) + row0 * p.k;
  const auto* w = static_cast<const __nv_bfloat16*>(p.weights) + (e * p.n_out + col0) * p.k;
  // 16-byte vectors need every row start 16-byte aligned: k a multiple of 8 and aligned bases.
  const bool vec = p.k % 8 == 0 && reinterpret_cast<uintptr_t>(p.in) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(p.weights) % 16 == 0;

  const int warp = threadIdx.x / 32;
  const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;  // this warp's part of the tile
  wmma::fragment<wmma::accumulator, kMma, kMma, kMma, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }
  for (int64_t k0 = 0; k0 < p.k; k0 += kStep) {
    LoadStage(in, rows, p.k, k0, vec, sm.in);
    LoadStage(w, cols, p.k, k0, vec, sm.w);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kStep; kk += kMma) {
      wmma::fragment<wmma::matrix_a, kMma, kMma, kMma, __nv_bfloat16, wmma::row_major> a[2];
      // W_e^T as a k x n matrix: W_e's rows (one per output column) are its columns.
      wmma::fragment<wmma::matrix_b, kMma, kMma, kMma, __nv_bfloat16, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(a[i], sm.in + (wr + i * kMma) * kLdIn + kk, kLdIn);
        wmma::load_matrix_sync(b[i], sm.w + (wc + i * kMma) * kLdIn + kk, kLdIn);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }
    __syncthreads();  // the next stage overwrites the tiles
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(sm.out + (wr + i * kMma) * kLdOut + wc + j * kMma, acc[i][j],
                              kLdOut, wmma::mem_row_major);
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kRows * kCols; idx += kThreads) {
    const int r = idx / kCols, c = idx % kCols;
    if (r < rows && c < cols) p.out[(row0 + r) * p.n_out + col0 + c] = sm.out[r * kLdOut + c];
  }
}

__global__ void MoeScheduleRowsKernel(const int32_t* counts, int64_t num_local, int32_t* offsets,
                                      int32_t* tile_start, int32_t* cursor) {
  int32_t rows = 0, tiles = 0;
  for (int64_t e = 0; e < num_local; ++e) {
    offsets[e] = rows;
    tile_start[e] = tiles;
    cursor[e] = 0;
    rows += counts[e];
    tiles += (counts[e] + kRows - 1) / kRows;
  }
  offsets[num_local] = rows;
  tile_start[num_local] = tiles;
}

}  // namespace

cudaError_t MoeScheduleRows(const int32_t* counts, int64_t num_local, int32_t* offsets,
                            int32_t* tile_start, int32_t* cursor, cudaStream_t stream) {
  if (num_local <= 0) return cudaErrorInvalidValue;
  MoeScheduleRowsKernel<<<1, 1, 0, stream>>>(counts, num_local, offsets, tile_start, cursor);
  return cudaGetLastError();
}

cudaError_t MoeGroupedGemm(const MoeGroupedGemmParams& p, cudaStream_t stream) {
  if (p.num_local <= 0 || p.n_out <= 0 || p.k <= 0 || p.max_rows < 0) {
    return cudaErrorInvalidValue;
  }
  if (p.max_rows == 0) return cudaSuccess;
  const int64_t tiles = MoeGemmMaxTiles(p.max_rows, p.num_local);
  const int64_t col_blocks = (p.n_out + kCols - 1) / kCols;
  if (tiles > INT32_MAX || col_blocks > 65535) return cudaErrorInvalidValue;
  dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(col_blocks));
  MoeGroupedGemmKernel<<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace gemma::kernels
