// gemma-bench: prefill and decode throughput of the CPU engine on one sequence (batch 1).
//   gemma-bench --model DIR [--prompt-len 128 --decode-tokens 64 --runs 5 --threads N --json]
//
// Each run prefills a seeded random prompt (BOS then random ids) as one forward step with logits
// of the last position only, then decodes --decode-tokens tokens greedily, one forward step per
// token. Prefill tokens/s = prompt length / prefill time; decode tokens/s = decode tokens / time
// of those steps. One untimed warm-up run comes first. Reports the median, min and max over runs.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <iostream>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "glog/logging.h"
#include "worker/cli/cli_common.h"
#include "worker/engine/generate.h"

ABSL_FLAG(std::string, model, "", "Hugging Face Gemma 4 checkpoint directory");
ABSL_FLAG(int64_t, prompt_len, 128, "prompt length in tokens, BOS included");
ABSL_FLAG(int64_t, decode_tokens, 64, "tokens decoded one step at a time after the prompt");
ABSL_FLAG(int32_t, runs, 5, "timed runs (the median is reported)");
ABSL_FLAG(int32_t, threads, 0, "CPU threads (0: all cores)");
ABSL_FLAG(uint64_t, seed, 0, "seed of the random prompt");
ABSL_FLAG(int64_t, page_size, 16, "KV-cache page size in tokens");
ABSL_FLAG(bool, json, false, "print one JSON line instead of a table");

