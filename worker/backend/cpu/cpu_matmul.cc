// Matrix products of the CPU backend: OpenBLAS for F32 weights; for BF16 weights a threaded
// dot-product kernel when there are few rows (decode), otherwise blocks of the weight widened to
// F32 and handed to OpenBLAS.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <vector>

#include "glog/logging.h"
#include "worker/backend/cpu/cpu_backend.h"

namespace gemma::cpu {
namespace {

// Rows of x below which BF16 products use the dot-product kernel.
constexpr int64_t kBf16DotMaxRows = 8;
// Elements of a widened weight block (16 MiB of floats).
constexpr int64_t kBf16BlockElems = int64_t{4} << 20;

void MatMulBf16Dot(const float* x, const uint16_t* w, int64_t m, int64_t n, int64_t k, float* y) {
#pragma omp parallel
  {
    std::vector<float> row(k);
#pragma omp for schedule(static)
    for (int64_t j = 0; j < n; ++j) {
      const uint16_t* wr = w + j * k;
      for (int64_t i = 0; i < k; ++i) row[i] = Bf16ToF32(wr[i]);
      for (int64_t r = 0; r < m; ++r) {
        const float* xr = x + r * k;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < k; ++i) acc += xr[i] * row[i];
        y[r * n + j] = acc;
      }
    }
  }
}

void MatMulBf16Blocked(const float* x, const uint16_t* w, int64_t m, int64_t n, int64_t k,
                       float* y) {
  int64_t block_rows = std::max<int64_t>(1, std::min<int64_t>(n, kBf16BlockElems / k));
  std::vector<float> block(block_rows * k);
  for (int64_t j0 = 0; j0 < n; j0 += block_rows) {
    int64_t rows = std::min(block_rows, n - j0);
    const uint16_t* src = w + j0 * k;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < rows * k; ++i) block[i] = Bf16ToF32(src[i]);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, rows, k, 1.0f, x, k, block.data(), k,
                0.0f, y + j0, n);
  }
}

}  // namespace

void MatMulF32(const float* x, const Buffer& w, int64_t w_row_offset, int64_t m, int64_t n,
               int64_t k, float* y) {
  if (m == 0 || n == 0) return;
  const CpuBuffer& cw = AsCpu(w);
  if (w.dtype() == DType::kF32) {
    const float* wf = cw.f32() + w_row_offset * k;
    if (m == 1) {
      cblas_sgemv(CblasRowMajor, CblasNoTrans, n, k, 1.0f, wf, k, x, 1, 0.0f, y, 1);
    } else {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, x, k, wf, k, 0.0f, y,
                  n);
    }
    return;
  }
  CHECK(w.dtype() == DType::kBF16) << "matmul weights must be F32 or BF16";
  const uint16_t* wb = cw.bf16() + w_row_offset * k;
  if (m <= kBf16DotMaxRows) {
    MatMulBf16Dot(x, wb, m, n, k, y);
  } else {
    MatMulBf16Blocked(x, wb, m, n, k, y);
  }
}

}  // namespace gemma::cpu
