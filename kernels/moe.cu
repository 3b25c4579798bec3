// MoE kernels. The router runs in two kernels: the logits over blocks of experts (each block
// normalises its token's row into shared memory, each warp one expert), then one warp per token
// for the softmax and the top-k (at most 1024 experts). The fused expert path gives one warp per output row of the
// selected expert's weights; the grouped path only permutes rows, its products are cuBLAS's or
// MoeGroupedGemm's (moe_gemm.cu).
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

// Dot product of f32 x with a weight row of width k, summed over the warp (all lanes get the
// sum). When x and the row are 16-byte aligned and k a multiple of the vector, each lane reads
// 16-byte weight vectors, kUnroll of them in flight before the first is used (a scalar loop
// keeps one 2-byte load in flight per lane and leaves most of the bandwidth unused).
template <typename T>
__device__ __forceinline__ float WarpDot(const float* x, const T* w, int64_t k) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kUnroll = 4;
  const int lane = threadIdx.x & 31;
  float acc = 0.0f;
  const bool vec = k % kVec == 0 && (reinterpret_cast<uintptr_t>(w) % 16) == 0 &&
                   (reinterpret_cast<uintptr_t>(x) % 16) == 0;
  if (vec) {
    for (int64_t base = int64_t{lane} * kVec; base < k; base += 32 * kVec * kUnroll) {
      alignas(16) T wv[kUnroll][kVec];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t c = base + int64_t{u} * 32 * kVec;
        if (c < k) *reinterpret_cast<uint4*>(wv[u]) = *reinterpret_cast<const uint4*>(w + c);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t c = base + int64_t{u} * 32 * kVec;
        if (c < k) {
#pragma unroll
          for (int v = 0; v < kVec; v += 4) {
            const float4 q = *reinterpret_cast<const float4*>(x + c + v);
            if constexpr (sizeof(T) == 4) {
              acc += q.x * wv[u][v] + q.y * wv[u][v + 1] + q.z * wv[u][v + 2] +
                     q.w * wv[u][v + 3];
            } else {
              acc += q.x * __bfloat162float(wv[u][v]) + q.y * __bfloat162float(wv[u][v + 1]) +
                     q.z * __bfloat162float(wv[u][v + 2]) + q.w * __bfloat162float(wv[u][v + 3]);
            }
          }
        }
      }
    }
    return WarpSum(acc);
  }
  for (int64_t c = lane; c < k; c += 32) {
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

// Router logits: grid (num_tokens, ceil(num_experts / kWarps)). Each block normalises its
// token's row into shared memory (every block of the token the same way) and each warp writes
// one expert's logit, so the projection is spread over the device rather than one block.
__global__ void __launch_bounds__(kThreads) MoeRouteLogitsKernel(MoeRouteParams p) {
  extern __shared__ float z[];  // [hidden]
  __shared__ float scratch[32];
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
  const int64_t e = blockIdx.y * int64_t{kWarps} + (threadIdx.x >> 5);
  if (e >= p.num_experts) return;
  const float v = WarpDotTyped(z, p.router_proj, p.router_proj_type, e * p.hidden, p.hidden);
  if ((threadIdx.x & 31) == 0) p.logits[t * p.num_experts + e] = v;
}

// Softmax over all experts, top-k, renormalisation: one warp per token. Lane l holds experts
// l, l + 32, ...; the top-k is k rounds of a warp argmax (the larger probability, the lower id
// on ties); the chosen are then sorted by id.
__global__ void __launch_bounds__(32) MoeRouteSelectKernel(MoeRouteParams p) {
  __shared__ float prob[kMaxExperts];
  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x;
  const float* lr = p.logits + t * p.num_experts;
  float max_logit = -INFINITY;
  for (int64_t e = lane; e < p.num_experts; e += 32) max_logit = fmaxf(max_logit, lr[e]);
  max_logit = WarpMax(max_logit);
  double denom = 0.0;
  for (int64_t e = lane; e < p.num_experts; e += 32) {
    prob[e] = expf(lr[e] - max_logit);
    denom += prob[e];
  }
  denom = WarpSum(denom);
  for (int64_t e = lane; e < p.num_experts; e += 32) {
    prob[e] = static_cast<float>(prob[e] / denom);
  }
  __syncwarp();
  int32_t chosen[kMaxTopK];
  float chosen_prob[kMaxTopK];
  for (int64_t k = 0; k < p.top_k; ++k) {
    int32_t best = -1;
    float best_prob = -1.0f;
    for (int64_t e = lane; e < p.num_experts; e += 32) {
      if (prob[e] > best_prob) {  // NaN never wins
        best_prob = prob[e];
        best = static_cast<int32_t>(e);
      }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float other_prob = __shfl_xor_sync(kFullMask, best_prob, offset);
      const int32_t other = __shfl_xor_sync(kFullMask, best, offset);
      if (other >= 0 &&
          (best < 0 || other_prob > best_prob || (other_prob == best_prob && other < best))) {
        best_prob = other_prob;
        best = other;
      }
    }
    if (best < 0) {  // NaN logits: keep the indices in range
      best = 0;
      best_prob = -1.0f;
    }
    chosen[k] = best;
    chosen_prob[k] = best_prob;
    __syncwarp();
    if (lane == 0) prob[best] = -1.0f;
    __syncwarp();
  }
  if (lane != 0) return;
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
  for (int64_t i = blockIdx.y * int64_t{blockDim.x} + threadIdx.x; i < hidden;
       i += int64_t{gridDim.y} * blockDim.x) {
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
                                 ElemType out_type, const int32_t* device_rows) {
  if (device_rows != nullptr) rows = min(rows, static_cast<int64_t>(*device_rows));
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
                                   float* slot_out, const int32_t* device_rows) {
  const int64_t r = blockIdx.x;
  if (device_rows != nullptr && r >= *device_rows) return;
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
  if (p.logits == nullptr) return cudaErrorInvalidValue;
  const size_t bytes = sizeof(float) * static_cast<size_t>(p.hidden);
  if (bytes > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(MoeRouteLogitsKernel,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(bytes));
    if (err != cudaSuccess) return err;
  }
  dim3 grid(static_cast<unsigned>(p.num_tokens), static_cast<unsigned>(CeilDiv(p.num_experts, kWarps)));
  MoeRouteLogitsKernel<<<grid, kThreads, bytes, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  MoeRouteSelectKernel<<<static_cast<unsigned>(p.num_tokens), 32, 0, stream>>>(p);
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
  // Columns over several blocks: one block per token would leave a decode step's combine on
  // a single multiprocessor.
  dim3 grid(static_cast<unsigned>(slots.num_tokens),
            static_cast<unsigned>(std::min<int64_t>(CeilDiv(hidden, kThreads), 65535)));
  MoeCombineKernel<<<grid, kThreads, 0, stream>>>(slots, weights, slot_out, hidden, out);
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
                       ElemType out_type, cudaStream_t stream, const int32_t* device_rows) {
  if (rows * inter == 0) return cudaSuccess;
  MoeGeluMulKernel<<<FlatBlocks(rows * inter), kThreads, 0, stream>>>(gate_up, rows, inter, out,
                                                                      out_type, device_rows);
  return cudaGetLastError();
}

cudaError_t MoeUnpermute(const int32_t* perm, const float* y, int64_t rows, int64_t hidden,
                         float* slot_out, cudaStream_t stream, const int32_t* device_rows) {
  if (rows == 0) return cudaSuccess;
  MoeUnpermuteKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(perm, y, hidden,
                                                                           slot_out, device_rows);
  return cudaGetLastError();
}

}  // namespace gemma::kernels
