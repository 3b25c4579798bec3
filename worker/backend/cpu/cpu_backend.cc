#include "worker/backend/cpu/cpu_backend.h"

#include <cblas.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "glog/logging.h"

namespace gemma {

namespace {
constexpr size_t kAlignment = 64;
// Buffers of at least this many bytes (weights, KV caches) start on a 2 MiB boundary and ask the
// kernel for transparent huge pages: streaming the weights (all of decode at batch 1, the
// experts at batch 32) then reads about a third faster on the EPYC of docs/perf.md than
// through 4 KiB pages (28 -> 37 GB/s with two threads). Where THP is "never" the advice is
// ignored; where it is "always" it changes nothing.
constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kHugePageMinBytes = 2 * kHugePage;
}  // namespace

void CpuBuffer::Free::operator()(uint8_t* p) const { std::free(p); }

CpuBuffer::CpuBuffer(DType dtype, int64_t numel) : Buffer(dtype, numel) {
  size_t bytes = std::max<size_t>(this->bytes(), 1);
  const bool huge = bytes >= kHugePageMinBytes;
  const size_t alignment = huge ? kHugePage : kAlignment;
  bytes = (bytes + alignment - 1) / alignment * alignment;
  storage_.reset(static_cast<uint8_t*>(std::aligned_alloc(alignment, bytes)));
  CHECK(storage_ != nullptr) << "CPU allocation of " << bytes << " bytes failed";
  // Advice only: a kernel without THP support refuses it and the buffer keeps small pages.
  if (huge) madvise(storage_.get(), bytes, MADV_HUGEPAGE);
  data_ = storage_.get();
}

CpuBuffer::CpuBuffer(DType dtype, int64_t numel, uint8_t* data) : Buffer(dtype, numel), data_(data) {}

CpuBuffer& AsCpu(Buffer& b) {
  auto* cpu = dynamic_cast<CpuBuffer*>(&b);
  CHECK(cpu != nullptr) << "buffer was not allocated by the CPU backend";
  return *cpu;
}
const CpuBuffer& AsCpu(const Buffer& b) {
  const auto* cpu = dynamic_cast<const CpuBuffer*>(&b);
  CHECK(cpu != nullptr) << "buffer was not allocated by the CPU backend";
  return *cpu;
}
float* F32Data(Buffer& b) {
  CHECK(b.dtype() == DType::kF32) << "expected an F32 buffer, got " << DTypeName(b.dtype());
  return AsCpu(b).f32();
}
const float* F32Data(const Buffer& b) {
  CHECK(b.dtype() == DType::kF32) << "expected an F32 buffer, got " << DTypeName(b.dtype());
  return AsCpu(b).f32();
}
int32_t* I32Data(Buffer& b) {
  CHECK(b.dtype() == DType::kI32) << "expected an I32 buffer, got " << DTypeName(b.dtype());
  return AsCpu(b).i32();
}
const int32_t* I32Data(const Buffer& b) {
  CHECK(b.dtype() == DType::kI32) << "expected an I32 buffer, got " << DTypeName(b.dtype());
  return AsCpu(b).i32();
}

float LoadF32(const Buffer& b, int64_t i) {
  const CpuBuffer& c = AsCpu(b);
  if (b.dtype() == DType::kF32) return c.f32()[i];
  CHECK(b.dtype() == DType::kBF16) << "not a float buffer: " << DTypeName(b.dtype());
  return Bf16ToF32(c.bf16()[i]);
}

void LoadF32Range(const Buffer& b, int64_t offset, int64_t count, float* dst) {
  CHECK_LE(offset + count, b.numel());
  const CpuBuffer& c = AsCpu(b);
  if (b.dtype() == DType::kF32) {
    std::memcpy(dst, c.f32() + offset, count * sizeof(float));
  } else {
    CHECK(b.dtype() == DType::kBF16) << "not a float buffer: " << DTypeName(b.dtype());
    ConvertToF32(DType::kBF16, c.bf16() + offset, count, dst);
  }
}

CpuBackend::CpuBackend(CpuBackendOptions options)
    : pool_(options.num_threads > 0 ? options.num_threads
                                    : static_cast<int>(std::thread::hardware_concurrency())),
      experts_whole_max_tokens_(options.experts_whole_max_tokens) {
  // OpenBLAS runs inside our pool's threads, one thread each (see cpu_matmul.cc).
  openblas_set_num_threads(1);
}

absl::StatusOr<BufferPtr> CpuBackend::Alloc(DType dtype, int64_t numel) {
  if (numel < 0) return absl::InvalidArgumentError(absl::StrCat("negative size ", numel));
  return std::make_unique<CpuBuffer>(dtype, numel);
}

absl::StatusOr<BufferPtr> CpuBackend::UploadWeight(DType src_dtype, const void* src,
                                                   int64_t numel) {
  switch (src_dtype) {
    case DType::kF32:
    case DType::kBF16: {
      auto buf = std::make_unique<CpuBuffer>(src_dtype, numel);
      std::memcpy(buf->data(), src, buf->bytes());
      return buf;
    }
    case DType::kF16: {
      auto buf = std::make_unique<CpuBuffer>(DType::kF32, numel);
      ConvertToF32(DType::kF16, src, numel, buf->f32());
      return buf;
    }
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("weights must be F32, BF16 or F16, got ", DTypeName(src_dtype)));
  }
}

