#include "worker/engine/generate.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace gemma {

using gemma4::LogitsMode;
using gemma4::SequenceStep;

absl::StatusOr<std::vector<float>> ReadLogits(Backend& backend, const Buffer& logits, int64_t rows,
                                              int64_t vocab) {
  std::vector<float> host(rows * vocab);
  RETURN_IF_ERROR(backend.Read(logits, host.data(), host.size() * sizeof(float)));
  return host;
}

namespace {

// Runs `tokens` through the model as steps of at most `chunk` tokens, growing and trimming the
// sequence's pages. The last step produces logits under `mode` (kAll: every step does, and they
// are appended to `all_logits`).
absl::Status RunChunks(gemma4::Model& model, KvCache& cache, SequenceKv& kv,
                       std::span<const int32_t> tokens, int64_t chunk, LogitsMode mode,
                       std::vector<float>* all_logits) {
  if (tokens.empty()) return absl::InvalidArgumentError("the prompt is empty");
  if (chunk <= 0) chunk = static_cast<int64_t>(tokens.size());
  for (size_t begin = 0; begin < tokens.size(); begin += chunk) {
    size_t end = std::min(tokens.size(), begin + static_cast<size_t>(chunk));
    RETURN_IF_ERROR(cache.Grow(kv, kv.length + static_cast<int64_t>(end - begin)));
    SequenceStep step{tokens.subspan(begin, end - begin), &kv,
                      mode == LogitsMode::kAll ? LogitsMode::kAll
                      : end == tokens.size()   ? mode
                                               : LogitsMode::kNone};
    RETURN_IF_ERROR(model.Forward(std::span<const SequenceStep>(&step, 1), cache).status());
    if (all_logits != nullptr && mode == LogitsMode::kAll) {
      ASSIGN_OR_RETURN(std::vector<float> part, model.LogitsToHost());
      all_logits->insert(all_logits->end(), part.begin(), part.end());
    }
    cache.TrimSliding(kv);
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<float>> PromptLogits(gemma4::Model& model, KvCache& cache,
                                                std::span<const int32_t> prompt,
                                                int64_t prefill_chunk) {
  SequenceKv kv;
  std::vector<float> logits;
  absl::Status status =
      RunChunks(model, cache, kv, prompt, prefill_chunk, LogitsMode::kAll, &logits);
  cache.Release(kv);
  RETURN_IF_ERROR(status);
  return logits;
}

absl::StatusOr<std::vector<int32_t>> Generate(gemma4::Model& model, KvCache& cache,
                                              std::span<const int32_t> prompt,
                                              const GenerateOptions& options) {
  if (options.max_new_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_new_tokens must be >= 0, got ", options.max_new_tokens));
  }
  SequenceKv kv;
  std::vector<int32_t> output;
  auto run = [&]() -> absl::Status {
    if (options.max_new_tokens == 0) return absl::OkStatus();
    RETURN_IF_ERROR(
        RunChunks(model, cache, kv, prompt, options.prefill_chunk, LogitsMode::kLast, nullptr));
    while (true) {
      SamplingParams params = options.sampling;
      params.position = kv.length;
      ASSIGN_OR_RETURN(std::vector<int32_t> sampled, model.Sample({params}));
      const int32_t next = sampled[0];
      output.push_back(next);
      if (static_cast<int64_t>(output.size()) >= options.max_new_tokens) break;
      if (std::find(options.stop_ids.begin(), options.stop_ids.end(), next) !=
          options.stop_ids.end()) {
        break;
      }
      RETURN_IF_ERROR(RunChunks(model, cache, kv, std::span<const int32_t>(&next, 1), 1,
                                LogitsMode::kLast, nullptr));
    }
    return absl::OkStatus();
  };
  absl::Status status = run();
  cache.Release(kv);
  RETURN_IF_ERROR(status);
  return output;
}

}  // namespace gemma
