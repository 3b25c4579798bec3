#include "worker/model/gemma4/step_graphs.h"

#include <utility>

#include "common/status_macros.h"

namespace gemma::gemma4 {

StepGraphs::~StepGraphs() {
  if (!inputs_.empty()) Drop();
}

int64_t StepGraphs::RoundPages(int64_t max_pages) {
  int64_t width = 1;
  while (width < max_pages) width *= 2;
  return width;
}

std::optional<StepGraphs::Slot> StepGraphs::Acquire(int64_t num_seqs, int64_t max_pages,
                                                    int64_t num_rows, KvCache& cache,
                                                    int num_layers) {
  // Sequences, page-table width and logit rows fix every shape of the step.
  constexpr int64_t kKeyField = int64_t{1} << 21;
  if (num_seqs >= kKeyField || max_pages >= kKeyField || num_rows >= kKeyField) {
    return std::nullopt;
  }
  const int64_t key = (num_seqs * kKeyField + max_pages) * kKeyField + num_rows;
  // A graph writes and reads the KV storage it was recorded with: a step on other storage (a
  // new KvCache, as benches make one per run) must not replay it.
  auto address = [&](Buffer* b) {
    return b != nullptr ? reinterpret_cast<uintptr_t>(backend_.RawData(*b)) : uintptr_t{0};
  };
  std::vector<uintptr_t> cache_id = {static_cast<uintptr_t>(cache.page_size())};
  for (int l = 0; l < num_layers; ++l) {
    cache_id.push_back(address(&cache.v(l)));
    cache_id.push_back(static_cast<uintptr_t>(cache.v(l).numel()));
    cache_id.push_back(address(cache.k(l)));
  }
  if (cache_id != cache_id_) {
    Drop();
    cache_id_ = std::move(cache_id);
  }
  constexpr size_t kMaxGraphs = 64;  // past it, start over rather than grow without bound
  if (inputs_.size() >= kMaxGraphs && inputs_.count(key) == 0) Drop();
  StepInputs* inputs = &inputs_[key];
  return Slot{inputs, inputs->token_ids != nullptr, key};
}

absl::Status StepGraphs::Run(const Slot& slot, const std::function<absl::Status()>& step) {
  // Inputs just allocated (!reuse): a graph the backend holds under this key was not recorded
  // on them (another model's on this backend, or one from before these inputs were dropped)
  // and would replay on freed buffers. Record anew; it replaces that.
  if (!slot.reuse || !backend_.HasGraph(slot.key)) {
    RETURN_IF_ERROR(backend_.BeginCapture());
    absl::Status recorded = step();
    absl::Status ended = backend_.EndCapture(slot.key);
    if (!recorded.ok()) {
      // The step stopped part-way (a collective failed, say): the backend may have kept what
      // was recorded up to there, which a later step of this shape would replay.
      Drop();
      return recorded;
    }
    RETURN_IF_ERROR(ended);
    ++captures_;
  }
  RETURN_IF_ERROR(backend_.Replay(slot.key));
  ++replays_;
  return absl::OkStatus();
}

void StepGraphs::Drop() {
  backend_.DropGraphs();
  inputs_.clear();
}

}  // namespace gemma::gemma4
