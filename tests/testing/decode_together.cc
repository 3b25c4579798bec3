#include "tests/testing/decode_together.h"

#include <span>

#include "common/status_macros.h"

namespace gemma::testing {
namespace {

absl::StatusOr<std::vector<float>> Run(gemma4::Model& model, KvCache& cache,
                                       const std::vector<std::vector<int32_t>>& prompts, int steps,
                                       std::vector<SequenceKv>& kvs) {
  std::vector<int32_t> next(prompts.size());
  for (size_t s = 0; s < prompts.size(); ++s) {
    RETURN_IF_ERROR(cache.Grow(kvs[s], static_cast<int64_t>(prompts[s].size())));
    gemma4::SequenceStep step{prompts[s], &kvs[s], gemma4::LogitsMode::kLast};
    RETURN_IF_ERROR(model.Forward(std::span<const gemma4::SequenceStep>(&step, 1), cache).status());
    ASSIGN_OR_RETURN(std::vector<int32_t> ids, model.Sample({SamplingParams{}}));
    next[s] = ids[0];
  }
  std::vector<float> all;
  for (int i = 0; i < steps; ++i) {
    std::vector<gemma4::SequenceStep> batch;
    for (size_t s = 0; s < prompts.size(); ++s) {
      RETURN_IF_ERROR(cache.Grow(kvs[s], kvs[s].length + 1));
      batch.push_back({std::span<const int32_t>(&next[s], 1), &kvs[s], gemma4::LogitsMode::kLast});
    }
    RETURN_IF_ERROR(model.Forward(batch, cache).status());
    ASSIGN_OR_RETURN(std::vector<float> logits, model.LogitsToHost());
    all.insert(all.end(), logits.begin(), logits.end());
    ASSIGN_OR_RETURN(next, model.Sample(std::vector<SamplingParams>(prompts.size())));
    for (SequenceKv& kv : kvs) cache.TrimSliding(kv);
  }
  return all;
}

}  // namespace

absl::StatusOr<std::vector<float>> DecodeTogether(gemma4::Model& model, KvCache& cache,
                                                  const std::vector<std::vector<int32_t>>& prompts,
                                                  int steps) {
  std::vector<SequenceKv> kvs(prompts.size());
  absl::StatusOr<std::vector<float>> result = Run(model, cache, prompts, steps, kvs);
  for (SequenceKv& kv : kvs) cache.Release(kv);
  return result;
}

}  // namespace gemma::testing
