// Paged attention and the MoE ops of the CUDA backend.
//
// Attention runs PagedAttention (f32 scores and softmax, one block per token and head chunk)
// unless CudaBackendOptions::tensor_core_attention is set, f32_products is not, and the step
// brings many query tokens per sequence (prefill): then the tiled tensor-core kernel
// (PrefillAttention), where it supports the shapes.
//
// MoeExperts has three paths. Few tokens (decode), or while a CUDA graph is being captured: the
// fused kernels read the selected experts' weights directly (one warp per output row), no host
// round trip. Many tokens: rows are permuted by expert and the two products of every active
// expert run as one cuBLAS grouped GEMM, or, where cuBLAS refuses the grouped GEMM for bf16
// inputs with f32 outputs (CUDA 13.0 on an H200 does), as one cuBLASLt product per active
// expert; the per-expert counts come back to the host first (one synchronisation per MoE
// layer, as the design accepts for prefill). CudaBackendOptions::f32_products keeps every
// token count on the fused kernels, which take f32 activations. Both end in the same
// combine kernel, which sums each token's experts in ascending id order. With
// CudaBackendOptions::device_scheduled_experts and bf16 weights, many tokens take the third:
// the counts never leave the device (MoeScheduleRows), and MoeGroupedGemm's blocks find their
// expert's rows there, so no synchronisation per MoE layer.
#include <cublas_v2.h>

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "glog/logging.h"
#include "kernels/attention.h"
#include "kernels/prefill_attention.h"
#include "kernels/moe.h"
#include "worker/backend/cuda/cuda_backend.h"
#include "worker/backend/cuda/cuda_check.h"

