// The allocator of the CUDA backend's device arena: a first-fit free list over byte offsets of
// one region taken at start-up, coalescing neighbours on free. Host-only bookkeeping (it never
// touches device memory), thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>

namespace gemma {

class DeviceArena {
 public:
  // Every block starts on this boundary (cuBLAS and 16-byte vector loads want it).
  static constexpr size_t kAlignment = 256;

  explicit DeviceArena(size_t capacity);

  // Offset of a free block of at least `bytes` (rounded up to kAlignment; 0 counts as one
  // unit), or nullopt when no free block is large enough.
  std::optional<size_t> Allocate(size_t bytes);
  // Returns the block at `offset` (from Allocate) to the free list.
  void Free(size_t offset);

  size_t capacity() const { return capacity_; }
  size_t bytes_in_use() const;
  size_t largest_free_block() const;

 private:
  const size_t capacity_;
  mutable std::mutex mu_;
  std::map<size_t, size_t> free_;  // offset -> size, no two adjacent
  std::map<size_t, size_t> used_;  // offset -> size
  size_t in_use_ = 0;
};

}  // namespace gemma
