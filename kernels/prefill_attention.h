// Paged attention for prefill on tensor cores: the semantics of PagedAttention (attention.h:
// the same parameters, paged f32 or bf16 cache, causal with an optional inclusive sliding
// window, grouped query heads, K derived from cached V on k_eq_v layers, f32 output), computed
// flash-attention style over tiles of several queries and keys with bf16 MMAs and f32
// accumulation. Q, K (after its derivation on k_eq_v layers), V and the softmax probabilities
// are rounded to bf16 for the products; scores, the running max and sum and the output stay
// f32. Meant for steps with many query tokens per sequence (prefill), where PagedAttention's
// loop per (token, head chunk) leaves the tensor cores idle.
#pragma once

#include <cuda_runtime.h>

#include "kernels/attention.h"

namespace gemma::kernels {

// Whether PrefillAttention takes p: head_dim a multiple of 16 up to 512, num_heads a multiple
// of num_kv_heads, at least one sequence, a page size, K or the k_norm weight to derive it,
// and caches 16-byte aligned (keys and values are read 8 elements at a time). p.scratch is
// not used.
bool PrefillAttentionSupports(const PagedAttentionParams& p);

// One block per (tile of up to kRows / hc query tokens of one sequence, hc query heads of one
// KV group), the rows of its products being (token, head) pairs, so the heads of a group share
// each K and V tile's read and, on k_eq_v layers, its derivation. Walks the union of its
// queries' visible keys in tiles with an online softmax; each row is masked to its own
// query's range, keys whose page is -1 or past the page-table row are skipped (as
// PagedAttention does). A query that sees no key gets 0/0 (NaN), as in PagedAttention. No host
// round trip and a launch shape fixed by the shapes, so it may be captured in a graph.
// Returns cudaErrorInvalidValue where PrefillAttentionSupports(p) is false.
cudaError_t PrefillAttention(const PagedAttentionParams& p, cudaStream_t stream);

}  // namespace gemma::kernels
