// Prefill attention on tensor cores (flash-attention style), over the paged cache of
// PagedAttention.
//
// A block serves up to kTokens = kRows / hc query tokens of one sequence and hc query heads of
// one KV group: row r of its products is token r / hc, head r % hc of the chunk. Sequences are
// cut into tiles of kTokens on their own, so a block never mixes page tables; blocks are
// numbered over every sequence's tiles in order (at most CeilDiv(num_tokens, kTokens) +
// num_seqs - 1 of them; the ones past the last tile return at once).
//
// The block walks the keys its queries see (the union of their ranges, at most up to the
// page-table row's end) in tiles of kKeys, each in four phases separated by barriers:
//   1. load: K and V rows of the tile into shared memory as bf16 (a bf16 cache is copied, an f32
//      one rounded to nearest even); on k_eq_v layers K = RoPE(V * k_norm) is derived in f32
//      from the widened V, with the formulas of PagedAttentionKernel, then rounded; keys whose
//      page is -1, that lie past the page-table row or that no row of the block sees are not
//      read: they are zeros, flagged invalid;
//   2. S = Q K^T: bf16 16x16x16 MMAs (nvcuda::wmma) with f32 accumulation into shared memory;
//      where the tile has fewer 16x16 score tiles than warps, head_dim is split over warps and
//      the parts are summed in phase 3;
//   3. online softmax: a warp owns kRows / kWarps rows; it masks each row to its query's range
//      (causal, window) and valid keys, scales, updates the row's running max and sum (in
//      registers), rescales the row's output accumulator in shared memory when the max grew,
//      and writes the probabilities P rounded to bf16 (the sum adds the rounded values, so that
//      the output is the same convex combination the P.V product forms);
//   4. O += P V: bf16 MMAs on the f32 accumulator tiles, loaded from and stored back to shared
//      memory (the wmma accumulator's element-to-row mapping is unspecified, so the per-row
//      rescale of phase 3 happens in shared memory where rows are addressable).
// At the end each warp writes its rows' O / sum. Queries are rounded to bf16 once, when the
// block loads them.
//
// Tile shapes: 64 rows x 64 keys for head_dim <= 256, 32 x 32 above (head_dim 512: Q, K and V
// tiles in bf16 plus the f32 accumulator take 180 KB of the H100's 227 KB a block).
#include <cuda_bf16.h>
#include <mma.h>

#include <algorithm>
#include <climits>

#include "kernels/device_utils.cuh"
#include "kernels/prefill_attention.h"

namespace gemma::kernels {
namespace {

using namespace nvcuda;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMma = 16;  // wmma m = n = k
// Padding of shared rows, in elements: bf16 rows shift by 16 bytes and f32 rows by 16 bytes,
// which keeps the 16-row fragment loads off one bank, and keeps every fragment pointer 32-byte
// aligned and every leading dimension a multiple of 16 bytes, as wmma requires.
constexpr int64_t kBf16Pad = 8;
constexpr int64_t kF32Pad = 4;
// The H100's and H200's opt-in shared memory per block.
constexpr size_t kMaxSharedBytes = 227 * 1024;

// Query heads a block serves: the largest of 8, 4, 2, 1 that divides the group (as
// PagedAttention's head chunk).
int64_t HeadChunk(const PagedAttentionParams& p) {
  const int64_t group = p.num_heads / p.num_kv_heads;
  for (int64_t hc = 8; hc > 1; hc /= 2) {
    if (group % hc == 0) return hc;
  }
  return 1;
}

__host__ __device__ constexpr int64_t AlignUp(int64_t x) { return (x + 127) / 128 * 128; }

// Byte offsets of a block's shared arrays for head_dim d; every array starts 128-byte aligned.
template <int kRows, int kKeys>
struct Smem {
  static constexpr int kScoreTiles = (kRows / kMma) * (kKeys / kMma);
  // Parts head_dim is split into for S = Q K^T, so that every warp has a score tile to work on.
  static constexpr int kSplitD = kScoreTiles >= kWarps ? 1 : kWarps / kScoreTiles;

