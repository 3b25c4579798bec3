// Matrix products of the CPU backend, split by output rows over the thread pool, OpenBLAS
// single-threaded inside it (two thread pools fighting over few cores cost more than they
// give). One row of x: OpenBLAS sgemv. A few rows (batched decode): a dot-product kernel that
// reads each weight row once and applies it to every row of x while it sits in L1 (sgemm would
// repack the weight slice on every call, which dominated batched decode). More rows: sgemm.
// BF16 weights are widened row by row for the few-row kernel, in blocks for sgemm.
// On AVX-512 machines the few-row products of F32 weights use intrinsics kernels instead: tiles
// of up to 4 rows of x against 4 weight rows with one transposing reduction per tile (the
// portable kernels' per-output horizontal sums cost as much as the products for short rows).
#include <cblas.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "glog/logging.h"
#include "worker/backend/cpu/cpu_backend.h"

namespace gemma::cpu {
namespace {

// Rows of x up to which products use the dot-product kernel.
constexpr int64_t kDotMaxRows = 64;
// Elements of a widened weight block (16 MiB of floats).
constexpr int64_t kBf16BlockElems = int64_t{4} << 20;

// Minimum multiply-adds per thread worth a parallel split.
constexpr int64_t kMinWorkPerThread = int64_t{1} << 15;


// out[r] = x[r] . w for four rows of x (row stride k): each chunk of w is loaded once for the
// four products, which halves the loads per multiply-add against four separate dots.
__attribute__((target_clones("avx512f", "avx2", "default"))) void Dot4(const float* x,
                                                                        const float* w, int64_t k,
                                                                        float* out) {
  float lanes[4][16] = {};
  const float* x0 = x;
  const float* x1 = x + k;
  const float* x2 = x + 2 * k;
  const float* x3 = x + 3 * k;
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    for (int l = 0; l < 16; ++l) {
      const float wv = w[i + l];
      lanes[0][l] += x0[i + l] * wv;
      lanes[1][l] += x1[i + l] * wv;
      lanes[2][l] += x2[i + l] * wv;
      lanes[3][l] += x3[i + l] * wv;
    }
  }
  for (int r = 0; r < 4; ++r) {
    float sum = 0.0f;
    for (int l = 0; l < 16; ++l) sum += lanes[r][l];
    for (int64_t j = i; j < k; ++j) sum += x[r * k + j] * w[j];
    out[r] = sum;
  }
}

// out[q * 4 + r] = x[r] . w[q] for four rows of x and four rows of w (both of row stride k): a
// 4 x 4 tile of products, 8 loads for every 16 multiply-adds.
__attribute__((target_clones("avx512f", "avx2", "default"))) void Dot4x4(const float* x,
                                                                          const float* w,
                                                                          int64_t k, float* out) {
  float lanes[4][4][16] = {};
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    for (int l = 0; l < 16; ++l) {
      float xv[4], wv[4];
      for (int r = 0; r < 4; ++r) xv[r] = x[r * k + i + l];
      for (int q = 0; q < 4; ++q) wv[q] = w[q * k + i + l];
      for (int q = 0; q < 4; ++q) {
        for (int r = 0; r < 4; ++r) lanes[q][r][l] += xv[r] * wv[q];
      }
    }
  }
  for (int q = 0; q < 4; ++q) {
    for (int r = 0; r < 4; ++r) {
      float sum = 0.0f;
      for (int l = 0; l < 16; ++l) sum += lanes[q][r][l];
      for (int64_t j = i; j < k; ++j) sum += x[r * k + j] * w[q * k + j];
      out[q * 4 + r] = sum;
    }
  }
}

// y[r * ldy + j] = x[r] . w_row for every row r of x: one weight row against all of x.
void RowAgainstAll(const float* x, const float* w_row, int64_t m, int64_t k, float* y,
                   int64_t ldy) {
  int64_t r = 0;
  float out[4];
  for (; r + 4 <= m; r += 4) {
    Dot4(x + r * k, w_row, k, out);
    for (int q = 0; q < 4; ++q) y[(r + q) * ldy] = out[q];
  }
  for (; r < m; ++r) y[r * ldy] = DotLanes(x + r * k, w_row, k);
}

