// The flags gemma-forward and gemma-generate share to load one rank of a model: --model,
// --backend, --threads, --page-size, --cache-tokens, --prefill-chunk.
#pragma once

#include <cstdint>

#include "absl/flags/declare.h"
#include "worker/cli/parallel_ranks.h"
#include "worker/replica/load.h"

ABSL_DECLARE_FLAG(int64_t, prefill_chunk);

namespace gemma::cli {

// This rank's load options from the flags, with a cache of at least `min_cache_tokens`
// positions (the prompt, plus what is generated).
replica::LoadOptions RankLoadOptions(const RankEnv& env, int64_t min_cache_tokens);

}  // namespace gemma::cli
