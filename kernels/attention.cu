// Paged attention, one block per (query token, query head), kWarps warps. The query sits in
// shared memory; warp w walks keys w, w + kWarps, ... of the visible range with an online
// softmax, lane l owning dims l, l + 32, ... of the key, value and accumulator (so a key row
// is read as coalesced 128-byte lines). Derived keys (k_eq_v layers) go through a per-warp
// shared row so each lane can reach the partner dim of its rotary pair. At the end the warps'
// partial (max, sum, accumulator) triples are merged through shared memory. With a key split
// (blockIdx.z), each block walks one slice of the range and leaves its merged triple in
// scratch; MergeSplitsKernel combines the slices.
//
// Not yet done: serving all query heads of a KV group from one read of the keys.
#include <algorithm>

#include "kernels/attention.h"
#include "kernels/device_utils.cuh"

namespace gemma::kernels {
namespace {

constexpr int kWarps = 8;
// A split covers at least this many keys, and a query's range is split at most kMaxSplits ways.
constexpr int64_t kMinSplitKeys = 256;
constexpr int64_t kMaxSplits = 64;

// Shared floats: q [d], per-warp key rows [kWarps][d], inverse frequencies [d/2], per-warp
// accumulators [kWarps][d], per-warp max and sum [2][kWarps].
size_t SharedBytes(int64_t d) {
  return sizeof(float) * static_cast<size_t>(d + kWarps * d + d / 2 + kWarps * d + 2 * kWarps);
}

// kDims: dims per lane (head_dim <= 32 * kDims).
template <int kDims>
__global__ void __launch_bounds__(kWarps * 32) PagedAttentionKernel(PagedAttentionParams p,
                                                                    int64_t split_keys) {
  extern __shared__ float smem[];
  const int64_t d = p.head_dim;
  const int64_t half = d / 2;
  float* q_s = smem;
  float* key_s = q_s + d;
  float* freq_s = key_s + kWarps * d;
  float* acc_s = freq_s + half;
  float* max_s = acc_s + kWarps * d;
  float* sum_s = max_s + kWarps;

  const int64_t t = blockIdx.x;
  const int64_t h = blockIdx.y;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t g = h / (p.num_heads / p.num_kv_heads);
  const bool derive_k = p.k_cache == nullptr;
  const int64_t pairs = min(half, p.rope.rotary_pairs);

  // The sequence of token t: the last s with query_start[s] <= t.
  int64_t lo_s = 0, hi_s = p.num_seqs - 1;
  while (lo_s < hi_s) {
    int64_t mid = (lo_s + hi_s + 1) / 2;
    if (p.query_start[mid] <= t) lo_s = mid; else hi_s = mid - 1;
  }
  const int32_t* table = p.page_tables + lo_s * p.max_pages_per_seq;

  const float* qh = p.q + (t * p.num_heads + h) * d;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) q_s[i] = qh[i];
  if (derive_k) {
    for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
      freq_s[i] = i < pairs ? RopeInvFreq(i, p.rope) : 0.0f;
    }
  }
  __syncthreads();

  const int64_t qp = p.positions[t];
  const int64_t visible = p.window > 0 && qp - p.window + 1 > 0 ? qp - p.window + 1 : 0;
  // This block's slice of [visible, qp]: all of it without a split.
  const int64_t split = blockIdx.z;
  const int64_t first = visible + split * split_keys;
  const int64_t last = gridDim.z > 1 ? min(qp, first + split_keys - 1) : qp;
  const int64_t row_elems = p.num_kv_heads * d;
  float* my_key = key_s + warp * d;

  float m = -INFINITY;
  float l = 0.0f;
  float acc[kDims];
  float kreg[kDims];
  float vreg[kDims];
#pragma unroll
  for (int i = 0; i < kDims; ++i) acc[i] = 0.0f;

  for (int64_t j = first + warp; j <= last; j += kWarps) {
    const int64_t logical_page = j / p.page_size;
    if (logical_page >= p.max_pages_per_seq) break;  // past the table row (j only grows)
    const int32_t page = table[logical_page];
    if (page < 0) continue;  // uniform across the warp
    const int64_t base =
        (static_cast<int64_t>(page) * p.page_size + j % p.page_size) * row_elems + g * d;
#pragma unroll
    for (int i = 0; i < kDims; ++i) {
      const int64_t c = lane + 32 * i;
      vreg[i] = c < d ? p.v_cache[base + c] : 0.0f;
      if (!derive_k) kreg[i] = c < d ? p.k_cache[base + c] : 0.0f;
    }
    if (derive_k) {
#pragma unroll
      for (int i = 0; i < kDims; ++i) {
        const int64_t c = lane + 32 * i;
        if (c < d) my_key[c] = vreg[i] * LoadElem(p.k_norm_weight, p.k_norm_type, c);
      }
      __syncwarp();
      const float fj = static_cast<float>(j);
#pragma unroll
      for (int i = 0; i < kDims; ++i) {
        const int64_t c = lane + 32 * i;
        float k = 0.0f;
        if (c < d) {
          k = my_key[c];
          const int64_t pair = c < half ? c : c - half;
          if (pair < pairs) {
            float s, co;
            sincosf(freq_s[pair] * fj, &s, &co);
            k = c < half ? k * co - my_key[c + half] * s : k * co + my_key[c - half] * s;
          }
        }
        kreg[i] = k;
      }
      __syncwarp();
    }
    float dot = 0.0f;
#pragma unroll
    for (int i = 0; i < kDims; ++i) {
      const int64_t c = lane + 32 * i;
      if (c < d) dot += q_s[c] * kreg[i];
    }
    const float score = WarpSum(dot) * p.scale;
    const float m_new = fmaxf(m, score);
    const float correction = expf(m - m_new);
    const float weight = expf(score - m_new);
    l = l * correction + weight;
#pragma unroll
    for (int i = 0; i < kDims; ++i) acc[i] = acc[i] * correction + weight * vreg[i];
    m = m_new;
  }