// Whether the AVX-512 few-row kernels below may run on this machine.
bool HasAvx512() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return has;
}

// GCC 12's AVX-512 headers start some intrinsics from deliberately undefined registers, which
// -Wuninitialized reports once they are inlined here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"

// Lane i of the result is the horizontal sum of v[i], for 16 accumulators: three rounds of
// unpacks and 128-bit shuffles with adds (45 instructions) instead of 16 separate reductions.
__attribute__((target("avx512f"))) inline __m512 SumEachOf16(const __m512* v) {
  __m512 s[8];
  for (int i = 0; i < 8; ++i) {
    s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  __m512 t[4];
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(s[2 * i]);
    const __m512d b = _mm512_castps_pd(s[2 * i + 1]);
    t[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 u0 =
      _mm512_add_ps(_mm512_shuffle_f32x4(t[0], t[1], 0x44), _mm512_shuffle_f32x4(t[0], t[1], 0xee));
  const __m512 u1 =
      _mm512_add_ps(_mm512_shuffle_f32x4(t[2], t[3], 0x44), _mm512_shuffle_f32x4(t[2], t[3], 0xee));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x88), _mm512_shuffle_f32x4(u0, u1, 0xdd));
}

// y[r * ldy + q] = x[r] . w[q] for kRows (1 to 4) rows of x and 4 rows of w (row stride k), the
// last k % 16 columns through masked loads. kStream walks the four weight rows one after the
// other (one sequential stream: faster when the product is bound by reading the weights, few
// rows of x); otherwise each chunk of the four rows is loaded once for all rows of x (fewer
// loads per multiply-add: faster when bound by arithmetic), and kPrefetch asks for the next
// four weight rows meanwhile (past the last row too: a prefetch never faults).
template <int kRows, bool kStream, bool kPrefetch>
__attribute__((target("avx512f"))) void TileAvx512(const float* x, const float* w, int64_t k,
                                                   float* y, int64_t ldy) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t full = k / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (k - full)) - 1);
  if (kStream) {
    for (int q = 0; q < 4; ++q) {
      const float* wq = w + q * k;
      for (int64_t i = 0; i < full; i += 16) {
        const __m512 wv = _mm512_loadu_ps(wq + i);
        for (int r = 0; r < kRows; ++r) {
          acc[r * 4 + q] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * k + i), wv, acc[r * 4 + q]);
        }
      }
    }
  } else {
    for (int64_t i = 0; i < full; i += 16) {
      __m512 xv[kRows];
      for (int r = 0; r < kRows; ++r) xv[r] = _mm512_loadu_ps(x + r * k + i);
      for (int q = 0; q < 4; ++q) {
        const __m512 wv = _mm512_loadu_ps(w + q * k + i);
        if (kPrefetch)
          _mm_prefetch(reinterpret_cast<const char*>(w + (q + 4) * k + i), _MM_HINT_T0);
        for (int r = 0; r < kRows; ++r) acc[r * 4 + q] = _mm512_fmadd_ps(xv[r], wv, acc[r * 4 + q]);
      }
    }
  }
  if (tail != 0) {
    for (int q = 0; q < 4; ++q) {
      const __m512 wv = _mm512_maskz_loadu_ps(tail, w + q * k + full);
      for (int r = 0; r < kRows; ++r) {
        acc[r * 4 + q] =
            _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, x + r * k + full), wv, acc[r * 4 + q]);
      }
    }
  }
  alignas(64) float out[16];
  _mm512_store_ps(out, SumEachOf16(acc));
  for (int r = 0; r < kRows; ++r) {
    for (int q = 0; q < 4; ++q) y[r * ldy + q] = out[r * 4 + q];
  }
}

