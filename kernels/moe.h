// Mixture-of-experts kernels: the router (norm, projection, softmax over all experts, top-k,
// renormalise, per-expert scale, token counters), the fused expert path for few tokens (gate/up
// with GELU, then down, straight from the selected experts' weights), the token permutation by
// expert that feeds grouped GEMMs for many tokens, and the weighted combine.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/kernel_types.h"

namespace gemma::kernels {

struct MoeRouteParams {
  const float* x = nullptr;                 // [num_tokens, hidden]
  const void* router_scale = nullptr;       // [hidden]
  ElemType router_scale_type = ElemType::kF32;
  const void* router_proj = nullptr;        // [num_experts, hidden]
  ElemType router_proj_type = ElemType::kF32;
  const void* per_expert_scale = nullptr;   // [num_experts]
  ElemType per_expert_scale_type = ElemType::kF32;
  int64_t num_tokens = 0, hidden = 0, num_experts = 0, top_k = 0;
  float eps = 1e-6f;
  int32_t* topk_ids = nullptr;       // [num_tokens, top_k], ascending per token
  float* topk_weights = nullptr;     // [num_tokens, top_k]
  int32_t* expert_counts = nullptr;  // [num_experts] incremented, or null
  float* logits = nullptr;           // scratch [num_tokens, num_experts]
};
// Logits over blocks of experts, then one warp per token selects. num_experts at most 1024,
// top_k at most 32; logits scratch required.
cudaError_t MoeRoute(const MoeRouteParams& p, cudaStream_t stream);

// The token-slot view shared by the expert kernels: slot s = t * top_k + k holds expert
// ids[s]; only experts in [first_expert, first_expert + num_local_experts) are computed here.
struct MoeSlots {
  const int32_t* ids = nullptr;  // [num_tokens, top_k]
  int64_t num_tokens = 0, top_k = 0;
  int64_t first_expert = 0, num_local_experts = 0;
};

// Fused path, for few tokens. act[s] = gelu(gate_e x[t]) * (up_e x[t]) for local slots, with
// gate_up [num_local, 2 * inter, hidden] (gate rows first); act [num_slots, inter].
struct MoeGateUpParams {
  MoeSlots slots;
  const float* x = nullptr;  // [num_tokens, hidden]
  const void* gate_up = nullptr;
  ElemType weight_type = ElemType::kF32;
  int64_t hidden = 0, inter = 0;
  float* act = nullptr;
};
cudaError_t MoeFusedGateUp(const MoeGateUpParams& p, cudaStream_t stream);

// slot_out[s] = down_e act[s] for local slots; down [num_local, hidden, inter];
// slot_out [num_slots, hidden].
struct MoeDownParams {
  MoeSlots slots;
  const float* act = nullptr;
  const void* down = nullptr;
  ElemType weight_type = ElemType::kF32;
  int64_t hidden = 0, inter = 0;
  float* slot_out = nullptr;
};
cudaError_t MoeFusedDown(const MoeDownParams& p, cudaStream_t stream);

// out[t] = sum over k of weights[t, k] * slot_out[t * top_k + k] for local slots, in k order
// (= ascending expert id); zeros for a token with no local expert. out [num_tokens, hidden].
cudaError_t MoeCombine(const MoeSlots& slots, const float* weights, const float* slot_out,
                       int64_t hidden, float* out, cudaStream_t stream);

// Grouped path, for many tokens. counts[e] += number of local slots of local expert e.
cudaError_t MoeCountLocal(const MoeSlots& slots, int32_t* counts, cudaStream_t stream);

// Permutation by expert: with offsets [num_local] the exclusive prefix sum of the counts and
// cursor [num_local] zeroed, each local slot s gets a row r in its expert's range,
// perm[r] = s, and x[t] is copied to xp[r] as f32 or bf16 (xp_type).
struct MoePermuteParams {
  MoeSlots slots;
  const float* x = nullptr;  // [num_tokens, hidden]
  int64_t hidden = 0;
  const int32_t* offsets = nullptr;
  int32_t* cursor = nullptr;
  int32_t* perm = nullptr;  // [local slots]
  void* xp = nullptr;       // [local slots, hidden]
  ElemType xp_type = ElemType::kF32;
};
cudaError_t MoePermute(const MoePermuteParams& p, cudaStream_t stream);

// out[r, i] = gelu_tanh(gate_up[r, i]) * gate_up[r, inter + i] stored as f32 or bf16, for
// r < rows, or r < *device_rows (at most rows) where device_rows is given.
cudaError_t MoeGeluMul(const float* gate_up, int64_t rows, int64_t inter, void* out,
                       ElemType out_type, cudaStream_t stream,
                       const int32_t* device_rows = nullptr);

// slot_out[perm[r]] = y[r] for r < rows, or r < *device_rows (at most rows) where given;
// y [rows, hidden].
cudaError_t MoeUnpermute(const int32_t* perm, const float* y, int64_t rows, int64_t hidden,
                         float* slot_out, cudaStream_t stream,
                         const int32_t* device_rows = nullptr);

// ---- Grouped path scheduled on the device (no host round trip; capturable) ----
// The counts stay on the device: MoeScheduleRows turns them into the permutation's offsets and
// the row tiles of MoeGroupedGemm, whose blocks find their expert from those.

// Rows of one expert a MoeGroupedGemm block computes.
constexpr int64_t kMoeGemmRows = 64;
// Row tiles MoeGroupedGemm must be launched over for at most `rows` rows spread over
// `num_local` experts (each expert's last tile may be partial).
inline int64_t MoeGemmMaxTiles(int64_t rows, int64_t num_local) {
  return (rows + kMoeGemmRows - 1) / kMoeGemmRows + num_local;
}

// From counts [num_local]: offsets [num_local + 1], the exclusive prefix sum (offsets[num_local]
// is the number of local rows); tile_start [num_local + 1], the prefix sum of
// ceil(counts[e] / kMoeGemmRows); cursor [num_local] zeroed for MoePermute. One thread's work.
cudaError_t MoeScheduleRows(const int32_t* counts, int64_t num_local, int32_t* offsets,
                            int32_t* tile_start, int32_t* cursor, cudaStream_t stream);

// out[r, :] = W_e in[r, :] for every row r in [offsets[e], offsets[e + 1]) of every local expert
// e: in [max_rows, k] bf16 (rows grouped by expert, as MoePermute leaves them), weights
// [num_local, n_out, k] bf16 (row n of expert e's matrix at (e * n_out + n) * k), out
// [max_rows, n_out] f32; rows past offsets[num_local] are not written. bf16 tensor-core
// products (nvcuda::wmma) with f32 accumulation, one block per (row tile, 64 columns); blocks
// past tile_start[num_local] return at once.
struct MoeGroupedGemmParams {
  const void* in = nullptr;
  const void* weights = nullptr;
  const int32_t* offsets = nullptr;     // [num_local + 1]
  const int32_t* tile_start = nullptr;  // [num_local + 1]
  int64_t num_local = 0, max_rows = 0, n_out = 0, k = 0;
  float* out = nullptr;
};
cudaError_t MoeGroupedGemm(const MoeGroupedGemmParams& p, cudaStream_t stream);

}  // namespace gemma::kernels
