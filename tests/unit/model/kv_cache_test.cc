// Page bookkeeping of the paged KV cache: growth, the sliding bound, trimming, release, and
// running out of pages. Storage in the backend's KV dtype (f32 on the CPU; bf16 as the CUDA
// backend asks by default, through a backend that only allocates), its bytes per position, and
// the CPU backend's refusal of a cache that is not f32.
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "worker/backend/cpu/cpu_backend.h"
#include "worker/model/gemma4/kv_cache.h"

namespace gemma {
namespace {

// Host memory, for the allocation-only backend below.
class HostBuffer final : public Buffer {
 public:
  HostBuffer(DType dtype, int64_t numel)
      : Buffer(dtype, numel), data_(static_cast<size_t>(numel) * DTypeSize(dtype)) {}
  void* data() { return data_.data(); }

 private:
  std::vector<char> data_;
};

// A backend whose KvCacheDType() is what the test says and which can only allocate: enough for
// KvCache::Create, which allocates and runs no op. Every op fails the test.
class AllocOnlyBackend final : public Backend {
 public:
  explicit AllocOnlyBackend(DType kv_dtype) : kv_dtype_(kv_dtype) {}
  std::string Name() const override { return "alloc-only"; }
  DType KvCacheDType() const override { return kv_dtype_; }
  absl::StatusOr<BufferPtr> Alloc(DType dtype, int64_t numel) override {
    return std::make_unique<HostBuffer>(dtype, numel);
  }
  absl::StatusOr<BufferPtr> UploadWeight(DType, const void*, int64_t) override { return Fail(); }
  void Write(Buffer&, const void*, size_t, size_t) override { Unexpected(); }
  absl::Status Read(const Buffer&, void*, size_t, size_t) override { return Fail(); }
  absl::Status Synchronize() override { return absl::OkStatus(); }
  absl::StatusOr<BufferPtr> View(Buffer&, int64_t, int64_t) override { return Fail(); }
  void* RawData(Buffer& b) override { return static_cast<HostBuffer&>(b).data(); }
  void Embed(const Buffer&, const Buffer&, int64_t, int64_t, int64_t, int64_t, float,
             Buffer&) override {
    Unexpected();
  }
  void MatMul(const Buffer&, const Buffer&, int64_t, int64_t, int64_t, Buffer&, int64_t) override {
    Unexpected();
  }
  void RmsNorm(const Buffer&, const Buffer*, int64_t, int64_t, float, Buffer&) override {
    Unexpected();
  }
  void AddRmsNorm(Buffer&, const Buffer&, const Buffer&, const Buffer*, int64_t, int64_t,
                  float) override {
    Unexpected();
  }
  void Add(const Buffer&, const Buffer&, int64_t, Buffer&) override { Unexpected(); }
  void HeadNormRope(Buffer&, const Buffer*, const Buffer&, int64_t, int64_t, const RopeSpec&,
                    float) override {
    Unexpected();
  }
  void WriteKv(const Buffer*, const Buffer&, const Buffer&, int64_t, int64_t, Buffer*,
               Buffer&) override {
    Unexpected();
  }
  void Attention(const AttentionArgs&) override { Unexpected(); }
  void GeluMul(const Buffer&, int64_t, int64_t, Buffer&) override { Unexpected(); }
  void MoeRoute(const MoeRouteArgs&) override { Unexpected(); }
  void MoeExperts(const MoeExpertsArgs&) override { Unexpected(); }
  void Softcap(Buffer&, int64_t, float) override { Unexpected(); }
  void GatherRows(const Buffer&, const Buffer&, int64_t, int64_t, Buffer&) override {
    Unexpected();
  }
  void GatherSumRows(const Buffer&, const Buffer&, int64_t, int64_t, int64_t, Buffer&) override {
    Unexpected();
  }
  void TopK(const Buffer&, int64_t, int64_t, int64_t, int64_t, Buffer&, Buffer&) override {
    Unexpected();
  }
  void LogSumExp(const Buffer&, int64_t, int64_t, const std::vector<float>&, Buffer&,
                 Buffer&) override {
    Unexpected();
  }
  void Sample(const Buffer&, int64_t, int64_t, const std::vector<SamplingParams>&,
              Buffer&) override {
    Unexpected();
  }

