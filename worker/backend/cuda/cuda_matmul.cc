// Dense matrix products of the CUDA backend: y[m, n] = x[m, k] . w[n, k]^T. Up to
// kernels::kGemvMaxRows rows (decode) a memory-bound kernel reads f32 or bf16 weights directly
// and accumulates in f32. Larger m goes to cuBLASLt: F32 weights as a pure f32 product (no
// TF32), BF16 weights with x rounded to bf16 and f32 accumulation and output (tensor cores),
// unless CudaBackendOptions::f32_products keeps every row on the f32-activation kernel.
// Plans (descriptors and the heuristic's algorithm) are cached per shape.
#include <cublasLt.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "glog/logging.h"
#include "kernels/elementwise.h"
#include "kernels/gemv.h"
#include "worker/backend/cuda/cuda_backend.h"
#include "worker/backend/cuda/cuda_check.h"

namespace gemma {

struct CudaBackend::LtPlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool valid = false;
  ~LtPlan() {
    if (c != nullptr) cublasLtMatrixLayoutDestroy(c);
    if (b != nullptr) cublasLtMatrixLayoutDestroy(b);
    if (a != nullptr) cublasLtMatrixLayoutDestroy(a);
    if (op != nullptr) cublasLtMatmulDescDestroy(op);
  }
};

namespace {
cudaError_t BlasError(cublasStatus_t status) {
  return status == CUBLAS_STATUS_SUCCESS ? cudaSuccess : cudaErrorUnknown;
}

// The largest power of two, at most 256, that divides the address.
uint32_t Alignment(const void* p) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(p);
  if (address == 0) return 256;
  return static_cast<uint32_t>(std::min<uintptr_t>(256, address & (~address + 1)));
}

constexpr size_t kMaxLtPlans = 4096;

// log2 of a power of two up to 256 (4 bits).
int Log2(uint32_t v) {
  int l = 0;
  while (v > 1) {
    v >>= 1;
    ++l;
  }
  return l;
}
}  // namespace

// Column-major view: y^T [n, m] = w [k, n]^T . x^T [k, m], with w and x as stored row-major.
// The alignments of the three pointers in bytes (a weight row offset, or a view as x or y, can
// leave them below the 256 bytes cuBLASLt's heuristic otherwise assumes) are part of the key.
CudaBackend::LtPlan* CudaBackend::GetLtPlan(int64_t m, int64_t n, int64_t k,
                                            kernels::ElemType w_type, uint32_t w_align,
                                            uint32_t x_align, uint32_t y_align) {
  auto key = std::make_tuple(m, n, k,
                             static_cast<int>(w_type) | Log2(w_align) << 1 |
                                 Log2(x_align) << 5 | Log2(y_align) << 9);
  auto it = lt_plans_.find(key);
  if (it != lt_plans_.end()) return it->second.get();
  // Expert products add a shape per row count: keep the cache bounded (a plan costs one
  // heuristic query to make again).
  if (lt_plans_.size() >= kMaxLtPlans) lt_plans_.clear();
  auto plan = std::make_shared<LtPlan>();
  const cudaDataType_t in_type = w_type == kernels::ElemType::kF32 ? CUDA_R_32F : CUDA_R_16BF;
  cublasStatus_t s = cublasLtMatmulDescCreate(&plan->op, CUBLAS_COMPUTE_32F, CUDA_R_32F);
  const cublasOperation_t trans_a = CUBLAS_OP_T;
  if (s == CUBLAS_STATUS_SUCCESS) {
    s = cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a,
                                       sizeof(trans_a));
  }
  if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatrixLayoutCreate(&plan->a, in_type, k, n, k);
  if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatrixLayoutCreate(&plan->b, in_type, k, m, k);
  if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatrixLayoutCreate(&plan->c, CUDA_R_32F, n, m, n);
  cublasLtMatmulPreference_t pref = nullptr;
  if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatmulPreferenceCreate(&pref);
  const size_t workspace = options_.blas_workspace_bytes;
  if (s == CUBLAS_STATUS_SUCCESS) {
    s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                             &workspace, sizeof(workspace));
  }
  if (s == CUBLAS_STATUS_SUCCESS) {
    s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                             &w_align, sizeof(w_align));
  }
  if (s == CUBLAS_STATUS_SUCCESS) {
    s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                             &x_align, sizeof(x_align));
  }
  if (s == CUBLAS_STATUS_SUCCESS) {
    s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                             &y_align, sizeof(y_align));
  }
  if (s == CUBLAS_STATUS_SUCCESS) {
    s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                             &y_align, sizeof(y_align));
  }
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  if (s == CUBLAS_STATUS_SUCCESS) {
    s = cublasLtMatmulAlgoGetHeuristic(static_cast<cublasLtHandle_t>(lt_handle_), plan->op,
                                       plan->a, plan->b, plan->c, plan->c, pref, 1, &result,
                                       &found);
  }
  if (pref != nullptr) cublasLtMatmulPreferenceDestroy(pref);
  if (s != CUBLAS_STATUS_SUCCESS || found == 0) {
    CheckStatus(absl::InternalError(absl::StrCat(
        "cuBLASLt has no algorithm for m=", m, " n=", n, " k=", k, " (status ", s, ")")));
    return nullptr;
  }
  plan->algo = result.algo;
  plan->valid = true;
  LtPlan* raw = plan.get();
  lt_plans_[key] = std::move(plan);
  return raw;
}