namespace gemma {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int32_t kBos = 2;
constexpr int32_t kFirstRandomId = 5;

struct RunTimes {
  double prefill_s = 0;
  double decode_s = 0;
};

struct Summary {
  double median = 0, min = 0, max = 0;
};

Summary Summarize(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  Summary s;
  s.min = values.front();
  s.max = values.back();
  const size_t n = values.size();
  s.median = n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
  return s;
}

double Seconds(Clock::time_point begin, Clock::time_point end) {
  return std::chrono::duration<double>(end - begin).count();
}

// One prefill + greedy decode of one sequence. The sequence's pages are released afterwards.
absl::StatusOr<RunTimes> RunOnce(gemma4::Model& model, KvCache& cache,
                                 std::span<const int32_t> prompt, int64_t decode_tokens,
                                 Buffer& next_id) {
  using gemma4::LogitsMode;
  using gemma4::SequenceStep;
  Backend& backend = model.backend();
  const int64_t vocab = model.config().vocab_size;
  const std::vector<SamplingParams> greedy(1);  // temperature 0
  SequenceKv kv;
  RunTimes times;
  auto run = [&]() -> absl::Status {
    // Prefill: the whole prompt in one step, logits of the last position.
    Clock::time_point t0 = Clock::now();
    RETURN_IF_ERROR(cache.Grow(kv, kv.length + static_cast<int64_t>(prompt.size())));
    SequenceStep step{prompt, &kv, LogitsMode::kLast};
    ASSIGN_OR_RETURN(const Buffer* logits,
                     model.Forward(std::span<const SequenceStep>(&step, 1), cache));
    cache.TrimSliding(kv);
    backend.Sample(*logits, 1, vocab, greedy, next_id);
    int32_t next = 0;
    RETURN_IF_ERROR(backend.Read(next_id, &next, sizeof(next)));
    Clock::time_point t1 = Clock::now();
    times.prefill_s = Seconds(t0, t1);

    // Decode: one token per step, each fed the previous step's greedy choice.
    for (int64_t i = 0; i < decode_tokens; ++i) {
      RETURN_IF_ERROR(cache.Grow(kv, kv.length + 1));
      SequenceStep one{std::span<const int32_t>(&next, 1), &kv, LogitsMode::kLast};
      ASSIGN_OR_RETURN(logits, model.Forward(std::span<const SequenceStep>(&one, 1), cache));
      cache.TrimSliding(kv);
      backend.Sample(*logits, 1, vocab, greedy, next_id);
      RETURN_IF_ERROR(backend.Read(next_id, &next, sizeof(next)));
    }
    RETURN_IF_ERROR(backend.Synchronize());
    times.decode_s = Seconds(t1, Clock::now());
    return absl::OkStatus();
  };
  absl::Status status = run();
  cache.Release(kv);
  RETURN_IF_ERROR(status);
  return times;
}

absl::Status Run() {
  const int64_t prompt_len = absl::GetFlag(FLAGS_prompt_len);
  const int64_t decode_tokens = absl::GetFlag(FLAGS_decode_tokens);
  const int32_t runs = absl::GetFlag(FLAGS_runs);
  const int32_t threads = absl::GetFlag(FLAGS_threads);
  if (prompt_len < 1) return absl::InvalidArgumentError("--prompt-len must be >= 1");
  if (decode_tokens < 1) return absl::InvalidArgumentError("--decode-tokens must be >= 1");
  if (runs < 1) return absl::InvalidArgumentError("--runs must be >= 1");
  if (threads < 0) return absl::InvalidArgumentError("--threads must be >= 0 (0: all cores)");

  ASSIGN_OR_RETURN(cli::LoadedModel loaded,
                   cli::LoadForCli(absl::GetFlag(FLAGS_model), threads,
                                          prompt_len + decode_tokens,
                                          absl::GetFlag(FLAGS_page_size)));
  gemma4::Model& model = *loaded.model;
  const int64_t vocab = model.config().vocab_size;
  if (vocab <= kFirstRandomId) {
    return absl::InvalidArgumentError(absl::StrCat("vocabulary of ", vocab, " ids is too small"));
  }

  std::vector<int32_t> prompt;
  prompt.reserve(prompt_len);
  prompt.push_back(kBos);
  std::mt19937_64 rng(absl::GetFlag(FLAGS_seed));
  std::uniform_int_distribution<int32_t> pick(kFirstRandomId, static_cast<int32_t>(vocab - 1));
  while (static_cast<int64_t>(prompt.size()) < prompt_len) prompt.push_back(pick(rng));

  ASSIGN_OR_RETURN(BufferPtr next_id, loaded.backend->Alloc(DType::kI32, 1));
  // Warm-up: first touches of scratch, cache pages and thread pools are not timed.
  RETURN_IF_ERROR(RunOnce(model, *loaded.cache, prompt, decode_tokens, *next_id).status());

  std::vector<double> prefill_tps, decode_tps;
  for (int32_t r = 0; r < runs; ++r) {
    ASSIGN_OR_RETURN(RunTimes t, RunOnce(model, *loaded.cache, prompt, decode_tokens, *next_id));
    prefill_tps.push_back(static_cast<double>(prompt_len) / t.prefill_s);
    decode_tps.push_back(static_cast<double>(decode_tokens) / t.decode_s);
  }
  const Summary prefill = Summarize(prefill_tps);
  const Summary decode = Summarize(decode_tps);

  if (absl::GetFlag(FLAGS_json)) {
    std::cout << absl::StrFormat(
        "{\"engine\": \"gemma-cpu\", \"threads\": %d, \"prompt_len\": %d, \"decode_tokens\": %d, "
        "\"runs\": %d, \"prefill_tok_s\": {\"median\": %.3f, \"min\": %.3f, \"max\": %.3f}, "
        "\"decode_tok_s\": {\"median\": %.3f, \"min\": %.3f, \"max\": %.3f}}\n",
        threads, prompt_len, decode_tokens, runs, prefill.median, prefill.min, prefill.max,
        decode.median, decode.min, decode.max);
  } else {
    std::cout << absl::StrFormat(
        "prompt %d tokens, decode %d tokens, %d runs, threads %d (0: all cores)\n"
        "prefill tokens/s: median %.2f (min %.2f, max %.2f)\n"
        "decode  tokens/s: median %.2f (min %.2f, max %.2f)\n",
        prompt_len, decode_tokens, runs, threads, prefill.median, prefill.min, prefill.max,
        decode.median, decode.min, decode.max);
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace gemma

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "prefill and decode tokens/s of one sequence on the CPU backend\n"
      "  gemma-bench --model DIR --prompt-len 128 --decode-tokens 64 --runs 5 --threads N");
  gemma::cli::NormalizeFlagDashes(argc, argv);
  absl::ParseCommandLine(argc, argv);
  google::InitGoogleLogging(argv[0]);
  FLAGS_logtostderr = true;
  absl::Status status = gemma::Run();
  if (!status.ok()) {
    std::cerr << "gemma-bench: " << status.message() << "\n";
    return 1;
  }
  return 0;
}
