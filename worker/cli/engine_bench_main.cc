// gemma-engine-bench: throughput and latency of the engine loop with N concurrent requests.
//   gemma-engine-bench --model DIR [--backend cpu|cuda --concurrency 1,8,32 --prompt-len 64
//                       --decode-tokens 64 --threads N --max-step-tokens 512 --page-size 16
//                       --json]
//
// For each concurrency N: N seeded random prompts are submitted at once (greedy, end ids
// ignored so every request decodes --decode-tokens tokens) and the engine is stepped until all
// finish. An untimed warm-up run with the same N comes first. Reported: steps/s over the run,
// decode tokens/s and step time over the decode-only steps (no prefill in them), time to first
// token (submission to first token) and inter-token latency percentiles. --backend cuda runs
// the same engine on the first CUDA device (step times are wall clock: every step ends with
// the sampled ids back on the host).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "common/status_macros.h"
#include "common/tool_main.h"
#include "glog/logging.h"
#include "worker/backend/cpu/cpu_backend.h"
#include "worker/cli/cli_common.h"
#include "worker/engine/engine.h"
#include "worker/replica/load.h"

ABSL_FLAG(std::string, model, "", "Hugging Face Gemma 4 checkpoint directory");
ABSL_FLAG(std::string, backend, "cpu", "backend to run on: cpu or cuda (the first CUDA device)");
ABSL_FLAG(std::string, kv_dtype, "auto",
          "KV-cache element type: auto (bf16 on cuda, f32 on cpu), f32, or bf16 (cuda only)");
ABSL_FLAG(bool, enforce_eager, false,
          "no CUDA graphs: decode steps run their ops as called (to measure what graphs save)");
ABSL_FLAG(std::string, concurrency, "1,8,32", "comma-separated numbers of concurrent requests");
ABSL_FLAG(int64_t, prompt_len, 64, "prompt length in tokens, BOS included");
ABSL_FLAG(int64_t, decode_tokens, 64, "tokens generated per request");
ABSL_FLAG(int32_t, threads, 0, "CPU threads (0: all cores; ignored by --backend cuda)");
ABSL_FLAG(int64_t, max_step_tokens, 512, "per-step token budget of the scheduler");
ABSL_FLAG(int64_t, page_size, 16, "KV-cache page size in tokens");
ABSL_FLAG(uint64_t, seed, 0, "seed of the random prompts");
ABSL_FLAG(bool, json, false, "print one JSON line per concurrency instead of a table");
ABSL_FLAG(std::string, expert_counts, "off",
          "expert-load counting as a serving replica does it: off, on, or both (each "
          "concurrency level run with counting off and on, alternating, 3 times each; the "
          "decode step medians side by side)");