absl::StatusOr<BufferPtr> CpuBackend::View(Buffer& base, int64_t offset, int64_t numel) {
  if (offset < 0 || numel < 0 || offset + numel > base.numel()) {
    return absl::OutOfRangeError(absl::StrCat("view [", offset, ", ", offset + numel,
                                              ") outside a buffer of ", base.numel()));
  }
  return std::make_unique<CpuBuffer>(base.dtype(), numel,
                                     AsCpu(base).data() + offset * DTypeSize(base.dtype()));
}

void CpuBackend::Write(Buffer& dst, const void* src, size_t bytes, size_t offset) {
  CHECK_LE(offset + bytes, dst.bytes()) << "write past the end of a buffer";
  std::memcpy(AsCpu(dst).data() + offset, src, bytes);
}

absl::Status CpuBackend::Read(const Buffer& src, void* dst, size_t bytes, size_t offset) {
  if (offset + bytes > src.bytes()) {
    return absl::OutOfRangeError(
        absl::StrCat("read of ", bytes, " bytes at ", offset, " past a buffer of ", src.bytes()));
  }
  std::memcpy(dst, AsCpu(src).data() + offset, bytes);
  return absl::OkStatus();
}

void CpuBackend::Embed(const Buffer& ids, const Buffer& table, int64_t n, int64_t vocab,
                       int64_t vocab_offset, int64_t hidden, float scale, Buffer& out) {
  const int32_t* id = I32Data(ids);
  float* o = F32Data(out);
  pool_.ParallelFor(n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* row = o + t * hidden;
      const int64_t local = id[t] - vocab_offset;
      if (local < 0 || local >= vocab) {
        std::fill(row, row + hidden, 0.0f);
        continue;
      }
      LoadF32Range(table, local * hidden, hidden, row);
      for (int64_t i = 0; i < hidden; ++i) row[i] *= scale;
    }
  });
}

void CpuBackend::MatMul(const Buffer& x, const Buffer& w, int64_t m, int64_t n, int64_t k,
                        Buffer& y, int64_t w_row_offset) {
  CHECK_LE((w_row_offset + n) * k, w.numel()) << "weight too small for the product";
  CHECK_LE(m * k, x.numel());
  CHECK_LE(m * n, y.numel());
  cpu::MatMulF32(&pool_, F32Data(x), w, w_row_offset, m, n, k, F32Data(y));
}

namespace {
// 1 / sqrt(mean(x^2) + eps), accumulated in double.
float InvRms(const float* x, int64_t dim, float eps) {
  double sum = 0.0;
  for (int64_t i = 0; i < dim; ++i) sum += static_cast<double>(x[i]) * x[i];
  float mean_sq = static_cast<float>(sum / static_cast<double>(dim));
  return 1.0f / std::sqrt(mean_sq + eps);
}
}  // namespace

void CpuBackend::RmsNorm(const Buffer& x, const Buffer* w, int64_t rows, int64_t dim, float eps,
                         Buffer& out) {
  const float* xs = F32Data(x);
  float* o = F32Data(out);
  std::vector<float> weight;
  if (w != nullptr) {
    weight.resize(dim);
    LoadF32Range(*w, 0, dim, weight.data());
  }
  pool_.ParallelFor(rows, std::max<int64_t>(1, 8192 / dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xs + r * dim;
      float* orow = o + r * dim;
      float inv = InvRms(xr, dim, eps);
      for (int64_t i = 0; i < dim; ++i) {
        float v = xr[i] * inv;
        orow[i] = weight.empty() ? v : v * weight[i];
      }
    }
  });
}

void CpuBackend::AddRmsNorm(Buffer& residual, const Buffer& x, const Buffer& w,
                            const Buffer* scalar, int64_t rows, int64_t dim, float eps) {
  float* res = F32Data(residual);
  const float* xs = F32Data(x);
  std::vector<float> weight(dim);
  LoadF32Range(w, 0, dim, weight.data());
  float s = scalar != nullptr ? LoadF32(*scalar, 0) : 1.0f;
  pool_.ParallelFor(rows, std::max<int64_t>(1, 8192 / dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xs + r * dim;
      float* rr = res + r * dim;
      float inv = InvRms(xr, dim, eps);
      for (int64_t i = 0; i < dim; ++i) {
        float v = rr[i] + (xr[i] * inv) * weight[i];
        rr[i] = scalar != nullptr ? v * s : v;
      }
    }
  });
}

