// Paged attention over a KV cache laid out [num_pages, page_size, num_kv_heads, head_dim] in f32
// or bf16, for prefill and decode alike: causal, optionally with an inclusive sliding window,
// grouped query heads, and K derived from cached V (K = RoPE(V * k_norm_weight)) on k_eq_v
// layers. Queries, scores, the softmax and the output are f32 whatever the cache holds.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/kernel_types.h"

namespace gemma::kernels {

struct PagedAttentionParams {
  const float* q = nullptr;        // [num_tokens, num_heads, head_dim], normed and rotated
  // Elements of cache_type; bf16 values are widened to f32 as they are read (on k_eq_v layers
  // the derivation starts from the widened V).
  const void* k_cache = nullptr;  // null: K derived from V
  const void* v_cache = nullptr;
  ElemType cache_type = ElemType::kF32;
  const void* k_norm_weight = nullptr;  // [head_dim], used when k_cache is null
  ElemType k_norm_type = ElemType::kF32;
  Rope rope;                            // rotation of derived keys
  const int32_t* positions = nullptr;    // [num_tokens] absolute position of each query
  const int32_t* query_start = nullptr;  // [num_seqs + 1] first token of each sequence
  const int32_t* page_tables = nullptr;  // [num_seqs, max_pages_per_seq] physical page or -1
  int64_t num_tokens = 0;
  int64_t num_seqs = 0;
  int64_t max_pages_per_seq = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;  // even, at most 512
  int64_t page_size = 0;
  int64_t window = 0;  // query at p sees keys (p - window, p]; 0: all keys <= p
  float scale = 1.0f;
  float* out = nullptr;  // [num_tokens, num_heads, head_dim]
  // PagedAttentionScratchFloats(p) floats of device memory when that is not 0.
  float* scratch = nullptr;
};

// One block per (token, up to 8 query heads of one KV group, key split): the heads of a block
// share each key's read and, on k_eq_v layers, its derivation. Keys whose page is -1 or past
// the page-table row are skipped (the cache must hold every visible key). When the blocks alone
// would leave the device idle and the key range can be long (decode), each query's keys are
// split over several blocks whose partial softmax sums are merged by a second kernel
// (flash-decoding); the number of slices depends only on the shapes (tokens, heads, page-table
// width, window), so a captured graph replays it unchanged, and each slice takes an equal share
// of the keys its query sees. Returns cudaErrorInvalidValue for a head_dim it does not support,
// or for a split without scratch.
cudaError_t PagedAttention(const PagedAttentionParams& p, cudaStream_t stream);

// Blocks each query's key range is split over for p (1: no split).
int64_t PagedAttentionSplits(const PagedAttentionParams& p);
// Floats of scratch PagedAttention needs for p (0 without a split).
int64_t PagedAttentionScratchFloats(const PagedAttentionParams& p);

}  // namespace gemma::kernels