namespace gemma {
namespace {
// Up to this many tokens MoeExperts takes the fused path.
constexpr int64_t kMoeFusedMaxTokens = 16;
// Without a grouped GEMM, one cuBLASLt product per expert beats the fused kernels only when
// the experts get this many rows on average (measured on an H200 at the 26B-A4B widths: 8 rows
// a 128-token prefill was 1.4x slower than fused, 64 rows 1.5x faster; docs/perf.md).
constexpr int64_t kPerExpertMinRows = 32;
// The tensor-core attention kernel serves a step of at least this many query tokens, averaging
// at least kTensorCoreAttentionMinTokensPerSeq per sequence. Its blocks take up to 64 (token,
// head) rows of one sequence each; decode steps (one token a sequence) would fill a block's
// rows with a single query and lose the key splits of PagedAttention, so they stay there.
constexpr int64_t kTensorCoreAttentionMinTokens = 64;
constexpr int64_t kTensorCoreAttentionMinTokensPerSeq = 8;
}  // namespace

void CudaBackend::Attention(const AttentionArgs& a) {
  const BatchLayout& layout = *a.layout;
  CHECK_EQ(a.num_heads % a.num_kv_heads, 0);
  CHECK(a.k_cache != nullptr || a.k_norm_weight != nullptr)
      << "k_eq_v attention needs the k_norm weight";
  kernels::PagedAttentionParams p;
  p.q = F32Ptr(*a.q);
  CHECK(a.k_cache == nullptr || a.k_cache->dtype() == a.v_cache->dtype())
      << "k and v caches must share a dtype";
  p.k_cache = a.k_cache != nullptr ? AsCuda(*a.k_cache).data() : nullptr;
  p.v_cache = AsCuda(*a.v_cache).data();
  p.cache_type = KvType(*a.v_cache);
  if (a.k_cache == nullptr) {
    p.k_norm_weight = AsCuda(*a.k_norm_weight).data();
    p.k_norm_type = WeightType(*a.k_norm_weight);
  }
  p.rope = {a.rope.head_dim, a.rope.rotary_pairs, a.rope.theta, a.rope.factor};
  p.positions = I32Ptr(*layout.positions);
  p.query_start = I32Ptr(*layout.query_start);
  p.page_tables = I32Ptr(*layout.page_tables[a.pool]);
  p.num_tokens = layout.num_tokens;
  p.num_seqs = layout.num_seqs;
  p.max_pages_per_seq = layout.max_pages_per_seq;
  p.num_heads = a.num_heads;
  p.num_kv_heads = a.num_kv_heads;
  p.head_dim = a.head_dim;
  p.page_size = a.page_size;
  p.window = a.window;
  p.scale = a.scale;
  p.out = F32Ptr(*a.out);
  if (options_.tensor_core_attention && !options_.f32_products &&
      layout.num_tokens >= kTensorCoreAttentionMinTokens &&
      layout.num_tokens >= kTensorCoreAttentionMinTokensPerSeq * layout.num_seqs &&
      kernels::PrefillAttentionSupports(p)) {
    ++attention_paths_.tensor_core;
    GEMMA_CUDA_CHECK(kernels::PrefillAttention(p, stream_));
    return;
  }
  ++attention_paths_.scalar;
  std::shared_ptr<Buffer> scratch;
  if (const int64_t floats = kernels::PagedAttentionScratchFloats(p); floats > 0) {
    scratch = Scratch(DType::kF32, floats);
    if (scratch == nullptr) return;
    p.scratch = F32Ptr(*scratch);
  }
  GEMMA_CUDA_CHECK(kernels::PagedAttention(p, stream_));
}

void CudaBackend::MoeRoute(const MoeRouteArgs& a) {
  CHECK_LE(a.top_k, a.num_experts);
  if (a.num_tokens == 0) return;
  kernels::MoeRouteParams p;
  p.x = F32Ptr(*a.x);
  p.router_scale = AsCuda(*a.router_scale).data();
  p.router_scale_type = WeightType(*a.router_scale);
  p.router_proj = AsCuda(*a.router_proj).data();
  p.router_proj_type = WeightType(*a.router_proj);
  p.per_expert_scale = AsCuda(*a.per_expert_scale).data();
  p.per_expert_scale_type = WeightType(*a.per_expert_scale);
  p.num_tokens = a.num_tokens;
  p.hidden = a.hidden;
  p.num_experts = a.num_experts;
  p.top_k = a.top_k;
  p.eps = a.eps;
  p.topk_ids = I32Ptr(*a.topk_ids);
  p.topk_weights = F32Ptr(*a.topk_weights);
  p.expert_counts = a.expert_counts != nullptr ? I32Ptr(*a.expert_counts) : nullptr;
  std::shared_ptr<Buffer> logits = Scratch(DType::kF32, a.num_tokens * a.num_experts);
  if (logits == nullptr) return;
  p.logits = F32Ptr(*logits);
  GEMMA_CUDA_CHECK(kernels::MoeRoute(p, stream_));
}

namespace {
kernels::MoeSlots SlotsOf(const MoeExpertsArgs& a) {
  kernels::MoeSlots s;
  s.ids = I32Ptr(*a.topk_ids);
  s.num_tokens = a.num_tokens;
  s.top_k = a.top_k;
  s.first_expert = a.first_expert;
  s.num_local_experts = a.num_local_experts;
  return s;
}

// MoePermute of a's input rows into xp (as xp_type) by the device offsets.
kernels::MoePermuteParams PermuteParams(const MoeExpertsArgs& a, const Buffer& offsets,
                                        const Buffer& cursor, const Buffer& perm,
                                        const Buffer& xp, kernels::ElemType xp_type) {
  kernels::MoePermuteParams pp;
  pp.slots = SlotsOf(a);
  pp.x = F32Ptr(*a.x);
  pp.hidden = a.hidden;
  pp.offsets = I32Ptr(offsets);
  pp.cursor = I32Ptr(cursor);
  pp.perm = I32Ptr(perm);
  pp.xp = AsCuda(xp).data();
  pp.xp_type = xp_type;
  return pp;
}
}  // namespace

void CudaBackend::MoeExperts(const MoeExpertsArgs& a) {
  if (a.num_tokens == 0) return;
  const kernels::ElemType w_type = WeightType(*a.gate_up);
  CHECK(WeightType(*a.down) == w_type) << "gate_up and down must share a dtype";
  CHECK_LE(a.num_local_experts * 2 * a.inter * a.hidden, a.gate_up->numel());
  CHECK_LE(a.num_local_experts * a.hidden * a.inter, a.down->numel());
  const bool per_expert_pays =
      a.num_tokens * a.top_k >= kPerExpertMinRows * a.num_local_experts;
  if (options_.device_scheduled_experts && !options_.f32_products &&
      w_type == kernels::ElemType::kBF16 && a.num_tokens > kMoeFusedMaxTokens) {
    MoeExpertsScheduled(a);
    return;
  }
  if (!capturing_ && !options_.f32_products && a.num_tokens > kMoeFusedMaxTokens &&
      (!grouped_gemm_unsupported_ || per_expert_pays)) {
    MoeExpertsGrouped(a, w_type);
    return;
  }
  MoeExpertsFused(a, w_type);
}

void CudaBackend::MoeExpertsFused(const MoeExpertsArgs& a, kernels::ElemType w_type) {
  ++moe_paths_.fused;
  const int64_t num_slots = a.num_tokens * a.top_k;
  std::shared_ptr<Buffer> act = Scratch(DType::kF32, num_slots * a.inter);
  std::shared_ptr<Buffer> slot_out = Scratch(DType::kF32, num_slots * a.hidden);
  if (act == nullptr || slot_out == nullptr) return;
  const kernels::MoeSlots slots = SlotsOf(a);
  kernels::MoeGateUpParams gu;
  gu.slots = slots;
  gu.x = F32Ptr(*a.x);
  gu.gate_up = AsCuda(*a.gate_up).data();
  gu.weight_type = w_type;
  gu.hidden = a.hidden;
  gu.inter = a.inter;
  gu.act = F32Ptr(*act);
  GEMMA_CUDA_CHECK(kernels::MoeFusedGateUp(gu, stream_));
  kernels::MoeDownParams dp;
  dp.slots = slots;
  dp.act = F32Ptr(*act);
  dp.down = AsCuda(*a.down).data();
  dp.weight_type = w_type;
  dp.hidden = a.hidden;
  dp.inter = a.inter;
  dp.slot_out = F32Ptr(*slot_out);
  GEMMA_CUDA_CHECK(kernels::MoeFusedDown(dp, stream_));
  GEMMA_CUDA_CHECK(kernels::MoeCombine(slots, F32Ptr(*a.topk_weights), F32Ptr(*slot_out),
                                       a.hidden, F32Ptr(*a.out), stream_));
}

void CudaBackend::MoeExpertsGrouped(const MoeExpertsArgs& a, kernels::ElemType w_type) {
  const int64_t num_local = a.num_local_experts;
  const int64_t num_slots = a.num_tokens * a.top_k;
  const kernels::MoeSlots slots = SlotsOf(a);
  const bool bf16 = w_type == kernels::ElemType::kBF16;
  const DType in_dtype = bf16 ? DType::kBF16 : DType::kF32;
  const cudaDataType_t in_type = bf16 ? CUDA_R_16BF : CUDA_R_32F;
  const size_t w_elem = bf16 ? 2 : 4;

  // Rows per local expert, on the host.
  std::shared_ptr<Buffer> counts = Scratch(DType::kI32, num_local);
  if (counts == nullptr) return;
  GEMMA_CUDA_CHECK(cudaMemsetAsync(AsCuda(*counts).data(), 0, counts->bytes(), stream_));
  GEMMA_CUDA_CHECK(kernels::MoeCountLocal(slots, I32Ptr(*counts), stream_));
  std::vector<int32_t> host_counts(num_local);
  if (!Read(*counts, host_counts.data(), host_counts.size() * sizeof(int32_t)).ok()) return;
  std::vector<int32_t> offsets(num_local + 1, 0);
  for (int64_t e = 0; e < num_local; ++e) offsets[e + 1] = offsets[e] + host_counts[e];
  const int64_t rows = offsets[num_local];
  if (rows == 0) {  // no local expert is used: the output is zero
    GEMMA_CUDA_CHECK(cudaMemsetAsync(AsCuda(*a.out).data(), 0,
                                     a.num_tokens * a.hidden * sizeof(float), stream_));
    return;
  }

  std::shared_ptr<Buffer> offsets_d = UploadScratch(DType::kI32, offsets.data(), num_local);
  std::shared_ptr<Buffer> cursor = Scratch(DType::kI32, num_local);
  std::shared_ptr<Buffer> perm = Scratch(DType::kI32, rows);
  std::shared_ptr<Buffer> xp = Scratch(in_dtype, rows * a.hidden);
  std::shared_ptr<Buffer> gate_up_out = Scratch(DType::kF32, rows * 2 * a.inter);
  std::shared_ptr<Buffer> act = Scratch(in_dtype, rows * a.inter);
  std::shared_ptr<Buffer> y = Scratch(DType::kF32, rows * a.hidden);
  std::shared_ptr<Buffer> slot_out = Scratch(DType::kF32, num_slots * a.hidden);
  if (!offsets_d || !cursor || !perm || !xp || !gate_up_out || !act || !y || !slot_out) return;
  GEMMA_CUDA_CHECK(cudaMemsetAsync(AsCuda(*cursor).data(), 0, cursor->bytes(), stream_));
  GEMMA_CUDA_CHECK(kernels::MoePermute(
      PermuteParams(a, *offsets_d, *cursor, *perm, *xp, w_type), stream_));

  // One group per active expert (group size 1). Column-major, as in MatMul:
  // out^T [n_out, cnt] = W_e [k_in, n_out]^T . in^T [k_in, cnt].
  std::vector<int> active;
  for (int64_t e = 0; e < num_local; ++e) {
    if (host_counts[e] > 0) active.push_back(static_cast<int>(e));
  }
  const int groups = static_cast<int>(active.size());
  // One cuBLASLt product per active expert, where cuBLAS has no grouped GEMM for these types.
  auto per_expert = [&](const void* weights, int64_t n_out, int64_t k_in, const void* in,
                        float* out) {
    for (const int e : active) {
      LtMatMulTyped(static_cast<const char*>(in) + offsets[e] * k_in * w_elem,
                    static_cast<const char*>(weights) + e * n_out * k_in * w_elem, w_type,
                    host_counts[e], n_out, k_in, out + offsets[e] * n_out);
    }
    return CUBLAS_STATUS_SUCCESS;
  };
  // The products of every active expert: the grouped GEMM, or one product each once cuBLAS has
  // refused it.
  auto products = [&](const void* weights, int64_t n_out, int64_t k_in, const void* in,
                      float* out) -> cublasStatus_t {
    if (grouped_gemm_unsupported_) return per_expert(weights, n_out, k_in, in, out);
    std::vector<cublasOperation_t> ta(groups, CUBLAS_OP_T), tb(groups, CUBLAS_OP_N);
    std::vector<int> m_arr(groups, static_cast<int>(n_out)), n_arr(groups), k_arr(groups, static_cast<int>(k_in));
    std::vector<int> lda(groups, static_cast<int>(k_in)), ldb(groups, static_cast<int>(k_in)),
        ldc(groups, static_cast<int>(n_out)), sizes(groups, 1);
    std::vector<float> alpha(groups, 1.0f), beta(groups, 0.0f);
    std::vector<const void*> ptrs(3 * groups);
    for (int g = 0; g < groups; ++g) {
      const int e = active[g];
      n_arr[g] = host_counts[e];
      ptrs[g] = static_cast<const char*>(weights) + e * n_out * k_in * w_elem;
      ptrs[groups + g] = static_cast<const char*>(in) + offsets[e] * k_in * w_elem;
      ptrs[2 * groups + g] = out + offsets[e] * n_out;
    }
    std::shared_ptr<Buffer> ptrs_d =
        UploadScratch(DType::kI64, ptrs.data(), static_cast<int64_t>(ptrs.size()));
    if (ptrs_d == nullptr) return CUBLAS_STATUS_ALLOC_FAILED;
    auto** dev = static_cast<void**>(AsCuda(*ptrs_d).data());
    return cublasGemmGroupedBatchedEx(
        static_cast<cublasHandle_t>(blas_handle_), ta.data(), tb.data(), m_arr.data(),
        n_arr.data(), k_arr.data(), alpha.data(), const_cast<const void* const*>(dev), in_type,
        lda.data(), const_cast<const void* const*>(dev + groups), in_type, ldb.data(),
        beta.data(), dev + 2 * groups, CUDA_R_32F, ldc.data(), groups, sizes.data(),
        CUBLAS_COMPUTE_32F);
  };
  cublasStatus_t s = products(AsCuda(*a.gate_up).data(), 2 * a.inter, a.hidden,
                             AsCuda(*xp).data(), F32Ptr(*gate_up_out));
  if (s == CUBLAS_STATUS_NOT_SUPPORTED || s == CUBLAS_STATUS_INVALID_VALUE) {
    LOG(INFO) << "cuBLAS has no grouped GEMM for these expert products (status " << s
              << "); running one cuBLASLt product per active expert";
    grouped_gemm_unsupported_ = true;
    s = products(AsCuda(*a.gate_up).data(), 2 * a.inter, a.hidden, AsCuda(*xp).data(),
                F32Ptr(*gate_up_out));
  }
  GEMMA_CUDA_CHECK(s == CUBLAS_STATUS_SUCCESS ? cudaSuccess : cudaErrorUnknown);
  ++(grouped_gemm_unsupported_ ? moe_paths_.per_expert : moe_paths_.grouped);
  GEMMA_CUDA_CHECK(kernels::MoeGeluMul(F32Ptr(*gate_up_out), rows, a.inter,
                                       AsCuda(*act).data(), w_type, stream_));
  s = products(AsCuda(*a.down).data(), a.hidden, a.inter, AsCuda(*act).data(), F32Ptr(*y));
  GEMMA_CUDA_CHECK(s == CUBLAS_STATUS_SUCCESS ? cudaSuccess : cudaErrorUnknown);
  GEMMA_CUDA_CHECK(
      kernels::MoeUnpermute(I32Ptr(*perm), F32Ptr(*y), rows, a.hidden, F32Ptr(*slot_out), stream_));
  GEMMA_CUDA_CHECK(kernels::MoeCombine(slots, F32Ptr(*a.topk_weights), F32Ptr(*slot_out),
                                       a.hidden, F32Ptr(*a.out), stream_));
}

void CudaBackend::MoeExpertsScheduled(const MoeExpertsArgs& a) {
  ++moe_paths_.scheduled;
  const int64_t num_local = a.num_local_experts;
  // Every local slot may fall to this rank: the row buffers take that many rows, and the
  // kernels stop at the count the device holds.
  const int64_t max_rows = a.num_tokens * a.top_k;
  const kernels::MoeSlots slots = SlotsOf(a);
  std::shared_ptr<Buffer> counts = Scratch(DType::kI32, num_local);
  std::shared_ptr<Buffer> offsets = Scratch(DType::kI32, num_local + 1);
  std::shared_ptr<Buffer> tile_start = Scratch(DType::kI32, num_local + 1);
  std::shared_ptr<Buffer> cursor = Scratch(DType::kI32, num_local);
  std::shared_ptr<Buffer> perm = Scratch(DType::kI32, max_rows);
  std::shared_ptr<Buffer> xp = Scratch(DType::kBF16, max_rows * a.hidden);
  std::shared_ptr<Buffer> gate_up_out = Scratch(DType::kF32, max_rows * 2 * a.inter);
  std::shared_ptr<Buffer> act = Scratch(DType::kBF16, max_rows * a.inter);
  std::shared_ptr<Buffer> y = Scratch(DType::kF32, max_rows * a.hidden);
  std::shared_ptr<Buffer> slot_out = Scratch(DType::kF32, max_rows * a.hidden);
  if (!counts || !offsets || !tile_start || !cursor || !perm || !xp || !gate_up_out || !act ||
      !y || !slot_out) {
    return;
  }
  GEMMA_CUDA_CHECK(cudaMemsetAsync(AsCuda(*counts).data(), 0, counts->bytes(), stream_));
  GEMMA_CUDA_CHECK(kernels::MoeCountLocal(slots, I32Ptr(*counts), stream_));
  GEMMA_CUDA_CHECK(kernels::MoeScheduleRows(I32Ptr(*counts), num_local, I32Ptr(*offsets),
                                            I32Ptr(*tile_start), I32Ptr(*cursor), stream_));
  const int32_t* local_rows = I32Ptr(*offsets) + num_local;  // on the device
  GEMMA_CUDA_CHECK(kernels::MoePermute(
      PermuteParams(a, *offsets, *cursor, *perm, *xp, kernels::ElemType::kBF16), stream_));
  kernels::MoeGroupedGemmParams gemm;
  gemm.offsets = I32Ptr(*offsets);
  gemm.tile_start = I32Ptr(*tile_start);
  gemm.num_local = num_local;
  gemm.max_rows = max_rows;
  gemm.in = AsCuda(*xp).data();
  gemm.weights = AsCuda(*a.gate_up).data();
  gemm.n_out = 2 * a.inter;
  gemm.k = a.hidden;
  gemm.out = F32Ptr(*gate_up_out);
  GEMMA_CUDA_CHECK(kernels::MoeGroupedGemm(gemm, stream_));
  GEMMA_CUDA_CHECK(kernels::MoeGeluMul(F32Ptr(*gate_up_out), max_rows, a.inter,
                                       AsCuda(*act).data(), kernels::ElemType::kBF16, stream_,
                                       local_rows));
  gemm.in = AsCuda(*act).data();
  gemm.weights = AsCuda(*a.down).data();
  gemm.n_out = a.hidden;
  gemm.k = a.inter;
  gemm.out = F32Ptr(*y);
  GEMMA_CUDA_CHECK(kernels::MoeGroupedGemm(gemm, stream_));
  GEMMA_CUDA_CHECK(kernels::MoeUnpermute(I32Ptr(*perm), F32Ptr(*y), max_rows, a.hidden,
                                         F32Ptr(*slot_out), stream_, local_rows));
  GEMMA_CUDA_CHECK(kernels::MoeCombine(slots, F32Ptr(*a.topk_weights), F32Ptr(*slot_out),
                                       a.hidden, F32Ptr(*a.out), stream_));
}

}  // namespace gemma
