#include "worker/backend/cuda/device_arena.h"

#include <algorithm>

#include "glog/logging.h"

namespace gemma {

DeviceArena::DeviceArena(size_t capacity) : capacity_(capacity / kAlignment * kAlignment) {
  if (capacity_ > 0) free_[0] = capacity_;
}

std::optional<size_t> DeviceArena::Allocate(size_t bytes) {
  const size_t size = std::max<size_t>(1, (bytes + kAlignment - 1) / kAlignment) * kAlignment;
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < size) continue;
    const size_t offset = it->first;
    const size_t rest = it->second - size;
    free_.erase(it);
    if (rest > 0) free_[offset + size] = rest;
    used_[offset] = size;
    in_use_ += size;
    return offset;
  }
  return std::nullopt;
}

void DeviceArena::Free(size_t offset) {
  std::lock_guard<std::mutex> lock(mu_);
  auto used = used_.find(offset);
  CHECK(used != used_.end()) << "free of offset " << offset << " that is not allocated";
  size_t size = used->second;
  in_use_ -= size;
  used_.erase(used);
  size_t start = offset;
  auto next = free_.lower_bound(offset);
  if (next != free_.end() && next->first == offset + size) {
    size += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == start) {
      start = prev->first;
      size += prev->second;
      free_.erase(prev);
    }
  }
  free_[start] = size;
}

size_t DeviceArena::bytes_in_use() const {
  std::lock_guard<std::mutex> lock(mu_);
  return in_use_;
}

size_t DeviceArena::largest_free_block() const {
  std::lock_guard<std::mutex> lock(mu_);
  size_t best = 0;
  for (const auto& [offset, size] : free_) best = std::max(best, size);
  return best;
}

}  // namespace gemma
