// Defaults of a generation request, the same in the coordinator, the replicas and the engine.
#pragma once

#include <cstdint>

namespace gemma {

// Tokens generated when a request leaves max_tokens 0 (unset).
inline constexpr int64_t kDefaultMaxTokens = 16;

}  // namespace gemma
