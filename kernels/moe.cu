// MoE kernels. The router is one block per token: the normed row sits in shared memory, warps
// compute expert logits, and thread 0 does the softmax and the top-k (at most 1024 experts,
// a few thousand operations). The fused expert path gives one warp per output row of the
// selected expert's weights; the grouped path only permutes rows, its products are cuBLAS's.
#include <cuda_bf16.h>

#include <algorithm>

#include "kernels/device_utils.cuh"
#include "kernels/moe.h"

namespace gemma::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxTopK = 32;
constexpr int kMaxExperts = 1024;

// Dot product of f32 x with row `row` of a weight of width k, summed over the warp (all lanes
// get the sum).
template <typename T>
__device__ __forceinline__ float WarpDot(const float* x, const T* w, int64_t k) {
  float acc = 0.0f;
  for (int64_t c = threadIdx.x & 31; c < k; c += 32) {
    if constexpr (sizeof(T) == 4) {
      acc += x[c] * w[c];
    } else {
      acc += x[c] * __bfloat162float(w[c]);
    }
  }
  return WarpSum(acc);
}

__device__ __forceinline__ float WarpDotTyped(const float* x, const void* w, ElemType type,
                                              int64_t offset, int64_t k) {
  return type == ElemType::kF32
             ? WarpDot(x, static_cast<const float*>(w) + offset, k)
             : WarpDot(x, static_cast<const __nv_bfloat16*>(w) + offset, k);
}

__global__ void __launch_bounds__(kThreads) MoeRouteKernel(MoeRouteParams p) {
  extern __shared__ float smem[];
  __shared__ float scratch[32];
  float* z = smem;                  // [hidden]
  float* logits = z + p.hidden;     // [num_experts]
  const int64_t t = blockIdx.x;
  const float* xr = p.x + t * p.hidden;
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < p.hidden; i += blockDim.x) sum += xr[i] * xr[i];
  sum = BlockSum(sum, scratch);
  const float inv = rsqrtf(sum / static_cast<float>(p.hidden) + p.eps);
  const float root = 1.0f / sqrtf(static_cast<float>(p.hidden));
  for (int64_t i = threadIdx.x; i < p.hidden; i += blockDim.x) {
    z[i] = (xr[i] * inv) * LoadElem(p.router_scale, p.router_scale_type, i) * root;
  }
  __syncthreads();
  const int lane = threadIdx.x & 31;
  for (int64_t e = threadIdx.x >> 5; e < p.num_experts; e += kWarps) {
    const float v = WarpDotTyped(z, p.router_proj, p.router_proj_type, e * p.hidden, p.hidden);
    if (lane == 0) logits[e] = v;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  float max_logit = -INFINITY;
  for (int64_t e = 0; e < p.num_experts; ++e) max_logit = fmaxf(max_logit, logits[e]);
  double denom = 0.0;
  for (int64_t e = 0; e < p.num_experts; ++e) {
    logits[e] = expf(logits[e] - max_logit);
    denom += logits[e];
  }
  for (int64_t e = 0; e < p.num_experts; ++e) {
    logits[e] = static_cast<float>(logits[e] / denom);
  }
  // Top-k by probability, the lower id first on ties; chosen entries are marked -1.
  int32_t chosen[kMaxTopK];
  float chosen_prob[kMaxTopK];
  for (int64_t k = 0; k < p.top_k; ++k) {
    int32_t best = -1;
    float best_prob = -1.0f;
    for (int64_t e = 0; e < p.num_experts; ++e) {
      if (logits[e] > best_prob) {
        best_prob = logits[e];
        best = static_cast<int32_t>(e);
      }
    }
    if (best < 0) best = 0;  // NaN logits: keep the indices in range
    chosen[k] = best;
    chosen_prob[k] = best_prob;
    logits[best] = -1.0f;
  }
  // Ascending expert id.
  for (int64_t a = 1; a < p.top_k; ++a) {
    for (int64_t b = a; b > 0 && chosen[b - 1] > chosen[b]; --b) {
      int32_t ti = chosen[b]; chosen[b] = chosen[b - 1]; chosen[b - 1] = ti;
      float tp = chosen_prob[b]; chosen_prob[b] = chosen_prob[b - 1]; chosen_prob[b - 1] = tp;
    }
  }
  double total = 0.0;
  for (int64_t k = 0; k < p.top_k; ++k) total += chosen_prob[k];
  for (int64_t k = 0; k < p.top_k; ++k) {
    const int32_t e = chosen[k];
    p.topk_ids[t * p.top_k + k] = e;
    p.topk_weights[t * p.top_k + k] = static_cast<float>(chosen_prob[k] / total) *
                                      LoadElem(p.per_expert_scale, p.per_expert_scale_type, e);
    if (p.expert_counts != nullptr) atomicAdd(&p.expert_counts[e], 1);
  }
}

