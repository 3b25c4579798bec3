// The paged KV cache: per-layer storage in one page pool per layer type (sliding, full), and the
// page bookkeeping of each sequence. Sliding layers keep only the pages a future query can still
// see; full layers with k_eq_v store V only (the attention op derives K from it). The storage is
// in the backend's KvCacheDType() (f32 on the CPU, bf16 on CUDA by default); pages are counted
// in positions, so a bf16 cache of the same pages takes half the bytes.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model_config.h"
#include "worker/backend/backend.h"

namespace gemma {

inline constexpr int kSlidingPool = 0;
inline constexpr int kFullPool = 1;

// Free list of fixed-size pages. Not thread-safe.
class PagePool {
 public:
  explicit PagePool(int64_t num_pages);
  // A free page, or -1 when none is left.
  int32_t Allocate();
  void Free(int32_t page);
  int64_t num_pages() const { return num_pages_; }
  int64_t num_free() const { return static_cast<int64_t>(free_.size()); }
  int64_t num_used() const { return num_pages_ - num_free(); }

 private:
  int64_t num_pages_;
  std::vector<int32_t> free_;
  std::vector<bool> in_use_;
};

// Which pages one sequence holds. page_tables[pool][logical page] is the physical page, or -1
// where the sequence no longer (or never) holds one.
struct SequenceKv {
  std::vector<int32_t> page_tables[2];
  int64_t length = 0;  // positions already written to the cache
};

struct KvCacheOptions {
  int64_t page_size = 16;
  int64_t num_pages[2] = {0, 0};  // per pool; 0 picks room for `default_tokens` tokens
  int64_t default_tokens = 4096;
  // KV heads stored per layer (this rank's share under tensor parallelism); empty: the
  // config's.
  std::vector<int64_t> kv_heads_per_layer;
};

class KvCache {
 public:
  static absl::StatusOr<std::unique_ptr<KvCache>> Create(const ModelConfig& config,
                                                         Backend& backend,
                                                         const KvCacheOptions& options);

  // Storage of layer `layer_idx`: [num_pages, page_size, kv_heads, head_dim] of dtype(). k() is
  // null on k_eq_v layers.
  Buffer* k(int layer_idx) { return k_[layer_idx].get(); }
  Buffer& v(int layer_idx) { return *v_[layer_idx]; }
  // The element type of every layer's storage: the backend's KvCacheDType() at creation.
  DType dtype() const { return dtype_; }
  // Bytes one position takes in `pool`, over all of that pool's layers (K and V, or V alone on
  // k_eq_v layers, of this rank's KV heads), and so the bytes of one page are page_size() times
  // this.
  int64_t BytesPerToken(int pool) const { return bytes_per_token_[pool]; }
  // Bytes of every layer's storage (both pools).
  int64_t TotalBytes() const;
  int64_t page_size() const { return page_size_; }
  int64_t sliding_window() const { return window_; }
  PagePool& pool(int pool) { return *pools_[pool]; }
  const PagePool& pool(int pool) const { return *pools_[pool]; }

  // Pages needed to extend `seq` to `new_length` positions, per pool (after trimming).
  int64_t PagesNeeded(const SequenceKv& seq, int64_t new_length, int pool) const;
  // Gives `seq` pages for positions [seq.length, new_length). RESOURCE_EXHAUSTED (and nothing
  // allocated) when a pool runs dry. Does not change seq.length.
  absl::Status Grow(SequenceKv& seq, int64_t new_length);
  // After a step that left seq.length positions cached: returns the sliding pages whose every
  // position is below seq.length - sliding_window + 1 (no future query sees them).
  void TrimSliding(SequenceKv& seq);
  // Returns every page of `seq` and resets it.
  void Release(SequenceKv& seq);
  // Positions of `seq` the sliding pool currently holds pages for.
  int64_t SlidingPositionsHeld(const SequenceKv& seq) const;

 private:
  KvCache() = default;
  int64_t page_size_ = 16;
  int64_t window_ = 0;
  DType dtype_ = DType::kF32;
  int64_t bytes_per_token_[2] = {0, 0};
  std::unique_ptr<PagePool> pools_[2];
  std::vector<BufferPtr> k_;
  std::vector<BufferPtr> v_;
};

}  // namespace gemma
