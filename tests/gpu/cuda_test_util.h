// Helpers of the GPU tests: a fixture holding a CUDA and a CPU backend (skipping, with a
// message, where no device is present), random inputs uploaded to both, NaN-poisoned outputs,
// and the comparison every op test uses.
#pragma once

#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/testing/compare.h"
#include "tests/testing/tolerances.h"
#include "worker/backend/cpu/cpu_backend.h"
#include "worker/backend/cuda/cuda_backend.h"

namespace gemma::testing {

// One tensor on both backends.
struct Pair {
  BufferPtr cpu;
  BufferPtr gpu;
};

class CudaVsCpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (CudaBackend::DeviceCount() == 0) {
      GTEST_SKIP() << "no CUDA device present: GPU test skipped";
    }
    CudaBackendOptions options;
    options.arena_bytes = size_t{2} << 30;
    auto backend = CudaBackend::Create(options);
    ASSERT_TRUE(backend.ok()) << backend.status();
    gpu_ = *std::move(backend);
    cpu_ = std::make_unique<CpuBackend>();
  }

  // Replaces gpu_ by a backend with `options` (the old one's arena goes first); a test failure
  // when it cannot be made.
  void ReplaceGpu(const CudaBackendOptions& options) {
    gpu_.reset();
    auto backend = CudaBackend::Create(options);
    ASSERT_TRUE(backend.ok()) << backend.status();
    gpu_ = *std::move(backend);
  }

  // Random values in [-scale, scale], never exactly zero.
  std::vector<float> Random(int64_t n, float scale = 1.0f) {
    std::uniform_real_distribution<float> dist(-scale, scale);
    std::vector<float> v(n);
    for (float& x : v) {
      do x = dist(rng_); while (x == 0.0f);
    }
    return v;
  }

  Pair F32(const std::vector<float>& v) { return Upload(DType::kF32, v.data(), v.size()); }
  Pair I32(const std::vector<int32_t>& v) { return Upload(DType::kI32, v.data(), v.size()); }
  // A weight given as floats, stored as `dtype` (F32 or BF16) on both backends.
  Pair Weight(const std::vector<float>& v, DType dtype) {
    Pair p;
    if (dtype == DType::kF32) {
      p.cpu = *cpu_->UploadWeight(DType::kF32, v.data(), v.size());
      p.gpu = *gpu_->UploadWeight(DType::kF32, v.data(), v.size());
    } else {
      std::vector<uint16_t> b(v.size());
      for (size_t i = 0; i < v.size(); ++i) b[i] = F32ToBf16(v[i]);
      p.cpu = *cpu_->UploadWeight(DType::kBF16, b.data(), b.size());
      p.gpu = *gpu_->UploadWeight(DType::kBF16, b.data(), b.size());
    }
    return p;
  }
  // An output buffer on both backends, filled with NaN so an unwritten element fails.
  Pair Poisoned(DType dtype, int64_t n) {
    Pair p{*cpu_->Alloc(dtype, n), *gpu_->Alloc(dtype, n)};
    std::vector<uint32_t> nan(n, 0x7fc00000u);
    cpu_->Write(*p.cpu, nan.data(), n * 4);
    gpu_->Write(*p.gpu, nan.data(), n * 4);
    // Write's source must stay valid until Synchronize(): `nan` dies on return.
    EXPECT_TRUE(gpu_->Synchronize().ok());
    return p;
  }

  std::vector<float> ReadF32(Backend& b, const Buffer& buf, int64_t n) {
    std::vector<float> out(n);
    absl::Status s = b.Read(buf, out.data(), n * sizeof(float));
    EXPECT_TRUE(s.ok()) << s;
    return out;
  }
  std::vector<int32_t> ReadI32(Backend& b, const Buffer& buf, int64_t n) {
    std::vector<int32_t> out(n);
    absl::Status s = b.Read(buf, out.data(), n * sizeof(int32_t));
    EXPECT_TRUE(s.ok()) << s;
    return out;
  }

  // The first n floats of `p` agree within `tol` (kCudaF32RelTol: f32 paths; pass
  // kCudaRelTol where activations are rounded to bf16 for the tensor cores), and the GPU wrote
  // no NaN.
  void ExpectClose(const Pair& p, int64_t n, const std::string& what,
                   double tol = kCudaF32RelTol) {
    ASSERT_TRUE(gpu_->Synchronize().ok()) << what;
    std::vector<float> ref = ReadF32(*cpu_, *p.cpu, n);
    std::vector<float> ours = ReadF32(*gpu_, *p.gpu, n);
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_FALSE(std::isnan(ours[i])) << what << ": NaN (unwritten?) at " << i;
    }
    Comparison c = Compare(ours, ref);
    EXPECT_FALSE(c.nan_mismatch) << what;
    EXPECT_LE(c.Relative(), tol) << what << ": " << c.ToString();
  }
  void ExpectEqualI32(const Pair& p, int64_t n, const std::string& what) {
    ASSERT_TRUE(gpu_->Synchronize().ok()) << what;
    EXPECT_EQ(ReadI32(*gpu_, *p.gpu, n), ReadI32(*cpu_, *p.cpu, n)) << what;
  }

  std::unique_ptr<CudaBackend> gpu_;
  std::unique_ptr<CpuBackend> cpu_;
  std::mt19937 rng_{1234};

 private:
  Pair Upload(DType dtype, const void* data, size_t n) {
    Pair p{*cpu_->Alloc(dtype, n), *gpu_->Alloc(dtype, n)};
    cpu_->Write(*p.cpu, data, n * 4);
    gpu_->Write(*p.gpu, data, n * 4);
    // Write's source must stay valid until Synchronize(): callers pass temporaries.
    EXPECT_TRUE(gpu_->Synchronize().ok());
    return p;
  }
};

}  // namespace gemma::testing
