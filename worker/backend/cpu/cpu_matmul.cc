// Matrix products of the CPU backend. OpenBLAS runs single-threaded inside our OpenMP threads
// (two thread pools spinning against each other on few cores cost more than they give): F32
// weights are split by output rows across threads, each slice one OpenBLAS call; BF16 weights
// use a threaded dot-product kernel when there are few rows (decode), otherwise blocks of the
// weight widened to F32 and handed to OpenBLAS.
#include <cblas.h>

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

// Minimum multiply-adds per thread worth a parallel split.
constexpr int64_t kMinWorkPerThread = int64_t{1} << 15;

// y[m, n] (row stride ldy) = x[m, k] . w[n, k]^T, output rows split across OpenMP threads.
void F32Product(ThreadPool* pool, const float* x, const float* w, int64_t m, int64_t n, int64_t k,
                float* y, int64_t ldy) {
  auto slice = [&](int64_t begin, int64_t end) {
    if (m == 1) {
      cblas_sgemv(CblasRowMajor, CblasNoTrans, end - begin, k, 1.0f, w + begin * k, k, x, 1, 0.0f,
                  y + begin, 1);
    } else {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, end - begin, k, 1.0f, x, k,
                  w + begin * k, k, 0.0f, y + begin, ldy);
    }
  };
  if (pool == nullptr) {
    slice(0, n);
  } else {
    pool->ParallelFor(n, std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, m * k)),
                      slice);
  }
}

void MatMulBf16Dot(ThreadPool* pool, const float* x, const uint16_t* w, int64_t m, int64_t n,
                   int64_t k, float* y) {
  auto slice = [&](int64_t begin, int64_t end) {
    std::vector<float> row(k);
    for (int64_t j = begin; j < end; ++j) {
      const uint16_t* wr = w + j * k;
      for (int64_t i = 0; i < k; ++i) row[i] = Bf16ToF32(wr[i]);
      for (int64_t r = 0; r < m; ++r) {
        const float* xr = x + r * k;
        float acc = 0.0f;
        for (int64_t i = 0; i < k; ++i) acc += xr[i] * row[i];
        y[r * n + j] = acc;
      }
    }
  };
  if (pool == nullptr) {
    slice(0, n);
  } else {
    pool->ParallelFor(n, std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, m * k)),
                      slice);
  }
}

void MatMulBf16Blocked(ThreadPool* pool, const float* x, const uint16_t* w, int64_t m, int64_t n,
                       int64_t k, float* y) {
  int64_t block_rows = std::max<int64_t>(1, std::min<int64_t>(n, kBf16BlockElems / k));
  std::vector<float> block(block_rows * k);
  for (int64_t j0 = 0; j0 < n; j0 += block_rows) {
    int64_t rows = std::min(block_rows, n - j0);
    const uint16_t* src = w + j0 * k;
    for (int64_t i = 0; i < rows * k; ++i) block[i] = Bf16ToF32(src[i]);
    F32Product(pool, x, block.data(), m, rows, k, y + j0, n);
  }
}

}  // namespace

void MatMulF32(ThreadPool* pool, const float* x, const Buffer& w, int64_t w_row_offset, int64_t m,
               int64_t n, int64_t k, float* y) {
  if (m == 0 || n == 0) return;
  const CpuBuffer& cw = AsCpu(w);
  if (w.dtype() == DType::kF32) {
    F32Product(pool, x, cw.f32() + w_row_offset * k, m, n, k, y, n);
    return;
  }
  CHECK(w.dtype() == DType::kBF16) << "matmul weights must be F32 or BF16";
  const uint16_t* wb = cw.bf16() + w_row_offset * k;
  if (m <= kBf16DotMaxRows) {
    MatMulBf16Dot(pool, x, wb, m, n, k, y);
  } else {
    MatMulBf16Blocked(pool, x, wb, m, n, k, y);
  }
}

}  // namespace gemma::cpu
