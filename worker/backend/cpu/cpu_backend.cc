#include "worker/backend/cpu/cpu_backend.h"

#include <cblas.h>

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
}  // namespace

void CpuBuffer::Free::operator()(uint8_t* p) const { std::free(p); }

CpuBuffer::CpuBuffer(DType dtype, int64_t numel) : Buffer(dtype, numel) {
  size_t bytes = std::max<size_t>(this->bytes(), 1);
  bytes = (bytes + kAlignment - 1) / kAlignment * kAlignment;
  storage_.reset(static_cast<uint8_t*>(std::aligned_alloc(kAlignment, bytes)));
  CHECK(storage_ != nullptr) << "CPU allocation of " << bytes << " bytes failed";
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
                                    : static_cast<int>(std::thread::hardware_concurrency())) {
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
      for (int64_t i = 0; i < inter; ++i) orow[i] = cpu::GeluTanh(g[i]) * u[i];
    }
  });
}

void CpuBackend::Softcap(Buffer& x, int64_t n, float cap) {
  float* p = F32Data(x);
  pool_.ParallelFor(n, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) p[i] = cap * std::tanh(p[i] / cap);
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

namespace cpu {
float GeluTanh(float x) {
  constexpr float kSqrt2OverPi = 0.7978845608028654f;
  return 0.5f * x * (1.0f + std::tanh(kSqrt2OverPi * (x + 0.044715f * x * x * x)));
}
}  // namespace cpu

}  // namespace gemma
