#include "worker/service/expert_load.h"

#include <algorithm>
#include <utility>

#include "common/status_macros.h"

namespace gemma::service {

absl::Status ExpertLoadRecorder::OnStep(gemma4::Model& model, uint64_t step,
                                        int64_t recomputed_tokens, bool force) {
  if (!model.expert_counts_enabled()) return absl::OkStatus();
  if (first_step_ == 0) first_step_ = step;
  recomputed_ += recomputed_tokens;
  const Clock::time_point now = Clock::now();
  if (!force && now < next_take_) return absl::OkStatus();
  next_take_ = now + window_;
  ASSIGN_OR_RETURN(std::vector<int64_t> counts, model.TakeExpertCounts());
  bool any = false;
  for (int64_t c : counts) any = any || c != 0;
  const uint64_t first = first_step_;
  const int64_t recomputed = recomputed_;
  first_step_ = 0;
  recomputed_ = 0;
  if (!any) return absl::OkStatus();
  gemma::v1::ExpertLoad window;
  window.set_num_layers(static_cast<int32_t>(model.config().num_hidden_layers));
  window.set_num_experts(static_cast<int32_t>(model.config().num_experts));
  window.mutable_counts()->Add(counts.begin(), counts.end());
  window.set_first_step(static_cast<int64_t>(first));
  window.set_last_step(static_cast<int64_t>(step));
  window.set_windows(1);
  window.set_expert_ranks(std::max(1, model.parallel().layout.ep_size));
  window.set_recomputed_tokens(recomputed);
  window.set_placement_epoch(model.placement().epoch);
  absl::MutexLock lock(&mutex_);
  queue_.push_back(std::move(window));
  while (static_cast<int>(queue_.size()) > kMaxQueued) queue_.pop_front();
  return absl::OkStatus();
}

std::vector<gemma::v1::ExpertLoad> ExpertLoadRecorder::Drain() {
  absl::MutexLock lock(&mutex_);
  std::vector<gemma::v1::ExpertLoad> out(queue_.begin(), queue_.end());
  queue_.clear();
  return out;
}

void ExpertLoadRecorder::Requeue(std::vector<gemma::v1::ExpertLoad> windows) {
  absl::MutexLock lock(&mutex_);
  for (auto it = windows.rbegin(); it != windows.rend(); ++it) queue_.push_front(std::move(*it));
  while (static_cast<int>(queue_.size()) > kMaxQueued) queue_.pop_front();
}

}  // namespace gemma::service