  __host__ __device__ explicit Smem(int64_t d)
      : ld_bf16(d + kBf16Pad),
        ld_o(d + kF32Pad),
        ld_s(kKeys + kF32Pad),
        ld_p(kKeys + kBf16Pad),
        q(0),
        k(q + AlignUp(2 * kRows * ld_bf16)),
        v(k + AlignUp(2 * kKeys * ld_bf16)),
        o(v + AlignUp(2 * kKeys * ld_bf16)),
        s(o + AlignUp(4 * kRows * ld_o)),
        p(s + AlignUp(4 * kSplitD * kRows * ld_s)),
        norm(p + AlignUp(2 * kRows * ld_p)),
        freq(norm + AlignUp(4 * d)),
        row_pos(freq + AlignUp(4 * (d / 2))),
        row_lo(row_pos + AlignUp(4 * kRows)),
        key_ok(row_lo + AlignUp(4 * kRows)),
        info(key_ok + AlignUp(4 * kKeys)),
        bytes(info + AlignUp(8 * kInfo)) {}

  // info: the block's sequence (-1: no tile), its first and one-past-last token, and the first
  // and last key it walks.
  static constexpr int kInfo = 5;

  int64_t ld_bf16;  // q, k, v rows (bf16 elements)
  int64_t ld_o;     // accumulator rows (floats)
  int64_t ld_s;     // score rows (floats)
  int64_t ld_p;     // probability rows (bf16 elements)
  int64_t q;        // bf16 [kRows][ld_bf16]
  int64_t k;        // bf16 [kKeys][ld_bf16]
  int64_t v;        // bf16 [kKeys][ld_bf16]
  int64_t o;        // f32 [kRows][ld_o]
  int64_t s;        // f32 [kSplitD][kRows][ld_s]
  int64_t p;        // bf16 [kRows][ld_p]
  int64_t norm;     // f32 [d]: the k_norm weight (k_eq_v layers)
  int64_t freq;     // f32 [d / 2]: rotary inverse frequencies, 0 past rotary_pairs
  int64_t row_pos;  // i32 [kRows]: the row's query position, -1 for a row past the tile's tokens
  int64_t row_lo;   // i32 [kRows]: the row's first visible key position
  int64_t key_ok;   // i32 [kKeys]: 1 when the tile's key is in the cache (page >= 0, in the row)
  int64_t info;     // i64 [kInfo]
  int64_t bytes;
};

// Eight consecutive cache elements (16-byte aligned) widened to f32.
__device__ __forceinline__ void Load8(const float* src, float (&x)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(src);
  const float4 b = *reinterpret_cast<const float4*>(src + 4);
  x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
  x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
}
__device__ __forceinline__ void Load8(const __nv_bfloat16* src, float (&x)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(src);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}

// Eight floats rounded to nearest even bf16, stored 16 bytes at once (dst 16-byte aligned).
__device__ __forceinline__ void Store8Bf16(__nv_bfloat16* dst, const float (&x)[8]) {
  uint4 u;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(x[2 * i], x[2 * i + 1]);
  *reinterpret_cast<uint4*>(dst) = u;
}

__device__ __forceinline__ void Zero8Bf16(__nv_bfloat16* dst) {
  *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
}

// kRows: (token, head) rows a block serves; kKeys: keys a tile; CacheT: float or
// __nv_bfloat16, the cache's element (p.cache_type).
template <int kRows, int kKeys, typename CacheT>
__global__ void __launch_bounds__(kThreads) PrefillAttentionKernel(PagedAttentionParams p,
                                                                   int hc) {
  static_assert(kRows % kMma == 0 && kKeys % 32 == 0 && kRows % kWarps == 0);
  using L = Smem<kRows, kKeys>;
  constexpr int kRowsPerWarp = kRows / kWarps;
  constexpr int kKeysPerLane = kKeys / 32;
  constexpr int kKeyTiles = kKeys / kMma;  // score tiles across a row
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t d = p.head_dim;
  const int64_t half = d / 2;
  const L lay(d);
  __nv_bfloat16* q_s = reinterpret_cast<__nv_bfloat16*>(smem + lay.q);
  __nv_bfloat16* k_s = reinterpret_cast<__nv_bfloat16*>(smem + lay.k);
  __nv_bfloat16* v_s = reinterpret_cast<__nv_bfloat16*>(smem + lay.v);
  float* o_s = reinterpret_cast<float*>(smem + lay.o);
  float* s_s = reinterpret_cast<float*>(smem + lay.s);
  __nv_bfloat16* p_s = reinterpret_cast<__nv_bfloat16*>(smem + lay.p);
  float* norm_s = reinterpret_cast<float*>(smem + lay.norm);
  float* freq_s = reinterpret_cast<float*>(smem + lay.freq);
  int32_t* row_pos_s = reinterpret_cast<int32_t*>(smem + lay.row_pos);
  int32_t* row_lo_s = reinterpret_cast<int32_t*>(smem + lay.row_lo);
  int32_t* key_ok_s = reinterpret_cast<int32_t*>(smem + lay.key_ok);
  int64_t* info_s = reinterpret_cast<int64_t*>(smem + lay.info);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t tokens_per_block = kRows / hc;
  const int64_t group = p.num_heads / p.num_kv_heads;
  const int64_t chunks = group / hc;
  const int64_t g = blockIdx.y / chunks;
  const int64_t h0 = g * group + (blockIdx.y % chunks) * hc;
  const bool derive_k = p.k_cache == nullptr;
  const CacheT* k_cache = static_cast<const CacheT*>(p.k_cache);
  const CacheT* v_cache = static_cast<const CacheT*>(p.v_cache);
  const int64_t pairs = min(half, p.rope.rotary_pairs);
  const int64_t row_elems = p.num_kv_heads * d;
  const int64_t table_keys = p.max_pages_per_seq * p.page_size;
  // Key positions are int32 (p.positions), so the page arithmetic of the inner loops is too.
  const int page_size = static_cast<int>(p.page_size);
  const int dim = static_cast<int>(d);

  // This block's tile: sequence s owns blocks [sum of earlier sequences' tiles, + its own).
  if (threadIdx.x == 0) {
    int64_t seq = -1, first_tok = 0, end_tok = 0;
    int64_t before = 0;
    for (int64_t s = 0; s < p.num_seqs; ++s) {
      const int64_t begin = p.query_start[s], end = p.query_start[s + 1];
      const int64_t tiles = (end - begin + tokens_per_block - 1) / tokens_per_block;
      if (static_cast<int64_t>(blockIdx.x) < before + tiles) {
        seq = s;
        first_tok = begin + (blockIdx.x - before) * tokens_per_block;
        end_tok = min(end, first_tok + tokens_per_block);
        break;
      }
      before += tiles;
    }
    // The keys the tile's queries see: from the smallest first visible position to the largest
    // query position, never past the page-table row.
    int64_t first_key = LLONG_MAX, last_key = -1;
    for (int64_t t = first_tok; t < end_tok; ++t) {
      const int64_t qp = p.positions[t];
      const int64_t lo = p.window > 0 && qp - p.window + 1 > 0 ? qp - p.window + 1 : 0;
      first_key = min(first_key, lo);
      last_key = max(last_key, qp);
    }
    info_s[0] = seq;
    info_s[1] = first_tok;
    info_s[2] = end_tok;
    info_s[3] = first_key;
    info_s[4] = min(last_key, table_keys - 1);
  }
  __syncthreads();
  const int64_t seq = info_s[0];
  if (seq < 0) return;  // uniform: past the last tile
  const int64_t first_tok = info_s[1], end_tok = info_s[2];
  const int64_t first_key = info_s[3], last_key = info_s[4];
  const int32_t* table = p.page_tables + seq * p.max_pages_per_seq;

  // Rows' positions and queries (rounded to bf16), the norm weight and inverse frequencies,
  // and a zero accumulator.
  for (int r = threadIdx.x; r < kRows; r += kThreads) {
    const int64_t t = first_tok + r / hc;
    int32_t pos = -1, lo = 0;  // a row past the tile's tokens sees no key
    if (t < end_tok) {
      pos = p.positions[t];
      lo = p.window > 0 && pos - p.window + 1 > 0 ? static_cast<int32_t>(pos - p.window + 1) : 0;
    }
    row_pos_s[r] = pos;
    row_lo_s[r] = lo;
  }
  for (int i = threadIdx.x; i < kRows * dim; i += kThreads) {
    const int r = i / dim, c = i - r * dim;
    const int64_t t = first_tok + r / hc;
    const float x = t < end_tok ? p.q[(t * p.num_heads + h0 + r % hc) * d + c] : 0.0f;
    q_s[r * lay.ld_bf16 + c] = __float2bfloat16_rn(x);
    o_s[r * lay.ld_o + c] = 0.0f;
  }
  if (derive_k) {
    for (int64_t c = threadIdx.x; c < d; c += kThreads) {
      norm_s[c] = LoadElem(p.k_norm_weight, p.k_norm_type, c);
    }
    for (int64_t i = threadIdx.x; i < half; i += kThreads) {
      freq_s[i] = i < pairs ? RopeInvFreq(i, p.rope) : 0.0f;
    }
  }
  // The running max and sum of this warp's rows.
  float m_row[kRowsPerWarp], l_row[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    m_row[i] = -INFINITY;
    l_row[i] = 0.0f;
  }
  __syncthreads();

  const int chunks_per_half = dim / 16;  // 8-element chunks of a row's first half
  const int ksteps = dim / kMma;
  const int ksteps_per_part = (ksteps + L::kSplitD - 1) / L::kSplitD;
  const int o_tiles = (kRows / kMma) * ksteps;

  // Flags the keys of the tile at `tile` that are in the cache (page >= 0, within the row) and
  // that some row of the block sees. Only those are read: PagedAttention's contract is that
  // the cache holds every visible key, and a key no row sees may hold anything.
  auto flag_keys = [&](int64_t tile) {
    for (int kk = threadIdx.x; kk < kKeys; kk += kThreads) {
      const int64_t j = tile + kk;
      int32_t ok = 0;
      if (j <= last_key && table[static_cast<int>(j) / page_size] >= 0) {
        for (int r = 0; r < kRows && ok == 0; r += hc) {  // one row per token
          ok = row_lo_s[r] <= j && j <= row_pos_s[r] ? 1 : 0;
        }
      }
      key_ok_s[kk] = ok;
    }
  };
  flag_keys(first_key);
  __syncthreads();

  for (int64_t tile = first_key; tile <= last_key; tile += kKeys) {
    // 1. K and V rows of keys tile .. tile + kKeys - 1 (flagged by the previous iteration, or
    // before the loop). A thread takes chunk c .. c + 7 of a row and its rotary partner
    // c + half .. c + half + 7.
    for (int item = threadIdx.x; item < kKeys * chunks_per_half; item += kThreads) {
      const int kk = item / chunks_per_half;
      const int c = (item - kk * chunks_per_half) * 8;
      const int j = static_cast<int>(tile) + kk;  // <= last_key where read
      __nv_bfloat16* k_row = k_s + kk * lay.ld_bf16;
      __nv_bfloat16* v_row = v_s + kk * lay.ld_bf16;
      if (key_ok_s[kk] == 0) {
        // Zeros, not whatever the cache holds: P is 0 for this key, and 0 times a NaN would
        // still be NaN.
        Zero8Bf16(k_row + c);
        Zero8Bf16(k_row + c + half);
        Zero8Bf16(v_row + c);
        Zero8Bf16(v_row + c + half);
        continue;
      }
      const int32_t page = table[j / page_size];
      const int64_t base =
          (static_cast<int64_t>(page) * page_size + j % page_size) * row_elems + g * d;
      float lo[8], hi[8];
      Load8(v_cache + base + c, lo);
      Load8(v_cache + base + c + half, hi);
      Store8Bf16(v_row + c, lo);
      Store8Bf16(v_row + c + half, hi);
      if (derive_k) {
        // As PagedAttentionKernel: x = v * k_norm, then pair (c, c + half) turns by
        // j * inv_freq when it is one of the rotary pairs.
        const float fj = static_cast<float>(j);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int pair = c + i;
          float x_lo = lo[i] * norm_s[pair];
          float x_hi = hi[i] * norm_s[pair + half];
          if (pair < pairs) {
            float s, co;
            sincosf(freq_s[pair] * fj, &s, &co);
            const float k_lo = x_lo * co - x_hi * s;
            const float k_hi = x_hi * co + x_lo * s;
            x_lo = k_lo;
            x_hi = k_hi;
          }
          lo[i] = x_lo;
          hi[i] = x_hi;
        }
      } else {
        Load8(k_cache + base + c, lo);
        Load8(k_cache + base + c + half, hi);
      }
      Store8Bf16(k_row + c, lo);
      Store8Bf16(k_row + c + half, hi);
    }
    __syncthreads();

    // 2. S = Q K^T, score tile st of part `part` of head_dim per item.
    for (int item = warp; item < L::kScoreTiles * L::kSplitD; item += kWarps) {
      const int st = item % L::kScoreTiles;
      const int part = item / L::kScoreTiles;
      const int tr = st / kKeyTiles, tc = st % kKeyTiles;
      const int k0 = part * ksteps_per_part;
      const int k1 = min(ksteps, k0 + ksteps_per_part);
      wmma::fragment<wmma::accumulator, kMma, kMma, kMma, float> acc;
      wmma::fill_fragment(acc, 0.0f);
      for (int ks = k0; ks < k1; ++ks) {
        wmma::fragment<wmma::matrix_a, kMma, kMma, kMma, __nv_bfloat16, wmma::row_major> a;
        // K^T as a column-major B: element (k, n) is K[n][k], at k_s[n * ld + k].
        wmma::fragment<wmma::matrix_b, kMma, kMma, kMma, __nv_bfloat16, wmma::col_major> b;
        wmma::load_matrix_sync(a, q_s + tr * kMma * lay.ld_bf16 + ks * kMma, lay.ld_bf16);
        wmma::load_matrix_sync(b, k_s + tc * kMma * lay.ld_bf16 + ks * kMma, lay.ld_bf16);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(s_s + (part * kRows + tr * kMma) * lay.ld_s + tc * kMma, acc,
                              lay.ld_s, wmma::mem_row_major);
    }
    __syncthreads();

    // 3. Online softmax of this warp's rows; lane l owns keys l, l + 32, ... of the tile.
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int r = warp * kRowsPerWarp + i;
      const int64_t pos = row_pos_s[r], lo = row_lo_s[r];
      float sc[kKeysPerLane];
      float tile_max = -INFINITY;
#pragma unroll
      for (int e = 0; e < kKeysPerLane; ++e) {
        const int64_t kk = lane + 32 * e;
        const int64_t j = tile + kk;
        float s = 0.0f;
#pragma unroll
        for (int part = 0; part < L::kSplitD; ++part) s += s_s[(part * kRows + r) * lay.ld_s + kk];
        const bool visible = key_ok_s[kk] != 0 && j >= lo && j <= pos;
        sc[e] = visible ? s * p.scale : -INFINITY;
        tile_max = fmaxf(tile_max, sc[e]);
      }
      tile_max = WarpMax(tile_max);
      const float m_new = fmaxf(m_row[i], tile_max);
      __nv_bfloat16* p_row = p_s + r * lay.ld_p;
      if (m_new == -INFINITY) {  // no key of this row seen yet: P = 0, nothing to rescale
#pragma unroll
        for (int e = 0; e < kKeysPerLane; ++e) p_row[lane + 32 * e] = __float2bfloat16_rn(0.0f);
        continue;
      }
      const float correction = expf(m_row[i] - m_new);  // 0 while the row had no key
      float sum = 0.0f;
#pragma unroll
      for (int e = 0; e < kKeysPerLane; ++e) {
        const __nv_bfloat16 pw =
            __float2bfloat16_rn(sc[e] == -INFINITY ? 0.0f : expf(sc[e] - m_new));
        p_row[lane + 32 * e] = pw;
        sum += __bfloat162float(pw);
      }
      sum = WarpSum(sum);
      l_row[i] = l_row[i] * correction + sum;
      m_row[i] = m_new;
      if (correction != 1.0f) {  // uniform across the warp
        float* o_row = o_s + r * lay.ld_o;
        for (int64_t c = lane; c < d; c += 32) o_row[c] *= correction;
      }
    }
    __syncthreads();

    // 4. O += P V, accumulator tile ot per item.
    for (int ot = warp; ot < o_tiles; ot += kWarps) {
      const int tr = ot / ksteps, tc = ot % ksteps;
      float* o_tile = o_s + tr * kMma * lay.ld_o + tc * kMma;
      wmma::fragment<wmma::accumulator, kMma, kMma, kMma, float> acc;
      wmma::load_matrix_sync(acc, o_tile, lay.ld_o, wmma::mem_row_major);
#pragma unroll
      for (int ks = 0; ks < kKeyTiles; ++ks) {
        wmma::fragment<wmma::matrix_a, kMma, kMma, kMma, __nv_bfloat16, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, kMma, kMma, kMma, __nv_bfloat16, wmma::row_major> b;
        wmma::load_matrix_sync(a, p_s + tr * kMma * lay.ld_p + ks * kMma, lay.ld_p);
        wmma::load_matrix_sync(b, v_s + ks * kMma * lay.ld_bf16 + tc * kMma, lay.ld_bf16);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(o_tile, acc, lay.ld_o, wmma::mem_row_major);
    }
    // The next tile's flags: phase 3, the last reader of these, is behind the barrier above.
    if (tile + kKeys <= last_key) flag_keys(tile + kKeys);
    __syncthreads();  // K, V and P are overwritten by the next tile, which reads the new flags
  }

  // O / sum of this warp's rows that hold a query (0 / 0 where the query saw no key, as
  // PagedAttention gives).
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = warp * kRowsPerWarp + i;
    const int64_t t = first_tok + r / hc;
    if (t >= end_tok) continue;
    const int64_t h = h0 + r % hc;
    const float* o_row = o_s + r * lay.ld_o;
    float* out = p.out + (t * p.num_heads + h) * d;
    for (int64_t c = lane; c < d; c += 32) out[c] = o_row[c] / l_row[i];
  }
}

template <int kRows, int kKeys>
size_t SharedBytes(int64_t d) {
  return static_cast<size_t>(Smem<kRows, kKeys>(d).bytes);
}

// Tile shapes by head_dim: see the file comment.
constexpr int64_t kWideHeadDim = 256;
size_t SharedBytesFor(int64_t d) {
  return d <= kWideHeadDim ? SharedBytes<64, 64>(d) : SharedBytes<32, 32>(d);
}

template <int kRows, int kKeys, typename CacheT>
cudaError_t Launch(const PagedAttentionParams& p, cudaStream_t stream) {
  const size_t bytes = SharedBytes<kRows, kKeys>(p.head_dim);
  if (bytes > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(PrefillAttentionKernel<kRows, kKeys, CacheT>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(bytes));
    if (err != cudaSuccess) return err;
  }
  const int64_t hc = HeadChunk(p);
  const int64_t tokens_per_block = kRows / hc;
  // Every sequence's tiles: sum over s of CeilDiv(n_s, k) <= CeilDiv(sum n_s, k) + num_seqs - 1.
  const int64_t blocks = CeilDiv(p.num_tokens, tokens_per_block) + p.num_seqs - 1;
  dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(p.num_heads / hc));
  PrefillAttentionKernel<kRows, kKeys, CacheT>
      <<<grid, kThreads, bytes, stream>>>(p, static_cast<int>(hc));
  return cudaGetLastError();
}

template <int kRows, int kKeys>
cudaError_t LaunchForCache(const PagedAttentionParams& p, cudaStream_t stream) {
  return p.cache_type == ElemType::kF32 ? Launch<kRows, kKeys, float>(p, stream)
                                        : Launch<kRows, kKeys, __nv_bfloat16>(p, stream);
}

bool Aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

bool PrefillAttentionSupports(const PagedAttentionParams& p) {
  return p.head_dim >= kMma && p.head_dim <= 512 && p.head_dim % kMma == 0 &&
         p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0 && p.num_seqs > 0 &&
         p.page_size > 0 && p.v_cache != nullptr && Aligned16(p.v_cache) &&
         (p.k_cache != nullptr ? Aligned16(p.k_cache) : p.k_norm_weight != nullptr) &&
         SharedBytesFor(p.head_dim) <= kMaxSharedBytes;
}

cudaError_t PrefillAttention(const PagedAttentionParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.num_heads == 0) return cudaSuccess;
  if (!PrefillAttentionSupports(p)) return cudaErrorInvalidValue;
  return p.head_dim <= kWideHeadDim ? LaunchForCache<64, 64>(p, stream)
                                    : LaunchForCache<32, 32>(p, stream);
}

}  // namespace gemma::kernels
