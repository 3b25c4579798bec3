// Several sequences through one model as the engine runs them: each prompt prefilled on its
// own, then every sequence decoding one greedy token per step in a single Forward over all of
// them. For tests that compare ways of running the same steps (graph replay against eager).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/model/gemma4/kv_cache.h"
#include "worker/model/gemma4/model.h"

namespace gemma::testing {

// The logits of every decode step, [steps, prompts.size(), vocab] flattened. The sequences'
// pages are released before returning.
absl::StatusOr<std::vector<float>> DecodeTogether(gemma4::Model& model, KvCache& cache,
                                                  const std::vector<std::vector<int32_t>>& prompts,
                                                  int steps);

}  // namespace gemma::testing