void CudaBackend::LtMatMul(const float* x, const void* w, kernels::ElemType w_type, int64_t m,
                           int64_t n, int64_t k, float* y) {
  const void* b = x;
  std::shared_ptr<Buffer> x_bf16;
  if (w_type == kernels::ElemType::kBF16) {
    x_bf16 = Scratch(DType::kBF16, m * k);
    if (x_bf16 == nullptr) return;
    b = AsCuda(*x_bf16).data();
  }
  if (x_bf16 != nullptr) {
    GEMMA_CUDA_CHECK(kernels::F32ToBf16(x, m * k, AsCuda(*x_bf16).data(), stream_));
  }
  LtMatMulTyped(b, w, w_type, m, n, k, y);
}

void CudaBackend::LtMatMulTyped(const void* b, const void* w, kernels::ElemType w_type, int64_t m,
                                int64_t n, int64_t k, float* y) {
  LtPlan* plan = GetLtPlan(m, n, k, w_type, Alignment(w), Alignment(b), Alignment(y));
  if (plan == nullptr) return;
  const float alpha = 1.0f, beta = 0.0f;
  GEMMA_CUDA_CHECK(BlasError(cublasLtMatmul(
      static_cast<cublasLtHandle_t>(lt_handle_), plan->op, &alpha, w, plan->a, b, plan->b, &beta,
      y, plan->c, y, plan->c, &plan->algo, AsCuda(*blas_workspace_).data(),
      options_.blas_workspace_bytes, stream_)));
}

void CudaBackend::MatMul(const Buffer& x, const Buffer& w, int64_t m, int64_t n, int64_t k,
                         Buffer& y, int64_t w_row_offset) {
  CHECK_LE((w_row_offset + n) * k, w.numel()) << "weight too small for the product";
  CHECK_LE(m * k, x.numel());
  CHECK_LE(m * n, y.numel());
  if (m == 0 || n == 0) return;
  const kernels::ElemType w_type = WeightType(w);
  const void* wp = static_cast<const char*>(AsCuda(w).data()) +
                   w_row_offset * k * static_cast<int64_t>(DTypeSize(w.dtype()));
  if (m <= kernels::kGemvMaxRows ||
      (options_.f32_products && w_type == kernels::ElemType::kBF16)) {
    for (int64_t r = 0; r < m; r += kernels::kGemvMaxRows) {
      const int64_t rows = std::min(kernels::kGemvMaxRows, m - r);
      GEMMA_CUDA_CHECK(kernels::Gemv(F32Ptr(x) + r * k, wp, w_type, rows, n, k,
                                     F32Ptr(y) + r * n, n, stream_));
    }
    return;
  }
  LtMatMul(F32Ptr(x), wp, w_type, m, n, k, F32Ptr(y));
}

}  // namespace gemma