 private:
  static void Unexpected() { ADD_FAILURE() << "KvCache::Create ran an op on the backend"; }
  static absl::Status Fail() {
    Unexpected();
    return absl::InternalError("alloc-only backend");
  }
  DType kv_dtype_;
};

ModelConfig SmallConfig() {
  ModelConfig c;
  c.num_hidden_layers = 2;
  c.layer_types = {LayerType::kSliding, LayerType::kFull};
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.num_global_key_value_heads = 1;
  c.head_dim = 4;
  c.global_head_dim = 8;
  c.attention_k_eq_v = true;
  c.sliding_window = 8;
  return c;
}

TEST(PagePoolTest, AllocatesUntilEmptyAndReusesFreedPages) {
  PagePool pool(3);
  EXPECT_EQ(pool.Allocate(), 0);
  EXPECT_EQ(pool.Allocate(), 1);
  EXPECT_EQ(pool.Allocate(), 2);
  EXPECT_EQ(pool.Allocate(), -1);
  pool.Free(1);
  EXPECT_EQ(pool.num_free(), 1);
  EXPECT_EQ(pool.Allocate(), 1);
}

TEST(KvCacheTest, FullLayersOfKEqVModelsStoreValuesOnly) {
  CpuBackend backend;
  KvCacheOptions options;
  options.page_size = 4;
  options.num_pages[kSlidingPool] = 5;
  options.num_pages[kFullPool] = 7;
  auto cache = KvCache::Create(SmallConfig(), backend, options);
  ASSERT_TRUE(cache.ok()) << cache.status();
  EXPECT_NE((*cache)->k(0), nullptr);
  EXPECT_EQ((*cache)->k(1), nullptr);
  EXPECT_EQ((*cache)->v(0).numel(), 5 * 4 * 1 * 4);
  EXPECT_EQ((*cache)->v(1).numel(), 7 * 4 * 1 * 8);
}

TEST(KvCacheTest, SlidingPoolHoldsOnlyWhatFutureQueriesSee) {
  CpuBackend backend;
  KvCacheOptions options;
  options.page_size = 4;
  options.num_pages[kSlidingPool] = 8;
  options.num_pages[kFullPool] = 64;
  auto cache_or = KvCache::Create(SmallConfig(), backend, options);
  ASSERT_TRUE(cache_or.ok());
  KvCache& cache = **cache_or;
  SequenceKv seq;
  // Decode 100 positions one at a time; after each step at most window - 1 + 1 positions plus
  // page rounding stay in the sliding pool.
  for (int64_t len = 1; len <= 100; ++len) {
    ASSERT_TRUE(cache.Grow(seq, len).ok()) << len;
    seq.length = len;
    cache.TrimSliding(seq);
    EXPECT_LE(cache.SlidingPositionsHeld(seq), 8 + 4 - 1 + 1) << "at length " << len;
    // Every position a next query can see is still held.
    for (int64_t p = std::max<int64_t>(0, len - 7); p < len; ++p) {
      EXPECT_GE(seq.page_tables[kSlidingPool][p / 4], 0) << p;
    }
  }
  EXPECT_EQ(cache.pool(kFullPool).num_used(), 25);
  cache.Release(seq);
  EXPECT_EQ(cache.pool(kSlidingPool).num_used(), 0);
  EXPECT_EQ(cache.pool(kFullPool).num_used(), 0);
}

TEST(KvCacheTest, ChunkedPrefillHoldsWindowMinusOnePlusChunk) {
  CpuBackend backend;
  KvCacheOptions options;
  options.page_size = 1;  // positions == pages
  options.num_pages[kSlidingPool] = 64;
  options.num_pages[kFullPool] = 256;
  auto cache_or = KvCache::Create(SmallConfig(), backend, options);
  ASSERT_TRUE(cache_or.ok());
  KvCache& cache = **cache_or;
  SequenceKv seq;
  const int64_t chunk = 5;
  for (int64_t len = chunk; len <= 60; len += chunk) {
    ASSERT_TRUE(cache.Grow(seq, len).ok());
    EXPECT_LE(cache.SlidingPositionsHeld(seq), 8 - 1 + chunk);
    seq.length = len;
    cache.TrimSliding(seq);
  }
}

TEST(KvCacheTest, GrowFailsCleanlyWhenThePoolRunsDry) {
  CpuBackend backend;
  KvCacheOptions options;
  options.page_size = 4;
  options.num_pages[kSlidingPool] = 16;
  options.num_pages[kFullPool] = 2;
  auto cache_or = KvCache::Create(SmallConfig(), backend, options);
  ASSERT_TRUE(cache_or.ok());
  KvCache& cache = **cache_or;
  SequenceKv seq;
  absl::Status status = cache.Grow(seq, 9);  // needs 3 full-layer pages
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(status.message().find("full-layer KV pool"), std::string::npos) << status;
  EXPECT_EQ(cache.pool(kSlidingPool).num_used(), 0) << "a failed Grow must allocate nothing";
  EXPECT_TRUE(cache.Grow(seq, 8).ok());
}

// SmallConfig's layout: the sliding layer caches K and V of 1 head x 4 dims, the full (k_eq_v)
// layer V only of 1 head x 8 dims. Pages are counted in positions whatever the dtype, so a bf16
// cache has the f32 cache's pages, elements and bytes per position halved.
TEST(KvCacheTest, PoolsAreAllocatedInTheBackendsKvDtype) {
  KvCacheOptions options;
  options.page_size = 4;
  options.num_pages[kSlidingPool] = 5;
  options.num_pages[kFullPool] = 7;
  const int64_t sliding_values = 2 * 1 * 4;  // K and V
  const int64_t full_values = 1 * 1 * 8;     // V only
  struct Case {
    const char* what;
    std::unique_ptr<Backend> backend;
    DType dtype;
    int64_t elem_bytes;
  };
  Case cases[] = {{"cpu", std::make_unique<CpuBackend>(), DType::kF32, 4},
                  {"f32", std::make_unique<AllocOnlyBackend>(DType::kF32), DType::kF32, 4},
                  {"bf16", std::make_unique<AllocOnlyBackend>(DType::kBF16), DType::kBF16, 2}};
  for (Case& c : cases) {
    EXPECT_EQ(c.backend->KvCacheDType(), c.dtype) << c.what;
    auto cache_or = KvCache::Create(SmallConfig(), *c.backend, options);
    ASSERT_TRUE(cache_or.ok()) << c.what << ": " << cache_or.status();
    KvCache& cache = **cache_or;
    EXPECT_EQ(cache.dtype(), c.dtype) << c.what;
    ASSERT_NE(cache.k(0), nullptr);
    EXPECT_EQ(cache.k(0)->dtype(), c.dtype) << c.what;
    EXPECT_EQ(cache.v(0).dtype(), c.dtype) << c.what;
    EXPECT_EQ(cache.v(1).dtype(), c.dtype) << c.what;
    EXPECT_EQ(cache.pool(kSlidingPool).num_pages(), 5) << c.what;
    EXPECT_EQ(cache.pool(kFullPool).num_pages(), 7) << c.what;
    EXPECT_EQ(cache.v(0).numel(), 5 * 4 * 1 * 4) << c.what;
    EXPECT_EQ(cache.v(1).numel(), 7 * 4 * 1 * 8) << c.what;
    EXPECT_EQ(cache.BytesPerToken(kSlidingPool), sliding_values * c.elem_bytes) << c.what;
    EXPECT_EQ(cache.BytesPerToken(kFullPool), full_values * c.elem_bytes) << c.what;
    EXPECT_EQ(cache.TotalBytes(), (5 * 4 * sliding_values + 7 * 4 * full_values) * c.elem_bytes)
        << c.what;
    EXPECT_EQ(cache.TotalBytes(),
              5 * 4 * cache.BytesPerToken(kSlidingPool) + 7 * 4 * cache.BytesPerToken(kFullPool))
        << c.what;
  }
}

// Pages picked from default_tokens are the same in either dtype: the tools size the cache in
// positions, so bf16 holds as many positions in half the memory.
TEST(KvCacheTest, DefaultPagesDoNotDependOnTheDtype) {
  KvCacheOptions options;
  options.page_size = 16;
  options.default_tokens = 100;
  AllocOnlyBackend f32(DType::kF32), bf16(DType::kBF16);
  auto a = KvCache::Create(SmallConfig(), f32, options);
  auto b = KvCache::Create(SmallConfig(), bf16, options);
  ASSERT_TRUE(a.ok() && b.ok());
  for (int pool : {kSlidingPool, kFullPool}) {
    EXPECT_EQ((*a)->pool(pool).num_pages(), 7);
    EXPECT_EQ((*b)->pool(pool).num_pages(), 7);
    EXPECT_EQ((*b)->BytesPerToken(pool) * 2, (*a)->BytesPerToken(pool));
  }
  EXPECT_EQ((*b)->TotalBytes() * 2, (*a)->TotalBytes());
}

TEST(KvCacheTest, RefusesADtypeOtherThanF32AndBf16) {
  AllocOnlyBackend f16(DType::kF16);
  auto cache = KvCache::Create(SmallConfig(), f16, KvCacheOptions{});
  EXPECT_EQ(cache.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(cache.status().message().find("F16"), std::string::npos) << cache.status();
}

// The CPU backend is the fp32 reference: handed a bf16 cache (one made for a CUDA backend), it
// stops with a message instead of reading the bytes as floats.
TEST(KvCacheDeathTest, CpuBackendRefusesABf16Cache) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  CpuBackend backend;
  const int64_t row = 8;
  BufferPtr v = *backend.Alloc(DType::kF32, row);
  BufferPtr slots = *backend.Alloc(DType::kI32, 1);
  BufferPtr bf16_cache = *backend.Alloc(DType::kBF16, 4 * row);
  const int32_t slot = 0;
  backend.Write(*slots, &slot, sizeof(slot));
  EXPECT_DEATH(backend.WriteKv(nullptr, *v, *slots, 1, row, nullptr, *bf16_cache),
               "keeps its KV cache in f32 only; got a BF16 cache");
}

}  // namespace
}  // namespace gemma
