#include "worker/engine/generate.h"

#include <algorithm>
#include <functional>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace gemma {

using engine::StepBatch;
using engine::StepEntry;
using engine::StepExecutor;

absl::StatusOr<std::vector<float>> ReadLogits(Backend& backend, const Buffer& logits, int64_t rows,
                                              int64_t vocab) {
  std::vector<float> host(rows * vocab);
  RETURN_IF_ERROR(backend.Read(logits, host.data(), host.size() * sizeof(float)));
  return host;
}

namespace {

// The one sequence these drivers run, as the step plans name it.
constexpr uint64_t kSequenceId = 1;

// What the last step of a run produces.
struct StepOutput {
  bool all_logits = false;              // every position's logits (read from the model)
  const SamplingParams* sample = nullptr;  // or a token drawn from the last position
};

// Appends `tokens` to the sequence in steps of at most `chunk` tokens (0: one step). With
// out.all_logits every step keeps its logits and `on_step` reads them; with out.sample only
// the last step samples, and its token is returned.
absl::StatusOr<std::vector<int32_t>> RunChunks(StepExecutor& executor, KvCache& cache,
                                               SequenceKv& kv, std::span<const int32_t> tokens,
                                               int64_t chunk, StepOutput out,
                                               const std::function<absl::Status()>& on_step) {
  if (tokens.empty()) return absl::InvalidArgumentError("the prompt is empty");
  if (chunk <= 0) chunk = static_cast<int64_t>(tokens.size());
  std::vector<int32_t> sampled;
  for (size_t begin = 0; begin < tokens.size(); begin += chunk) {
    const size_t end = std::min(tokens.size(), begin + static_cast<size_t>(chunk));
    const bool last = end == tokens.size();
    RETURN_IF_ERROR(cache.Grow(kv, kv.length + static_cast<int64_t>(end - begin)));
    StepEntry entry;
    entry.sequence_id = kSequenceId;
    entry.tokens = tokens.subspan(begin, end - begin);
    entry.kv = &kv;
    entry.sample = last && out.sample != nullptr;
    entry.all_logits = out.all_logits;
    if (entry.sample) {
      entry.sampling = *out.sample;
      entry.sampling.position = kv.length + static_cast<int64_t>(entry.tokens.size());
    }
    StepBatch batch;
    batch.entries.push_back(entry);
    ASSIGN_OR_RETURN(sampled, executor.Execute(batch, cache));
    cache.TrimSliding(kv);
    if (on_step) RETURN_IF_ERROR(on_step());
  }
  return sampled;
}

}  // namespace

absl::StatusOr<std::vector<float>> PromptLogits(StepExecutor& executor, gemma4::Model& model,
                                                KvCache& cache, std::span<const int32_t> prompt,
                                                int64_t prefill_chunk) {
  SequenceKv kv;
  std::vector<float> logits;
  absl::Status status =
      RunChunks(executor, cache, kv, prompt, prefill_chunk, {.all_logits = true},
                [&]() -> absl::Status {
                  ASSIGN_OR_RETURN(std::vector<float> part, model.LogitsToHost());
                  logits.insert(logits.end(), part.begin(), part.end());
                  return absl::OkStatus();
                })
          .status();
  cache.Release(kv);
  RETURN_IF_ERROR(status);
  return logits;
}

absl::StatusOr<std::vector<float>> PromptLogits(gemma4::Model& model, KvCache& cache,
                                                std::span<const int32_t> prompt,
                                                int64_t prefill_chunk) {
  engine::SingleRankExecutor executor(&model);
  return PromptLogits(executor, model, cache, prompt, prefill_chunk);
}

absl::StatusOr<std::vector<int32_t>> Generate(StepExecutor& executor, KvCache& cache,
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
    const StepOutput sample{.sample = &options.sampling};
    ASSIGN_OR_RETURN(std::vector<int32_t> sampled,
                     RunChunks(executor, cache, kv, prompt, options.prefill_chunk, sample, {}));
    while (true) {
      const int32_t next = sampled.at(0);
      output.push_back(next);
      if (static_cast<int64_t>(output.size()) >= options.max_new_tokens) break;
      if (std::find(options.stop_ids.begin(), options.stop_ids.end(), next) !=
          options.stop_ids.end()) {
        break;
      }
      ASSIGN_OR_RETURN(sampled, RunChunks(executor, cache, kv, std::span<const int32_t>(&next, 1),
                                          1, sample, {}));
    }
    return absl::OkStatus();
  };
  absl::Status status = run();
  cache.Release(kv);
  RETURN_IF_ERROR(status);
  return output;
}

absl::StatusOr<std::vector<int32_t>> Generate(gemma4::Model& model, KvCache& cache,
                                              std::span<const int32_t> prompt,
                                              const GenerateOptions& options) {
  engine::SingleRankExecutor executor(&model);
  return Generate(executor, cache, prompt, options);
}

}  // namespace gemma
