#include <cstdint>

#include "worker/backend/backend.h"

namespace gemma {
namespace {
// SplitMix64's finaliser: a bijective mix with full avalanche.
uint64_t Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
}  // namespace

double SamplingUniform(uint64_t seed, uint64_t request_key, int64_t position) {
  uint64_t h = Mix(seed + 0x9e3779b97f4a7c15ULL);
  h = Mix(h ^ (request_key + 0x632be59bd9b4e019ULL));
  h = Mix(h ^ (static_cast<uint64_t>(position) + 0x85ebca77c2b2ae63ULL));
  return static_cast<double>(h >> 11) * (1.0 / 9007199254740992.0);  // 53 bits -> [0, 1)
}

}  // namespace gemma
