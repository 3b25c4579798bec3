// The CPU backend: the reference implementation of every Backend op, fp32 arithmetic over F32 or
// BF16 weights, matrix products through OpenBLAS, loops split over a blocking thread pool. Ops run
// at the moment they are enqueued (the CPU stream is the calling thread).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/thread_pool.h"
#include "worker/backend/backend.h"

namespace gemma {

class CpuBuffer final : public Buffer {
 public:
  CpuBuffer(DType dtype, int64_t numel);
  // A view of `numel` elements at `data` owned by another buffer.
  CpuBuffer(DType dtype, int64_t numel, uint8_t* data);
  uint8_t* data() { return data_; }
  const uint8_t* data() const { return data_; }
  float* f32() { return reinterpret_cast<float*>(data()); }
  const float* f32() const { return reinterpret_cast<const float*>(data()); }
  int32_t* i32() { return reinterpret_cast<int32_t*>(data()); }
  const int32_t* i32() const { return reinterpret_cast<const int32_t*>(data()); }
  const uint16_t* bf16() const { return reinterpret_cast<const uint16_t*>(data()); }

 private:
  struct Free {
    void operator()(uint8_t* p) const;
  };
  std::unique_ptr<uint8_t, Free> storage_;  // null for views
  uint8_t* data_ = nullptr;
};

// Accessors that check the buffer came from the CPU backend and has the expected dtype.
CpuBuffer& AsCpu(Buffer& b);
const CpuBuffer& AsCpu(const Buffer& b);
float* F32Data(Buffer& b);
const float* F32Data(const Buffer& b);
const int32_t* I32Data(const Buffer& b);
int32_t* I32Data(Buffer& b);
// Element `i` of an F32 or BF16 buffer as float.
float LoadF32(const Buffer& b, int64_t i);
// Copies `count` elements starting at `offset` of an F32 or BF16 buffer into `dst` as floats.
void LoadF32Range(const Buffer& b, int64_t offset, int64_t count, float* dst);

struct CpuBackendOptions {
  int num_threads = 0;  // 0: all cores
  // MoeExperts over at most this many tokens (decode) hands whole experts to the threads, each
  // running its products alone; over more (prefill), or when set to 0, it runs one expert after
  // the other with each product split over the threads. Benchmarks set 0 to compare the two.
  int64_t experts_whole_max_tokens = 64;
};

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(CpuBackendOptions options = {});
  std::string Name() const override { return "cpu"; }

  absl::StatusOr<BufferPtr> Alloc(DType dtype, int64_t numel) override;
  // The fp32 reference keeps its KV cache in f32; WriteKv and Attention CHECK that they get one.
  DType KvCacheDType() const override { return DType::kF32; }
  absl::StatusOr<BufferPtr> UploadWeight(DType src_dtype, const void* src, int64_t numel) override;
  bool ThreadSafeUploads() const override { return true; }
  void Write(Buffer& dst, const void* src, size_t bytes, size_t offset = 0) override;
  absl::Status Read(const Buffer& src, void* dst, size_t bytes, size_t offset = 0) override;
  absl::Status Synchronize() override { return absl::OkStatus(); }
  absl::StatusOr<BufferPtr> View(Buffer& base, int64_t offset, int64_t numel) override;
  void* RawData(Buffer& b) override { return AsCpu(b).data(); }

  void Embed(const Buffer& ids, const Buffer& table, int64_t n, int64_t vocab,
             int64_t vocab_offset, int64_t hidden, float scale, Buffer& out) override;
  void MatMul(const Buffer& x, const Buffer& w, int64_t m, int64_t n, int64_t k, Buffer& y,
              int64_t w_row_offset = 0) override;
  void RmsNorm(const Buffer& x, const Buffer* w, int64_t rows, int64_t dim, float eps,
               Buffer& out) override;
  void AddRmsNorm(Buffer& residual, const Buffer& x, const Buffer& w, const Buffer* scalar,
                  int64_t rows, int64_t dim, float eps) override;
  void Add(const Buffer& a, const Buffer& b, int64_t n, Buffer& out) override;
  void HeadNormRope(Buffer& x, const Buffer* w, const Buffer& positions, int64_t num_tokens,
                    int64_t num_heads, const RopeSpec& rope, float eps) override;
  void WriteKv(const Buffer* k, const Buffer& v, const Buffer& slots, int64_t num_tokens,
               int64_t row_elems, Buffer* k_cache, Buffer& v_cache) override;
  void Attention(const AttentionArgs& args) override;
  void GeluMul(const Buffer& gate_up, int64_t n, int64_t inter, Buffer& out) override;
  void MoeRoute(const MoeRouteArgs& args) override;
  void MoeExperts(const MoeExpertsArgs& args) override;
  void Softcap(Buffer& x, int64_t n, float cap) override;
  void GatherRows(const Buffer& x, const Buffer& rows, int64_t num_rows, int64_t dim,
                  Buffer& out) override;
  void GatherSumRows(const Buffer& x, const Buffer& idx, int64_t rows, int64_t k, int64_t dim,
                     Buffer& out) override;
  void TopK(const Buffer& x, int64_t rows, int64_t cols, int64_t k, int64_t id_offset,
            Buffer& values, Buffer& ids) override;
  void LogSumExp(const Buffer& x, int64_t rows, int64_t cols,
                 const std::vector<float>& temperature, Buffer& max_out,
                 Buffer& sum_out) override;
  void Sample(const Buffer& logits, int64_t rows, int64_t vocab,
              const std::vector<SamplingParams>& params, Buffer& ids) override;

 private:
  ThreadPool pool_;
  int64_t experts_whole_max_tokens_;
};

// Shared CPU kernels, also used directly by tests as the scalar reference.
namespace cpu {
// y[m, n] = x[m, k] . w[n, k]^T with w F32 or BF16 starting at row `w_row_offset`.
// Threaded over `pool` (null: the calling thread only).
void MatMulF32(ThreadPool* pool, const float* x, const Buffer& w, int64_t w_row_offset, int64_t m,
               int64_t n, int64_t k, float* y);
// Rotates one head vector in place at `position`.
void ApplyRope(float* head, int64_t position, const RopeSpec& rope);
// The inverse frequencies of `rope` (head_dim / 2 entries, zeros past rotary_pairs).
std::vector<float> RopeInvFreq(const RopeSpec& rope);
// a . b over k floats in 16 independent lanes (it vectorises; built for AVX-512, AVX2 and a
// baseline, picked at run time).
float DotLanes(const float* a, const float* b, int64_t k);
float GeluTanh(float x);
// out[i] = GeluTanh(gate[i]) * up[i] and x[i] = cap * tanh(x[i] / cap), vectorised, through a
// rational tanh within 3e-7 relative of std::tanh.
void GeluTanhMul(const float* gate, const float* up, int64_t n, float* out);
void SoftcapInPlace(float* x, int64_t n, float cap);
}  // namespace cpu

}  // namespace gemma
