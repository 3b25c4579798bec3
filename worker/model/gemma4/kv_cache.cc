#include "worker/model/gemma4/kv_cache.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "glog/logging.h"

namespace gemma {

PagePool::PagePool(int64_t num_pages) : num_pages_(num_pages), in_use_(num_pages, false) {
  free_.reserve(num_pages);
  // Hand out low pages first.
  for (int64_t p = num_pages - 1; p >= 0; --p) free_.push_back(static_cast<int32_t>(p));
}

int32_t PagePool::Allocate() {
  if (free_.empty()) return -1;
  int32_t page = free_.back();
  free_.pop_back();
  in_use_[page] = true;
  return page;
}

void PagePool::Free(int32_t page) {
  CHECK(page >= 0 && page < num_pages_) << "page " << page << " outside the pool";
  CHECK(in_use_[page]) << "page " << page << " freed twice";
  in_use_[page] = false;
  free_.push_back(page);
}

absl::StatusOr<std::unique_ptr<KvCache>> KvCache::Create(const ModelConfig& config,
                                                         Backend& backend,
                                                         const KvCacheOptions& options) {
  if (options.page_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("page_size must be positive, got ",
                                                   options.page_size));
  }
  const DType dtype = backend.KvCacheDType();
  if (dtype != DType::kF32 && dtype != DType::kBF16) {
    return absl::InvalidArgumentError(absl::StrCat("the ", backend.Name(),
                                                   " backend asks for a KV cache in ",
                                                   DTypeName(dtype), "; only F32 and BF16 exist"));
  }
  std::unique_ptr<KvCache> cache(new KvCache());
  cache->dtype_ = dtype;
  cache->page_size_ = options.page_size;
  cache->window_ = config.sliding_window;
  for (int p = 0; p < 2; ++p) {
    int64_t pages = options.num_pages[p];
    if (pages <= 0) pages = (options.default_tokens + options.page_size - 1) / options.page_size;
    cache->pools_[p] = std::make_unique<PagePool>(pages);
  }
  const int num_layers = static_cast<int>(config.num_hidden_layers);
  if (!options.kv_heads_per_layer.empty() &&
      static_cast<int>(options.kv_heads_per_layer.size()) != num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("kv_heads_per_layer has ",
                                                   options.kv_heads_per_layer.size(),
                                                   " entries for ", num_layers, " layers"));
  }
  cache->k_.resize(num_layers);
  cache->v_.resize(num_layers);
  for (int l = 0; l < num_layers; ++l) {
    int pool = config.IsFull(l) ? kFullPool : kSlidingPool;
    const int64_t kv_heads = options.kv_heads_per_layer.empty() ? config.LayerKvHeads(l)
                                                                : options.kv_heads_per_layer[l];
    const int64_t row = kv_heads * config.LayerHeadDim(l);
    const int64_t numel = cache->pools_[pool]->num_pages() * options.page_size * row;
    ASSIGN_OR_RETURN(cache->v_[l], backend.Alloc(dtype, numel));
    if (!config.LayerKEqV(l)) {
      ASSIGN_OR_RETURN(cache->k_[l], backend.Alloc(dtype, numel));
    }
    cache->bytes_per_token_[pool] +=
        (config.LayerKEqV(l) ? 1 : 2) * row * static_cast<int64_t>(DTypeSize(dtype));
  }
  return cache;
}

int64_t KvCache::TotalBytes() const {
  int64_t total = 0;
  for (const BufferPtr& b : k_) total += b != nullptr ? static_cast<int64_t>(b->bytes()) : 0;
  for (const BufferPtr& b : v_) total += static_cast<int64_t>(b->bytes());
  return total;
}

int64_t KvCache::PagesNeeded(const SequenceKv& seq, int64_t new_length, int pool) const {
  if (new_length <= 0) return 0;
  int64_t first = 0;
  if (pool == kSlidingPool) {
    // Queries of the new positions see back to seq.length - window + 1.
    first = std::max<int64_t>(0, seq.length - window_ + 1) / page_size_;
  }
  int64_t last = (new_length - 1) / page_size_;
  const auto& table = seq.page_tables[pool];
  int64_t needed = 0;
  for (int64_t p = first; p <= last; ++p) {
    if (p >= static_cast<int64_t>(table.size()) || table[p] < 0) ++needed;
  }
  return needed;
}

absl::Status KvCache::Grow(SequenceKv& seq, int64_t new_length) {
  for (int pool = 0; pool < 2; ++pool) {
    int64_t needed = PagesNeeded(seq, new_length, pool);
    if (needed > pools_[pool]->num_free()) {
      return absl::ResourceExhaustedError(absl::StrCat(
          pool == kSlidingPool ? "sliding" : "full", "-layer KV pool has ", pools_[pool]->num_free(),
          " free pages, ", needed, " needed to reach ", new_length, " positions"));
    }
  }
  for (int pool = 0; pool < 2; ++pool) {
    int64_t first = pool == kSlidingPool ? std::max<int64_t>(0, seq.length - window_ + 1) / page_size_
                                         : 0;
    int64_t last = new_length > 0 ? (new_length - 1) / page_size_ : -1;
    auto& table = seq.page_tables[pool];
    if (static_cast<int64_t>(table.size()) < last + 1) table.resize(last + 1, -1);
    for (int64_t p = first; p <= last; ++p) {
      if (table[p] < 0) {
        table[p] = pools_[pool]->Allocate();
        CHECK_GE(table[p], 0);
      }
    }
  }
  return absl::OkStatus();
}

void KvCache::TrimSliding(SequenceKv& seq) {
  int64_t first_visible = std::max<int64_t>(0, seq.length - window_ + 1);
  auto& table = seq.page_tables[kSlidingPool];
  int64_t first_page = first_visible / page_size_;
  for (int64_t p = 0; p < std::min<int64_t>(first_page, table.size()); ++p) {
    if (table[p] >= 0) {
      pools_[kSlidingPool]->Free(table[p]);
      table[p] = -1;
    }
  }
}

void KvCache::Release(SequenceKv& seq) {
  for (int pool = 0; pool < 2; ++pool) {
    for (int32_t& page : seq.page_tables[pool]) {
      if (page >= 0) pools_[pool]->Free(page);
      page = -1;
    }
    seq.page_tables[pool].clear();
  }
  seq.length = 0;
}

int64_t KvCache::SlidingPositionsHeld(const SequenceKv& seq) const {
  int64_t held = 0;
  for (int32_t page : seq.page_tables[kSlidingPool]) held += page >= 0 ? page_size_ : 0;
  return held;
}

}  // namespace gemma