void CpuBackend::Add(const Buffer& a, const Buffer& b, int64_t n, Buffer& out) {
  const float* pa = F32Data(a);
  const float* pb = F32Data(b);
  float* po = F32Data(out);
  for (int64_t i = 0; i < n; ++i) po[i] = pa[i] + pb[i];
}

void CpuBackend::GeluMul(const Buffer& gate_up, int64_t n, int64_t inter, Buffer& out) {
  const float* gu = F32Data(gate_up);
  float* o = F32Data(out);
  pool_.ParallelFor(n, std::max<int64_t>(1, 4096 / inter), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* g = gu + t * 2 * inter;
      const float* u = g + inter;
      float* orow = o + t * inter;
      cpu::GeluTanhMul(g, u, inter, orow);
    }
  });
}

void CpuBackend::Softcap(Buffer& x, int64_t n, float cap) {
  float* p = F32Data(x);
  pool_.ParallelFor(n, 16384, [&](int64_t begin, int64_t end) {
    cpu::SoftcapInPlace(p + begin, end - begin, cap);
  });
}

void CpuBackend::GatherRows(const Buffer& x, const Buffer& rows, int64_t num_rows, int64_t dim,
                            Buffer& out) {
  const float* xs = F32Data(x);
  const int32_t* r = I32Data(rows);
  float* o = F32Data(out);
  for (int64_t i = 0; i < num_rows; ++i) {
    CHECK_GE(r[i], 0);
    CHECK_LE((r[i] + 1) * dim, x.numel()) << "row " << r[i] << " outside the source";
    std::memcpy(o + i * dim, xs + static_cast<int64_t>(r[i]) * dim, dim * sizeof(float));
  }
}

void CpuBackend::GatherSumRows(const Buffer& x, const Buffer& idx, int64_t rows, int64_t k,
                               int64_t dim, Buffer& out) {
  const float* xs = F32Data(x);
  const int32_t* ids = I32Data(idx);
  float* o = F32Data(out);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = o + r * dim;
    std::fill(row, row + dim, 0.0f);
    for (int64_t j = 0; j < k; ++j) {
      const int32_t src = ids[r * k + j];
      if (src < 0) continue;
      CHECK_LE((static_cast<int64_t>(src) + 1) * dim, x.numel())
          << "row " << src << " outside the source";
      const float* s = xs + static_cast<int64_t>(src) * dim;
      for (int64_t i = 0; i < dim; ++i) row[i] += s[i];
    }
  }
}

namespace cpu {
namespace {
constexpr float kSqrt2OverPi = 0.7978845608028654f;

// tanh(a) as Eigen's float tanh: a 13/6 rational function on [-7.905, 7.905] (beyond it float
// tanh is +-1), a itself below 4e-4. Within 3e-7 relative of tanh over all floats, branch-free
// so that the loops calling it vectorise (std::tanh does not, and cost 8% of batched decode).
inline float FastTanh(float a) {
  constexpr float kClamp = 7.90531110763549805f;
  float x = a > kClamp ? kClamp : a;  // NaN stays NaN
  x = x < -kClamp ? -kClamp : x;
  const float x2 = x * x;
  float p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
  p = x2 * p + -8.60467152213735e-11f;
  p = x2 * p + 5.12229709037114e-08f;
  p = x2 * p + 1.48572235717979e-05f;
  p = x2 * p + 6.37261928875436e-04f;
  p = x2 * p + 4.89352455891786e-03f;
  p = x * p;
  float q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
  q = x2 * q + 2.26843463243900e-03f;
  q = x2 * q + 4.89352518554385e-03f;
  const float t = p / q;
  return std::fabs(a) < 0.0004f ? a : t;
}
}  // namespace

float GeluTanh(float x) {
  return 0.5f * x * (1.0f + std::tanh(kSqrt2OverPi * (x + 0.044715f * x * x * x)));
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void GeluTanhMul(const float* gate,
                                                                              const float* up,
                                                                              int64_t n,
                                                                              float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = gate[i];
    out[i] = 0.5f * x * (1.0f + FastTanh(kSqrt2OverPi * (x + 0.044715f * x * x * x))) * up[i];
  }
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void SoftcapInPlace(float* x,
                                                                                 int64_t n,
                                                                                 float cap) {
  for (int64_t i = 0; i < n; ++i) x[i] = cap * FastTanh(x[i] / cap);
}
}  // namespace cpu

}  // namespace gemma
