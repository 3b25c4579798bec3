#include "worker/engine/step_executor.h"

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace gemma::engine {

absl::StatusOr<std::vector<int32_t>> SingleRankExecutor::Execute(const StepBatch& batch,
                                                                 KvCache& cache) {
  if (batch.entries.empty()) return std::vector<int32_t>();
  steps_.clear();
  params_.clear();
  for (const StepEntry& entry : batch.entries) {
    steps_.push_back(gemma4::SequenceStep{entry.tokens, entry.kv, entry.logits_mode()});
    if (entry.sample) params_.push_back(entry.sampling);
  }
  RETURN_IF_ERROR(model_->Forward(steps_, cache).status());
  if (params_.empty()) return std::vector<int32_t>();
  return model_->Sample(params_);
}

}  // namespace gemma::engine