__device__ __forceinline__ int64_t LocalExpert(const MoeSlots& s, int64_t slot) {
  const int64_t local = static_cast<int64_t>(s.ids[slot]) - s.first_expert;
  return local >= 0 && local < s.num_local_experts ? local : -1;
}

// grid (num_slots, ceil(inter / kWarps)): warp w computes act[slot, row] for one inter row.
__global__ void __launch_bounds__(kThreads) MoeFusedGateUpKernel(MoeGateUpParams p) {
  const int64_t slot = blockIdx.x;
  const int64_t local = LocalExpert(p.slots, slot);
  const int64_t i = blockIdx.y * int64_t{kWarps} + (threadIdx.x >> 5);
  if (local < 0 || i >= p.inter) return;
  const float* xr = p.x + (slot / p.slots.top_k) * p.hidden;
  const int64_t gate_row = local * 2 * p.inter + i;
  const float g = WarpDotTyped(xr, p.gate_up, p.weight_type, gate_row * p.hidden, p.hidden);
  const float u =
      WarpDotTyped(xr, p.gate_up, p.weight_type, (gate_row + p.inter) * p.hidden, p.hidden);
  if ((threadIdx.x & 31) == 0) p.act[slot * p.inter + i] = GeluTanh(g) * u;
}

// grid (num_slots, ceil(hidden / kWarps)): warp w computes slot_out[slot, row].
__global__ void __launch_bounds__(kThreads) MoeFusedDownKernel(MoeDownParams p) {
  const int64_t slot = blockIdx.x;
  const int64_t local = LocalExpert(p.slots, slot);
  const int64_t h = blockIdx.y * int64_t{kWarps} + (threadIdx.x >> 5);
  if (local < 0 || h >= p.hidden) return;
  const float y = WarpDotTyped(p.act + slot * p.inter, p.down, p.weight_type,
                               (local * p.hidden + h) * p.inter, p.inter);
  if ((threadIdx.x & 31) == 0) p.slot_out[slot * p.hidden + h] = y;
}

__global__ void MoeCombineKernel(MoeSlots s, const float* weights, const float* slot_out,
                                 int64_t hidden, float* out) {
  const int64_t t = blockIdx.x;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    float acc = 0.0f;
    for (int64_t k = 0; k < s.top_k; ++k) {
      const int64_t slot = t * s.top_k + k;
      if (LocalExpert(s, slot) < 0) continue;
      acc += weights[slot] * slot_out[slot * hidden + i];
    }
    out[t * hidden + i] = acc;
  }
}

__global__ void MoeCountLocalKernel(MoeSlots s, int32_t* counts) {
  const int64_t num_slots = s.num_tokens * s.top_k;
  for (int64_t slot = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; slot < num_slots;
       slot += int64_t{gridDim.x} * blockDim.x) {
    const int64_t local = LocalExpert(s, slot);
    if (local >= 0) atomicAdd(&counts[local], 1);
  }
}

__global__ void MoePermuteKernel(MoePermuteParams p) {
  __shared__ int32_t row_s;
  const int64_t slot = blockIdx.x;
  const int64_t local = LocalExpert(p.slots, slot);
  if (local < 0) return;
  if (threadIdx.x == 0) {
    row_s = p.offsets[local] + atomicAdd(&p.cursor[local], 1);
    p.perm[row_s] = static_cast<int32_t>(slot);
  }
  __syncthreads();
  const int64_t row = row_s;
  const float* xr = p.x + (slot / p.slots.top_k) * p.hidden;
  for (int64_t i = threadIdx.x; i < p.hidden; i += blockDim.x) {
    if (p.xp_type == ElemType::kF32) {
      static_cast<float*>(p.xp)[row * p.hidden + i] = xr[i];
    } else {
      static_cast<__nv_bfloat16*>(p.xp)[row * p.hidden + i] = __float2bfloat16_rn(xr[i]);
    }
  }
}

