// Page bookkeeping of the paged KV cache: growth, the sliding bound, trimming, release, and
// running out of pages.
#include <vector>

#include "gtest/gtest.h"
#include "worker/backend/cpu/cpu_backend.h"
#include "worker/model/gemma4/kv_cache.h"

namespace gemma {
namespace {

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

}  // namespace
}  // namespace gemma
