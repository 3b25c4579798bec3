// 64-bit FNV-1a: the one non-cryptographic hash used for model fingerprints, step-plan checks
// and routing checks. CUDA-free and gRPC-free.
#pragma once

#include <cstddef>
#include <cstdint>

namespace gemma {

inline constexpr uint64_t kFnv1aOffset = 0xcbf29ce484222325ULL;

// Continues `hash` over `size` bytes at `data` (start from kFnv1aOffset).
inline uint64_t Fnv1a64(const void* data, size_t size, uint64_t hash = kFnv1aOffset) {
  const auto* bytes = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < size; ++i) {
    hash ^= bytes[i];
    hash *= 0x100000001b3ULL;
  }
  return hash;
}

}  // namespace gemma