__global__ void MoeGeluMulKernel(const float* gate_up, int64_t rows, int64_t inter, void* out,
                                 ElemType out_type) {
  const int64_t total = rows * inter;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = idx / inter;
    const int64_t i = idx - r * inter;
    const float* g = gate_up + r * 2 * inter;
    const float v = GeluTanh(g[i]) * g[inter + i];
    if (out_type == ElemType::kF32) {
      static_cast<float*>(out)[idx] = v;
    } else {
      static_cast<__nv_bfloat16*>(out)[idx] = __float2bfloat16_rn(v);
    }
  }
}

__global__ void MoeUnpermuteKernel(const int32_t* perm, const float* y, int64_t hidden,
                                   float* slot_out) {
  const int64_t r = blockIdx.x;
  const int64_t slot = perm[r];
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    slot_out[slot * hidden + i] = y[r * hidden + i];
  }
}

unsigned FlatBlocks(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(CeilDiv(n, kThreads), 65536)));
}

}  // namespace

cudaError_t MoeRoute(const MoeRouteParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  if (p.num_experts > kMaxExperts || p.top_k > kMaxTopK || p.top_k > p.num_experts) {
    return cudaErrorInvalidValue;
  }
  const size_t bytes = sizeof(float) * static_cast<size_t>(p.hidden + p.num_experts);
  if (bytes > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(MoeRouteKernel,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(bytes));
    if (err != cudaSuccess) return err;
  }
  MoeRouteKernel<<<static_cast<unsigned>(p.num_tokens), kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t MoeFusedGateUp(const MoeGateUpParams& p, cudaStream_t stream) {
  const int64_t num_slots = p.slots.num_tokens * p.slots.top_k;
  if (num_slots == 0 || p.inter == 0) return cudaSuccess;
  dim3 grid(static_cast<unsigned>(num_slots), static_cast<unsigned>(CeilDiv(p.inter, kWarps)));
  MoeFusedGateUpKernel<<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t MoeFusedDown(const MoeDownParams& p, cudaStream_t stream) {
  const int64_t num_slots = p.slots.num_tokens * p.slots.top_k;
  if (num_slots == 0 || p.hidden == 0) return cudaSuccess;
  dim3 grid(static_cast<unsigned>(num_slots), static_cast<unsigned>(CeilDiv(p.hidden, kWarps)));
  MoeFusedDownKernel<<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t MoeCombine(const MoeSlots& slots, const float* weights, const float* slot_out,
                       int64_t hidden, float* out, cudaStream_t stream) {
  if (slots.num_tokens == 0) return cudaSuccess;
  MoeCombineKernel<<<static_cast<unsigned>(slots.num_tokens), kThreads, 0, stream>>>(
      slots, weights, slot_out, hidden, out);
  return cudaGetLastError();
}

cudaError_t MoeCountLocal(const MoeSlots& slots, int32_t* counts, cudaStream_t stream) {
  const int64_t num_slots = slots.num_tokens * slots.top_k;
  if (num_slots == 0) return cudaSuccess;
  MoeCountLocalKernel<<<FlatBlocks(num_slots), kThreads, 0, stream>>>(slots, counts);
  return cudaGetLastError();
}

cudaError_t MoePermute(const MoePermuteParams& p, cudaStream_t stream) {
  const int64_t num_slots = p.slots.num_tokens * p.slots.top_k;
  if (num_slots == 0) return cudaSuccess;
  MoePermuteKernel<<<static_cast<unsigned>(num_slots), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t MoeGeluMul(const float* gate_up, int64_t rows, int64_t inter, void* out,
                       ElemType out_type, cudaStream_t stream) {
  if (rows * inter == 0) return cudaSuccess;
  MoeGeluMulKernel<<<FlatBlocks(rows * inter), kThreads, 0, stream>>>(gate_up, rows, inter, out,
                                                                      out_type);
  return cudaGetLastError();
}

cudaError_t MoeUnpermute(const int32_t* perm, const float* y, int64_t rows, int64_t hidden,
                         float* slot_out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  MoeUnpermuteKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(perm, y, hidden,
                                                                           slot_out);
  return cudaGetLastError();
}

}  // namespace gemma::kernels
