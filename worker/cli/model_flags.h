// The flags gemma-forward and gemma-generate share to load one rank of a model: --model,
// --backend, --kv-dtype, --enforce-eager, --threads, --page-size, --cache-tokens, --prefill-chunk, and where the
// experts sit (--redundant-experts, --expert-placement).
#pragma once

#include <cstdint>
#include <string>

#include "absl/flags/declare.h"
#include "absl/status/statusor.h"
#include "worker/cli/parallel_ranks.h"
#include "worker/replica/load.h"

ABSL_DECLARE_FLAG(int64_t, prefill_chunk);
ABSL_DECLARE_FLAG(std::string, backend);

namespace gemma::cli {

// This rank's load options from the flags, with a cache of at least `min_cache_tokens`
// positions (the prompt, plus what is generated). With --expert-placement or
// --redundant-experts, options.parallel.placement points at a placement over the rank's
// expert-parallel ranks, built once per process and kept for its life (the ranks of a process
// share it). INVALID_ARGUMENT naming the flag when the placement does not fit the model or the
// ranks; the placement file's own errors (NOT_FOUND, a bad field) come back prefixed with the
// flag.
absl::StatusOr<replica::LoadOptions> RankLoadOptions(const RankEnv& env, int64_t min_cache_tokens);

}  // namespace gemma::cli
