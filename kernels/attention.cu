// Paged attention. A block serves one query token, up to kWarps query heads of one KV group
// (a "head chunk"), and one slice of the key range. Keys go through shared memory in tiles of
// kWarps: each warp loads one key row and its value row (deriving the key from the value on
// k_eq_v layers: norm weight, then rotary), so every query head of the chunk uses one read and
// one derivation of each key. Warp w then serves head w % hc of the chunk (hc heads) and keys
// w / hc, w / hc + kWarps / hc, ... of each tile with an online softmax, lane l owning dims
// l, l + 32, ... of the accumulator. At the end the warps of each head merge their partial
// (max, sum, accumulator) triples through shared memory. With a key split (blockIdx.z), each
// block walks one slice and leaves its merged triple per head in scratch; MergeSplitsKernel
// combines the slices. The cache holds f32 or bf16 (a template parameter of the kernel): rows
// are widened to f32 as they are loaded into shared memory, and everything after is f32.
#include <cuda_bf16.h>

#include <algorithm>

#include "kernels/attention.h"
#include "kernels/device_utils.cuh"

namespace gemma::kernels {
namespace {

constexpr int kWarps = 8;
// A split covers at least this many keys, and a query's range is split at most kMaxSplits ways.
constexpr int64_t kMinSplitKeys = 32;
constexpr int64_t kMaxSplits = 64;

// Query heads a block serves: the largest of 8, 4, 2, 1 that divides the group.
int64_t HeadChunk(const PagedAttentionParams& p) {
  if (p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads != 0) return 1;
  const int64_t group = p.num_heads / p.num_kv_heads;
  for (int64_t hc = kWarps; hc > 1; hc /= 2) {
    if (group % hc == 0) return hc;
  }
  return 1;
}

// Shared floats: q [kWarps][d], the tile's key and value rows [2][kWarps][d] (reused for the
// warps' accumulators at the end), inverse frequencies [d/2], per-warp max and sum [2][kWarps],
// the tile's key flags [kWarps].
size_t SharedBytes(int64_t d) {
  return sizeof(float) * static_cast<size_t>(3 * kWarps * d + d / 2 + 3 * kWarps);
}

__device__ __forceinline__ float CacheToFloat(float x) { return x; }
__device__ __forceinline__ float CacheToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }

// kDims: dims per lane (head_dim <= 32 * kDims); CacheT: float or __nv_bfloat16, the cache's
// element (p.cache_type).
template <int kDims, typename CacheT>
__global__ void __launch_bounds__(kWarps * 32) PagedAttentionKernel(PagedAttentionParams p,
                                                                    int64_t hc) {
  extern __shared__ float smem[];
  const int64_t d = p.head_dim;
  const int64_t half = d / 2;
  float* q_s = smem;                   // [hc][d]
  float* key_s = q_s + kWarps * d;     // [kWarps][d]
  float* val_s = key_s + kWarps * d;   // [kWarps][d]
  float* acc_s = key_s;                // [kWarps][d], after the last tile
  float* freq_s = val_s + kWarps * d;  // [d/2]
  float* max_s = freq_s + half;        // [kWarps]
  float* sum_s = max_s + kWarps;       // [kWarps]
  float* valid_s = sum_s + kWarps;     // [kWarps]: 1 when the tile's key is visible

  const int64_t t = blockIdx.x;
  const int64_t group = p.num_heads / p.num_kv_heads;
  const int64_t chunks = group / hc;
  const int64_t g = blockIdx.y / chunks;
  const int64_t h0 = g * group + (blockIdx.y % chunks) * hc;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t my_head = warp % hc;
  const int64_t key_lanes = kWarps / hc;
  const int64_t my_key_lane = warp / hc;
  const bool derive_k = p.k_cache == nullptr;
  const CacheT* k_cache = static_cast<const CacheT*>(p.k_cache);
  const CacheT* v_cache = static_cast<const CacheT*>(p.v_cache);
  const int64_t pairs = min(half, p.rope.rotary_pairs);

  // The sequence of token t: the last s with query_start[s] <= t.
  int64_t lo_s = 0, hi_s = p.num_seqs - 1;
  while (lo_s < hi_s) {
    int64_t mid = (lo_s + hi_s + 1) / 2;
    if (p.query_start[mid] <= t) lo_s = mid; else hi_s = mid - 1;
  }
  const int32_t* table = p.page_tables + lo_s * p.max_pages_per_seq;

  const float* qh = p.q + (t * p.num_heads + h0) * d;
  for (int64_t i = threadIdx.x; i < hc * d; i += blockDim.x) q_s[i] = qh[i];
  if (derive_k) {
    for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
      freq_s[i] = i < pairs ? RopeInvFreq(i, p.rope) : 0.0f;
    }
  }
  __syncthreads();

