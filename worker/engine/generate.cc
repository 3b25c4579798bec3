#include "worker/engine/generate.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace gemma {

using gemma4::LogitsMode;
using gemma4::SequenceStep;

absl::StatusOr<std::vector<float>> ReadLogits(Backend& backend, const Buffer& logits,
                                              int64_t rows, int64_t vocab) {
  std::vector<float> host(rows * vocab);
  RETURN_IF_ERROR(backend.Read(logits, host.data(), host.size() * sizeof(float)));
  return host;
}

namespace {

// Runs `tokens` through the model as steps of at most `chunk` tokens, growing and trimming the
// sequence's pages. Returns the logits of the last step (mode `mode`).
absl::StatusOr<const Buffer*> RunChunks(gemma4::Model& model, KvCache& cache, SequenceKv& kv,
                                        std::span<const int32_t> tokens, int64_t chunk,
                                        LogitsMode mode, std::vector<float>* all_logits) {
  if (tokens.empty()) return absl::InvalidArgumentError("the prompt is empty");
  if (chunk <= 0) chunk = static_cast<int64_t>(tokens.size());
  const Buffer* logits = nullptr;
  const int64_t vocab = model.config().vocab_size;
  for (size_t begin = 0; begin < tokens.size(); begin += chunk) {
    size_t end = std::min(tokens.size(), begin + static_cast<size_t>(chunk));
    RETURN_IF_ERROR(cache.Grow(kv, kv.length + static_cast<int64_t>(end - begin)));
    SequenceStep step{tokens.subspan(begin, end - begin), &kv,
                      mode == LogitsMode::kAll ? LogitsMode::kAll
                      : end == tokens.size()   ? mode
                                               : LogitsMode::kNone};
    ASSIGN_OR_RETURN(logits, model.Forward(std::span<const SequenceStep>(&step, 1), cache));
    if (all_logits != nullptr && mode == LogitsMode::kAll) {
      ASSIGN_OR_RETURN(std::vector<float> part,
                       ReadLogits(model.backend(), *logits, end - begin, vocab));
      all_logits->insert(all_logits->end(), part.begin(), part.end());
    }
    cache.TrimSliding(kv);
  }
  return logits;
}

}  // namespace

absl::StatusOr<std::vector<float>> PromptLogits(gemma4::Model& model, KvCache& cache,
                                                std::span<const int32_t> prompt,
                                                int64_t prefill_chunk) {
  SequenceKv kv;
  std::vector<float> logits;
  auto result = RunChunks(model, cache, kv, prompt, prefill_chunk, LogitsMode::kAll, &logits);
  cache.Release(kv);
  RETURN_IF_ERROR(result.status());
  return logits;
}

absl::StatusOr<std::vector<int32_t>> Generate(gemma4::Model& model, KvCache& cache,
                                              std::span<const int32_t> prompt,
                                              const GenerateOptions& options) {
  if (options.max_new_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_new_tokens must be >= 0, got ", options.max_new_tokens));
  }
  Backend& backend = model.backend();
  const int64_t vocab = model.config().vocab_size;
  SequenceKv kv;
  std::vector<int32_t> output;
  ASSIGN_OR_RETURN(BufferPtr ids, backend.Alloc(DType::kI32, 1));
  auto run = [&]() -> absl::Status {
    if (options.max_new_tokens == 0) return absl::OkStatus();
    ASSIGN_OR_RETURN(const Buffer* logits, RunChunks(model, cache, kv, prompt,
                                                     options.prefill_chunk, LogitsMode::kLast,
                                                     nullptr));
    while (true) {
      SamplingParams params = options.sampling;
      params.position = kv.length;
      backend.Sample(*logits, 1, vocab, {params}, *ids);
      int32_t next = 0;
      RETURN_IF_ERROR(backend.Read(*ids, &next, sizeof(next)));
      output.push_back(next);
      if (static_cast<int64_t>(output.size()) >= options.max_new_tokens) break;
      if (std::find(options.stop_ids.begin(), options.stop_ids.end(), next) !=
          options.stop_ids.end()) {
        break;
      }
      ASSIGN_OR_RETURN(logits, RunChunks(model, cache, kv, std::span<const int32_t>(&next, 1), 1,
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