// Rows 0 to m (1 to 3 of them) of x against four weight rows, streaming the weights.
void TailRowsAvx512(const float* x, const float* w, int64_t m, int64_t k, float* y, int64_t ldy) {
  switch (m) {
    case 3:
      TileAvx512<3, true, false>(x, w, k, y, ldy);
      break;
    case 2:
      TileAvx512<2, true, false>(x, w, k, y, ldy);
      break;
    case 1:
      TileAvx512<1, true, false>(x, w, k, y, ldy);
      break;
    default:
      break;
  }
}

// Up to this many rows of x the AVX-512 product streams each weight row on its own (bound by
// memory); from it on, tiles share weight loads across four rows of x (bound by arithmetic).
constexpr int64_t kStreamMaxRows = 7;

// The few-row product over output columns [begin, end) with the AVX-512 tiles.
void FewRowsAvx512(const float* x, const float* w, int64_t m, int64_t k, float* y, int64_t ldy,
                   int64_t begin, int64_t end) {
  int64_t j = begin;
  for (; j + 4 <= end; j += 4) {
    const float* wj = w + j * k;
    int64_t r = 0;
    if (m <= kStreamMaxRows) {
      for (; r + 4 <= m; r += 4) TileAvx512<4, true, false>(x + r * k, wj, k, y + r * ldy + j, ldy);
    } else {
      // The first tile of x brings the next weight rows into L1 for the others.
      TileAvx512<4, false, true>(x, wj, k, y + j, ldy);
      for (r = 4; r + 4 <= m; r += 4) {
        TileAvx512<4, false, false>(x + r * k, wj, k, y + r * ldy + j, ldy);
      }
    }
    TailRowsAvx512(x + r * k, wj, m - r, k, y + r * ldy + j, ldy);
  }
  for (; j < end; ++j) RowAgainstAll(x, w + j * k, m, k, y + j, ldy);
}

#pragma GCC diagnostic pop

// y[m, n] (row stride ldy) = x[m, k] . w[n, k]^T, output rows split across the pool.
void F32Product(ThreadPool* pool, const float* x, const float* w, int64_t m, int64_t n, int64_t k,
                float* y, int64_t ldy) {
  auto slice = [&](int64_t begin, int64_t end) {
    if (m > 1 && m <= kDotMaxRows && HasAvx512()) {
      FewRowsAvx512(x, w, m, k, y, ldy, begin, end);
    } else if (m > 1 && m <= kDotMaxRows) {
      int64_t j = begin;
      // Tiles of four weight rows against four rows of x, then what is left row by row.
      for (; j + 4 <= end; j += 4) {
        int64_t r = 0;
        float out[16];
        for (; r + 4 <= m; r += 4) {
          Dot4x4(x + r * k, w + j * k, k, out);
          for (int q = 0; q < 4; ++q) {
            for (int t = 0; t < 4; ++t) y[(r + t) * ldy + j + q] = out[q * 4 + t];
          }
        }
        if (r < m) {
          for (int q = 0; q < 4; ++q) {
            RowAgainstAll(x + r * k, w + (j + q) * k, m - r, k, y + r * ldy + j + q, ldy);
          }
        }
      }
      for (; j < end; ++j) RowAgainstAll(x, w + j * k, m, k, y + j, ldy);
    } else if (m == 1) {
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
      RowAgainstAll(x, row.data(), m, k, y + j, n);
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
  if (m <= kDotMaxRows) {
    MatMulBf16Dot(pool, x, wb, m, n, k, y);
  } else {
    MatMulBf16Blocked(pool, x, wb, m, n, k, y);
  }
}

// A single running sum would be a chain of dependent additions the compiler may not reorder.
__attribute__((target_clones("avx512f", "avx2", "default"))) float DotLanes(const float* a,
                                                                            const float* b,
                                                                            int64_t k) {
  float lanes[16] = {};
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    for (int l = 0; l < 16; ++l) lanes[l] += a[i + l] * b[i + l];
  }
  float sum = 0.0f;
  for (int l = 0; l < 16; ++l) sum += lanes[l];
  for (; i < k; ++i) sum += a[i] * b[i];
  return sum;
}

}  // namespace gemma::cpu