  const int64_t qp = p.positions[t];
  const int64_t visible = p.window > 0 && qp - p.window + 1 > 0 ? qp - p.window + 1 : 0;
  // This block's slice of [visible, qp]: all of it without a split, else an equal share of the
  // keys this query sees (the number of slices is fixed by the shapes, so that a captured graph
  // replays it; their length follows the context); never past the table row.
  const int64_t split = blockIdx.z;
  const int64_t splits = gridDim.z;
  const int64_t split_keys = (qp - visible + 1 + splits - 1) / splits;
  const int64_t first = visible + split * split_keys;
  int64_t last = splits > 1 ? min(qp, first + split_keys - 1) : qp;
  last = min(last, p.max_pages_per_seq * p.page_size - 1);
  const int64_t row_elems = p.num_kv_heads * d;
  float* my_key = key_s + warp * d;
  float* my_val = val_s + warp * d;
  const float* my_q = q_s + my_head * d;

  float m = -INFINITY;
  float l = 0.0f;
  float acc[kDims];
  float qreg[kDims];
#pragma unroll
  for (int i = 0; i < kDims; ++i) {
    const int64_t c = lane + 32 * i;
    acc[i] = 0.0f;
    qreg[i] = c < d ? my_q[c] : 0.0f;
  }

  for (int64_t tile = first; tile <= last; tile += kWarps) {
    // Warp w loads key tile + w.
    const int64_t j = tile + warp;
    bool valid = j <= last;
    int32_t page = -1;
    if (valid) {
      page = table[j / p.page_size];
      valid = page >= 0;  // uniform across the warp
    }
    if (valid) {
      const int64_t base =
          (static_cast<int64_t>(page) * p.page_size + j % p.page_size) * row_elems + g * d;
      float vreg[kDims];
#pragma unroll
      for (int i = 0; i < kDims; ++i) {
        const int64_t c = lane + 32 * i;
        vreg[i] = c < d ? CacheToFloat(v_cache[base + c]) : 0.0f;
        if (c < d) {
          my_val[c] = vreg[i];
          if (!derive_k) my_key[c] = CacheToFloat(k_cache[base + c]);
        }
      }
      if (derive_k) {
#pragma unroll
        for (int i = 0; i < kDims; ++i) {
          const int64_t c = lane + 32 * i;
          if (c < d) my_key[c] = vreg[i] * LoadElem(p.k_norm_weight, p.k_norm_type, c);
        }
        __syncwarp();
        const float fj = static_cast<float>(j);
        float kreg[kDims];
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
#pragma unroll
        for (int i = 0; i < kDims; ++i) {
          const int64_t c = lane + 32 * i;
          if (c < d) my_key[c] = kreg[i];
        }
      }
    }
    if (lane == 0) valid_s[warp] = valid ? 1.0f : 0.0f;
    __syncthreads();
    // This warp's keys of the tile, for its head.
    for (int64_t kk = my_key_lane; kk < kWarps; kk += key_lanes) {
      if (valid_s[kk] == 0.0f) continue;
      const float* kr = key_s + kk * d;
      const float* vr = val_s + kk * d;
      float dot = 0.0f;
#pragma unroll
      for (int i = 0; i < kDims; ++i) {
        const int64_t c = lane + 32 * i;
        if (c < d) dot += qreg[i] * kr[c];
      }
      const float score = WarpSum(dot) * p.scale;
      const float m_new = fmaxf(m, score);
      const float correction = expf(m - m_new);
      const float weight = expf(score - m_new);
      l = l * correction + weight;
#pragma unroll
      for (int i = 0; i < kDims; ++i) {
        const int64_t c = lane + 32 * i;
        acc[i] = acc[i] * correction + weight * (c < d ? vr[c] : 0.0f);
      }
      m = m_new;
    }
    __syncthreads();
  }