  // Merge the warps.
#pragma unroll
  for (int i = 0; i < kDims; ++i) {
    const int64_t c = lane + 32 * i;
    if (c < d) acc_s[warp * d + c] = acc[i];
  }
  if (lane == 0) {
    max_s[warp] = m;
    sum_s[warp] = l;
  }
  __syncthreads();
  float m_all = -INFINITY;
  for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, max_s[w]);
  float l_all = 0.0f;
  for (int w = 0; w < kWarps; ++w) {
    if (max_s[w] != -INFINITY) l_all += sum_s[w] * expf(max_s[w] - m_all);
  }
  if (gridDim.z == 1) {
    float* oh = p.out + (t * p.num_heads + h) * d;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      float o = 0.0f;
      for (int w = 0; w < kWarps; ++w) {
        if (max_s[w] != -INFINITY) o += acc_s[w * d + c] * expf(max_s[w] - m_all);
      }
      oh[c] = o / l_all;
    }
    return;
  }
  // The slice's unnormalised accumulator and its (max, sum), for MergeSplitsKernel.
  const int64_t slot = (t * p.num_heads + h) * gridDim.z + split;
  float* part = p.scratch + slot * d;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    float o = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      if (max_s[w] != -INFINITY) o += acc_s[w * d + c] * expf(max_s[w] - m_all);
    }
    part[c] = o;
  }
  if (threadIdx.x == 0) {
    float* ml = p.scratch + p.num_tokens * p.num_heads * gridDim.z * d + 2 * slot;
    ml[0] = m_all;
    ml[1] = l_all;
  }
}

// One block per (token, head): out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M), M the
// largest m_s; slices that saw no key (m_s = -inf) are left out.
__global__ void __launch_bounds__(128) MergeSplitsKernel(PagedAttentionParams p, int64_t splits) {
  const int64_t t = blockIdx.x;
  const int64_t h = blockIdx.y;
  const int64_t d = p.head_dim;
  const int64_t first_slot = (t * p.num_heads + h) * splits;
  const float* ml = p.scratch + p.num_tokens * p.num_heads * splits * d + 2 * first_slot;
  float m_all = -INFINITY;
  for (int64_t s = 0; s < splits; ++s) m_all = fmaxf(m_all, ml[2 * s]);
  float l_all = 0.0f;
  for (int64_t s = 0; s < splits; ++s) {
    if (ml[2 * s] != -INFINITY) l_all += ml[2 * s + 1] * expf(ml[2 * s] - m_all);
  }
  const float* part = p.scratch + first_slot * d;
  float* oh = p.out + (t * p.num_heads + h) * d;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    float o = 0.0f;
    for (int64_t s = 0; s < splits; ++s) {
      if (ml[2 * s] != -INFINITY) o += part[s * d + c] * expf(ml[2 * s] - m_all);
    }
    oh[c] = o / l_all;
  }
}

// The most keys one query can see: the page-table row's positions, at most the window.
int64_t KeyBound(const PagedAttentionParams& p) {
  const int64_t bound = p.max_pages_per_seq * p.page_size;
  return p.window > 0 ? std::min(bound, p.window) : bound;
}

template <int kDims>
cudaError_t Launch(const PagedAttentionParams& p, cudaStream_t stream) {
  const size_t bytes = SharedBytes(p.head_dim);
  if (bytes > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(PagedAttentionKernel<kDims>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(bytes));
    if (err != cudaSuccess) return err;
  }
  const int64_t splits = PagedAttentionSplits(p);
  if (splits > 1 && p.scratch == nullptr) return cudaErrorInvalidValue;
  const int64_t split_keys = CeilDiv(KeyBound(p), splits);
  dim3 grid(static_cast<unsigned>(p.num_tokens), static_cast<unsigned>(p.num_heads),
            static_cast<unsigned>(splits));
  PagedAttentionKernel<kDims><<<grid, kWarps * 32, bytes, stream>>>(p, split_keys);
  if (splits > 1) {
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    dim3 merge_grid(static_cast<unsigned>(p.num_tokens), static_cast<unsigned>(p.num_heads));
    MergeSplitsKernel<<<merge_grid, 128, 0, stream>>>(p, splits);
  }
  return cudaGetLastError();
}

}  // namespace

int64_t PagedAttentionSplits(const PagedAttentionParams& p) {
  const int64_t blocks = p.num_tokens * p.num_heads;
  const int64_t want = 2 * static_cast<int64_t>(NumSms());
  if (blocks <= 0 || blocks >= want) return 1;
  const int64_t splits =
      std::min({CeilDiv(KeyBound(p), kMinSplitKeys), CeilDiv(want, blocks), kMaxSplits});
  return std::max<int64_t>(1, splits);
}

int64_t PagedAttentionScratchFloats(const PagedAttentionParams& p) {
  const int64_t splits = PagedAttentionSplits(p);
  return splits > 1 ? p.num_tokens * p.num_heads * splits * (p.head_dim + 2) : 0;
}

cudaError_t PagedAttention(const PagedAttentionParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.num_heads == 0) return cudaSuccess;
  if (p.head_dim % 2 != 0 || p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads != 0 ||
      p.num_seqs <= 0 || p.page_size <= 0) {
    return cudaErrorInvalidValue;
  }
  if (p.head_dim <= 32) return Launch<1>(p, stream);
  if (p.head_dim <= 128) return Launch<4>(p, stream);
  if (p.head_dim <= 256) return Launch<8>(p, stream);
  if (p.head_dim <= 512) return Launch<16>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace gemma::kernels