namespace gemma {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int32_t kBos = 2;
constexpr int32_t kFirstRandomId = 5;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// Nearest-rank percentile of `values` (sorted in place); 0 when empty.
double Percentile(std::vector<double>& values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  size_t rank = static_cast<size_t>(p / 100.0 * static_cast<double>(values.size()) + 0.5);
  rank = std::clamp<size_t>(rank, 1, values.size());
  return values[rank - 1];
}

struct RunResult {
  int64_t concurrency = 0;
  int64_t steps = 0;
  double wall_s = 0;
  int64_t decode_steps = 0;
  int64_t decode_step_tokens = 0;
  double decode_steps_s = 0;
  std::vector<double> decode_step_ms;
  std::vector<double> ttft_ms;
  std::vector<double> itl_ms;
  int64_t generated = 0;
  int64_t preemptions = 0;
};

absl::StatusOr<RunResult> RunOnce(gemma4::Model& model, int64_t concurrency, int64_t prompt_len,
                                  int64_t decode_tokens, uint64_t seed) {
  const int64_t page = absl::GetFlag(FLAGS_page_size);
  KvCacheOptions cache_options;
  cache_options.page_size = page;
  // Room for every request at once, so the run measures batching, not preemption: full
  // layers hold whole sequences; sliding layers a window per decode plus one prefill chunk.
  const int64_t window = model.config().sliding_window;
  const int64_t budget = absl::GetFlag(FLAGS_max_step_tokens);
  cache_options.num_pages[kFullPool] =
      concurrency * ((prompt_len + decode_tokens + page - 1) / page + 1) + 1;
  cache_options.num_pages[kSlidingPool] =
      concurrency * ((window + page - 1) / page + 2) + (window + budget + page - 1) / page + 2;
  ASSIGN_OR_RETURN(std::unique_ptr<KvCache> cache,
                   KvCache::Create(model.config(), model.backend(), cache_options));
  engine::EngineOptions options;
  options.scheduler.max_step_tokens = absl::GetFlag(FLAGS_max_step_tokens);
  options.scheduler.max_running = std::max<int64_t>(256, concurrency);
  ASSIGN_OR_RETURN(std::unique_ptr<engine::Engine> eng,
                   engine::Engine::Create(&model, cache.get(), options));

  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> pick(kFirstRandomId,
                                              static_cast<int32_t>(model.config().vocab_size - 1));
  std::vector<std::vector<Clock::time_point>> token_times(concurrency);
  std::vector<Clock::time_point> submitted(concurrency);
  const Clock::time_point start = Clock::now();
  for (int64_t r = 0; r < concurrency; ++r) {
    engine::Request request;
    request.prompt.push_back(kBos);
    while (static_cast<int64_t>(request.prompt.size()) < prompt_len) {
      request.prompt.push_back(pick(rng));
    }
    request.max_tokens = decode_tokens;
    request.ignore_end_ids = true;
    request.client_id = absl::StrCat("bench-", r);
    submitted[r] = Clock::now();
    auto* times = &token_times[r];
    RETURN_IF_ERROR(eng->Submit(std::move(request),
                                [times](const engine::RequestOutput& out) {
                                  if (!out.token_ids.empty()) times->push_back(Clock::now());
                                })
                        .status());
  }
  RunResult result;
  result.concurrency = concurrency;
  while (eng->HasWork()) {
    const Clock::time_point t0 = Clock::now();
    ASSIGN_OR_RETURN(engine::StepStats stats, eng->Step());
    const double step_s = Seconds(Clock::now() - t0);
    if (stats.num_scheduled == 0) continue;
    ++result.steps;
    if (stats.tokens_prefilled == 0) {
      ++result.decode_steps;
      result.decode_step_tokens += stats.tokens_decoded;
      result.decode_steps_s += step_s;
      result.decode_step_ms.push_back(step_s * 1e3);
    }
  }
  result.wall_s = Seconds(Clock::now() - start);
  result.preemptions = eng->counters().preemptions;
  for (int64_t r = 0; r < concurrency; ++r) {
    const auto& times = token_times[r];
    result.generated += static_cast<int64_t>(times.size());
    if (times.empty()) continue;
    result.ttft_ms.push_back(Seconds(times.front() - submitted[r]) * 1e3);
    for (size_t i = 1; i < times.size(); ++i) {
      result.itl_ms.push_back(Seconds(times[i] - times[i - 1]) * 1e3);
    }
  }
  return result;
}

// Decode step time with expert counting off and on, alternating (off, on, off, on, ...) so that
// drift in the machine's speed falls on both; the median over every decode step of each.
absl::Status CompareCounting(gemma4::Model& model, const std::vector<int64_t>& levels,
                             int64_t prompt_len, int64_t decode_tokens) {
  constexpr int kPairs = 3;
  std::cout << "| concurrent | decode step ms, counting off (p50) | on (p50) | on / off |\n"
               "|---|---|---|---|\n";
  for (int64_t n : levels) {
    RETURN_IF_ERROR(RunOnce(model, n, prompt_len, 4, absl::GetFlag(FLAGS_seed) + 1).status());
    std::vector<double> off, on;
    for (int pair = 0; pair < kPairs; ++pair) {
      for (bool count : {false, true}) {
        if (count) {
          RETURN_IF_ERROR(model.EnableExpertCounts());
        } else {
          model.DisableExpertCounts();
        }
        ASSIGN_OR_RETURN(RunResult r,
                         RunOnce(model, n, prompt_len, decode_tokens, absl::GetFlag(FLAGS_seed)));
        auto& into = count ? on : off;
        into.insert(into.end(), r.decode_step_ms.begin(), r.decode_step_ms.end());
      }
    }
    model.DisableExpertCounts();
    const double off50 = Percentile(off, 50), on50 = Percentile(on, 50);
    std::cout << absl::StrFormat("| %d | %.3f | %.3f | %.4f |\n", n, off50, on50,
                                 off50 > 0 ? on50 / off50 : 0.0);
  }
  return absl::OkStatus();
}

absl::Status Run() {
  const int64_t prompt_len = absl::GetFlag(FLAGS_prompt_len);
  const int64_t decode_tokens = absl::GetFlag(FLAGS_decode_tokens);
  const int32_t threads = absl::GetFlag(FLAGS_threads);
  if (prompt_len < 1) return absl::InvalidArgumentError("--prompt-len must be >= 1");
  if (decode_tokens < 2) return absl::InvalidArgumentError("--decode-tokens must be >= 2");
  if (threads < 0) return absl::InvalidArgumentError("--threads must be >= 0 (0: all cores)");
  std::vector<int64_t> levels;
  for (absl::string_view item : absl::StrSplit(absl::GetFlag(FLAGS_concurrency), ',')) {
    int64_t n = 0;
    if (!absl::SimpleAtoi(item, &n) || n < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("--concurrency: '", item, "' is not a positive integer"));
    }
    levels.push_back(n);
  }
  const std::string backend = absl::GetFlag(FLAGS_backend);
  ASSIGN_OR_RETURN(replica::LoadedRank loaded,
                   replica::LoadRank({.model_dir = absl::GetFlag(FLAGS_model),
                                      .backend = backend,
                                      .threads = threads,
                                      .cache_tokens = prompt_len + decode_tokens,
                                      .page_size = absl::GetFlag(FLAGS_page_size),
                                      .kv_dtype = absl::GetFlag(FLAGS_kv_dtype),
                                      .enforce_eager = absl::GetFlag(FLAGS_enforce_eager)}));
  gemma4::Model& model = *loaded.model;
  if (model.config().vocab_size <= kFirstRandomId) {
    return absl::InvalidArgumentError("the vocabulary is too small for random prompts");
  }
  const std::string counting = absl::GetFlag(FLAGS_expert_counts);
  if (counting != "off" && counting != "on" && counting != "both") {
    return absl::InvalidArgumentError(
        absl::StrCat("--expert-counts must be off, on or both, got \"", counting, "\""));
  }
  if (counting == "both") return CompareCounting(model, levels, prompt_len, decode_tokens);
  if (counting == "on") RETURN_IF_ERROR(model.EnableExpertCounts());
  const bool json = absl::GetFlag(FLAGS_json);
  if (!json) {
    std::cout << absl::StrFormat(
        "backend %s, prompt %d tokens, %d generated per request, threads %d (0: all cores), "
        "step budget %d\n"
        "| concurrent | steps/s | decode tok/s | decode step ms (p50/p90) | TTFT ms (p50/p90/p99) "
        "| ITL ms (p50/p90/p99) | preemptions |\n|---|---|---|---|---|---|---|\n",
        backend, prompt_len, decode_tokens, threads, absl::GetFlag(FLAGS_max_step_tokens));
  }
  for (int64_t n : levels) {
    // Warm-up: scratch buffers and thread pools sized for this batch, untimed.
    RETURN_IF_ERROR(RunOnce(model, n, prompt_len, 4, absl::GetFlag(FLAGS_seed) + 1).status());
    ASSIGN_OR_RETURN(RunResult r,
                     RunOnce(model, n, prompt_len, decode_tokens, absl::GetFlag(FLAGS_seed)));
    const double steps_per_s = static_cast<double>(r.steps) / r.wall_s;
    const double decode_tps =
        r.decode_steps_s > 0 ? static_cast<double>(r.decode_step_tokens) / r.decode_steps_s : 0;
    const double step50 = Percentile(r.decode_step_ms, 50),
                 step90 = Percentile(r.decode_step_ms, 90);
    const double ttft50 = Percentile(r.ttft_ms, 50), ttft90 = Percentile(r.ttft_ms, 90),
                 ttft99 = Percentile(r.ttft_ms, 99);
    const double itl50 = Percentile(r.itl_ms, 50), itl90 = Percentile(r.itl_ms, 90),
                 itl99 = Percentile(r.itl_ms, 99);
    if (json) {
      std::cout << absl::StrFormat(
          "{\"backend\": \"%s\", \"concurrency\": %d, \"prompt_len\": %d, "
          "\"decode_tokens\": %d, \"threads\": %d, \"steps\": %d, \"wall_s\": %.4f, "
          "\"steps_per_s\": %.3f, \"decode_tok_s\": %.3f, "
          "\"decode_step_ms\": {\"p50\": %.3f, \"p90\": %.3f}, "
          "\"ttft_ms\": {\"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f}, "
          "\"itl_ms\": {\"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f}, \"generated\": %d, "
          "\"preemptions\": %d}\n",
          backend, n, prompt_len, decode_tokens, threads, r.steps, r.wall_s, steps_per_s,
          decode_tps, step50, step90, ttft50, ttft90, ttft99, itl50, itl90, itl99, r.generated,
          r.preemptions);
    } else {
      std::cout << absl::StrFormat(
          "| %d | %.2f | %.1f | %.2f / %.2f | %.1f / %.1f / %.1f | %.2f / %.2f / %.2f | %d |\n", n,
          steps_per_s, decode_tps, step50, step90, ttft50, ttft90, ttft99, itl50, itl90, itl99,
          r.preemptions);
    }
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace gemma

int main(int argc, char** argv) {
  return gemma::ToolMain(
      argc, argv, "gemma-engine-bench",
      "decode tokens/s, step time, TTFT and inter-token latency of the engine loop\n"
      "  gemma-engine-bench --model DIR [--backend cpu|cuda] --concurrency 1,8,32 --prompt-len 64 "
      "--decode-tokens 64",
      gemma::Run);
}