  // Merge the warps of each head.
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
  for (int64_t idx = threadIdx.x; idx < hc * d; idx += blockDim.x) {
    const int64_t hs = idx / d;
    const int64_t c = idx - hs * d;
    float m_all = -INFINITY;
    for (int64_t w = hs; w < kWarps; w += hc) m_all = fmaxf(m_all, max_s[w]);
    float l_all = 0.0f;
    float o = 0.0f;
    for (int64_t w = hs; w < kWarps; w += hc) {
      if (max_s[w] == -INFINITY) continue;
      const float f = expf(max_s[w] - m_all);
      l_all += sum_s[w] * f;
      o += acc_s[w * d + c] * f;
    }
    const int64_t h = h0 + hs;
    if (gridDim.z == 1) {
      p.out[(t * p.num_heads + h) * d + c] = o / l_all;
      continue;
    }
    // The slice's unnormalised accumulator and its (max, sum), for MergeSplitsKernel.
    const int64_t slot = (t * p.num_heads + h) * gridDim.z + split;
    p.scratch[slot * d + c] = o;
    if (c == 0) {
      float* ml = p.scratch + p.num_tokens * p.num_heads * gridDim.z * d + 2 * slot;
      ml[0] = m_all;
      ml[1] = l_all;
    }
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

template <int kDims, typename CacheT>
cudaError_t Launch(const PagedAttentionParams& p, cudaStream_t stream) {
  const size_t bytes = SharedBytes(p.head_dim);
  if (bytes > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(PagedAttentionKernel<kDims, CacheT>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(bytes));
    if (err != cudaSuccess) return err;
  }
  const int64_t splits = PagedAttentionSplits(p);
  if (splits > 1 && p.scratch == nullptr) return cudaErrorInvalidValue;
  const int64_t hc = HeadChunk(p);
  dim3 grid(static_cast<unsigned>(p.num_tokens), static_cast<unsigned>(p.num_heads / hc),
            static_cast<unsigned>(splits));
  PagedAttentionKernel<kDims, CacheT><<<grid, kWarps * 32, bytes, stream>>>(p, hc);
  if (splits > 1) {
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    dim3 merge_grid(static_cast<unsigned>(p.num_tokens), static_cast<unsigned>(p.num_heads));
    MergeSplitsKernel<<<merge_grid, 128, 0, stream>>>(p, splits);
  }
  return cudaGetLastError();
}

template <int kDims>
cudaError_t LaunchForCache(const PagedAttentionParams& p, cudaStream_t stream) {
  return p.cache_type == ElemType::kF32 ? Launch<kDims, float>(p, stream)
                                        : Launch<kDims, __nv_bfloat16>(p, stream);
}

}  // namespace

int64_t PagedAttentionSplits(const PagedAttentionParams& p) {
  const int64_t blocks = p.num_tokens * (p.num_heads / HeadChunk(p));
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
  if (p.head_dim <= 32) return LaunchForCache<1>(p, stream);
  if (p.head_dim <= 128) return LaunchForCache<4>(p, stream);
  if (p.head_dim <= 256) return LaunchForCache<8>(p, stream);
  if (p.head_dim <= 512) return LaunchForCache<16>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace gemma::kernels
