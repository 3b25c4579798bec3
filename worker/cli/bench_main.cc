// gemma-bench: prefill and decode throughput of the CPU engine on one sequence (batch 1), on one
// rank or spread over ranks.
//   gemma-bench --model DIR [--prompt-len 128 --decode-tokens 64 --runs 5 --threads N --json]
//   gemma-bench --model DIR --tp 2                         (tensor parallel, ranks as threads)
//   gemma-bench --model DIR --mode dp-ep --ep 2            (experts over ranks, as threads)
//   gemma-bench --model DIR --world-size W --rank R --rendezvous HOST:PORT   (one process a rank)
//
// Each run prefills a seeded random prompt (BOS then random ids) as one forward step with logits
// of the last position only, then decodes --decode-tokens tokens greedily, one forward step per
// token. Prefill tokens/s = prompt length / prefill time; decode tokens/s = decode tokens / time
// of those steps. One untimed warm-up run comes first. Reports the median, min and max over runs.
//
// Over several ranks every rank runs the same deterministic loop (the prompt comes from --seed,
// and greedy decoding picks the same id on every rank), so the collectives of each step match
// without a step plan. In dp-ep mode the sequence lives on data-parallel group 0 and the other
// groups step with no tokens (the batch stays one sequence); their ranks still host experts.
// Each rank also measures:
//   weight MiB      RssAnon growth (/proc/self/status) across loading its share of the model
//                   and its KV cache; ranks as threads share a process, so there it is the
//                   process's growth over all ranks' loads divided by the ranks in the process
//   decode ms/step  median over every timed decode step
//   bytes/step      bytes this rank sent on its data communicators (tp and ep groups; the
//                   control group is not counted) per timed decode step, as counted by
//                   Communicator::traffic()
// Rank 0 gathers them over the control group and prints them (one line a rank when there are
// several), then a one-line summary; with --json one JSON line with the single-rank keys plus
// the parallel ones.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/status_macros.h"
#include "common/tool_main.h"
#include "glog/logging.h"
#include "worker/cli/cli_common.h"
#include "worker/cli/parallel_ranks.h"
#include "worker/engine/generate.h"
#include "worker/replica/load.h"

ABSL_FLAG(std::string, model, "", "Hugging Face Gemma 4 checkpoint directory");
ABSL_FLAG(int64_t, prompt_len, 128, "prompt length in tokens, BOS included");
ABSL_FLAG(int64_t, decode_tokens, 64, "tokens decoded one step at a time after the prompt");
ABSL_FLAG(int32_t, runs, 5, "timed runs (the median is reported)");
ABSL_FLAG(int32_t, threads, 0, "CPU threads per rank (0: the cores divided among the ranks)");
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
  std::vector<double> step_s;  // each decode step
  uint64_t decode_bytes = 0;   // sent on the data communicators during the decode steps
  uint64_t decode_calls = 0;   // collectives during the decode steps
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

// RssAnon of this process in bytes (anonymous resident memory: what the weights are copied into;
// the mmapped checkpoint is file-backed and not counted).
absl::StatusOr<int64_t> RssAnonBytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    absl::string_view rest = line;
    if (!absl::ConsumePrefix(&rest, "RssAnon:")) continue;
    rest = absl::StripAsciiWhitespace(rest);
    absl::ConsumeSuffix(&rest, "kB");
    int64_t kib = 0;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(rest), &kib)) break;
    return kib * 1024;
  }
  return absl::UnavailableError("no RssAnon line in /proc/self/status");
}

// The communicators that carry this rank's model traffic (each once).
std::vector<parallel::Communicator*> DataComms(const gemma4::ModelParallel& parallel) {
  std::vector<parallel::Communicator*> comms;
  if (parallel.tp_comm != nullptr) comms.push_back(parallel.tp_comm);
  if (parallel.ep_comm != nullptr && parallel.ep_comm != parallel.tp_comm) {
    comms.push_back(parallel.ep_comm);
  }
  return comms;
}

// One prefill + greedy decode of one sequence; `active` false: this rank's group holds no
// sequence and steps with no tokens (dp-ep). The sequence's pages are released afterwards.
absl::StatusOr<RunTimes> RunOnce(gemma4::Model& model, KvCache& cache,
                                 std::span<const int32_t> prompt, int64_t decode_tokens,
                                 bool active) {
  using gemma4::LogitsMode;
  using gemma4::SequenceStep;
  Backend& backend = model.backend();
  const std::vector<SamplingParams> greedy(1);  // temperature 0
  const std::vector<parallel::Communicator*> comms = DataComms(model.parallel());
  SequenceKv kv;
  RunTimes times;
  times.step_s.reserve(decode_tokens);
  auto forward = [&](std::span<const int32_t> tokens) -> absl::StatusOr<int32_t> {
    if (!active) {
      RETURN_IF_ERROR(model.Forward({}, cache).status());
      return 0;
    }
    RETURN_IF_ERROR(cache.Grow(kv, kv.length + static_cast<int64_t>(tokens.size())));
    SequenceStep step{tokens, &kv, LogitsMode::kLast};
    RETURN_IF_ERROR(model.Forward(std::span<const SequenceStep>(&step, 1), cache).status());
    cache.TrimSliding(kv);
    ASSIGN_OR_RETURN(std::vector<int32_t> next, model.Sample(greedy));
    return next[0];
  };
  auto run = [&]() -> absl::Status {
    // Prefill: the whole prompt in one step, logits of the last position.
    Clock::time_point t0 = Clock::now();
    ASSIGN_OR_RETURN(int32_t next, forward(prompt));
    Clock::time_point t1 = Clock::now();
    times.prefill_s = Seconds(t0, t1);

    // Decode: one token per step, each fed the previous step's greedy choice.
    for (parallel::Communicator* comm : comms) comm->ResetTraffic();
    Clock::time_point step_begin = Clock::now();
    for (int64_t i = 0; i < decode_tokens; ++i) {
      ASSIGN_OR_RETURN(next, forward(std::span<const int32_t>(&next, 1)));
      const Clock::time_point step_end = Clock::now();
      times.step_s.push_back(Seconds(step_begin, step_end));
      step_begin = step_end;
    }
    RETURN_IF_ERROR(backend.Synchronize());
    times.decode_s = Seconds(t1, Clock::now());
    for (parallel::Communicator* comm : comms) {
      const parallel::TrafficCounters& traffic = comm->traffic();
      times.decode_bytes += traffic.TotalBytesSent();
      for (uint64_t calls : traffic.calls) times.decode_calls += calls;
    }
    return absl::OkStatus();
  };
  absl::Status status = run();
  cache.Release(kv);
  RETURN_IF_ERROR(status);
  return times;
}

// What each rank reports to rank 0 (gathered as doubles over the control group).
struct RankReport {
  double weight_mib = 0;
  double decode_ms_per_step = 0;  // median over the timed steps
  double bytes_per_step = 0;
  double calls_per_step = 0;
  double prefill_tok_s = 0;  // medians over runs
  double decode_tok_s = 0;
};
constexpr size_t kReportFields = sizeof(RankReport) / sizeof(double);
static_assert(sizeof(RankReport) == kReportFields * sizeof(double) &&
              std::is_trivially_copyable_v<RankReport>);

absl::StatusOr<std::vector<RankReport>> GatherReports(parallel::Communicator& control,
                                                      const RankReport& mine) {
  std::vector<int64_t> send(kReportFields);
  std::memcpy(send.data(), &mine, sizeof(RankReport));
  std::vector<int64_t> recv(kReportFields * control.world_size());
  RETURN_IF_ERROR(control.AllGather(send.data(), recv.data(), kReportFields, DType::kI64));
  std::vector<RankReport> reports(control.world_size());
  std::memcpy(static_cast<void*>(reports.data()), recv.data(), recv.size() * sizeof(int64_t));
  return reports;
}

struct Settings {
  int64_t prompt_len = 0;
  int64_t decode_tokens = 0;
  int32_t runs = 0;
  int32_t threads = 0;
};

absl::Status RunRank(cli::RankEnv& env, const Settings& s) {
  parallel::Communicator& control = *env.control;
  // Weight memory: the process's RssAnon before and after every rank of the process has loaded
  // (the barriers keep the readings of thread ranks outside all loads).
  RETURN_IF_ERROR(control.Barrier());
  ASSIGN_OR_RETURN(const int64_t rss_before, RssAnonBytes());
  RETURN_IF_ERROR(control.Barrier());
  ASSIGN_OR_RETURN(
      replica::LoadedRank loaded,
      replica::LoadRank({.model_dir = absl::GetFlag(FLAGS_model),
                         .threads = s.threads,
                         .ranks_in_process = env.ranks_in_process,
                         .cache_tokens = s.prompt_len + s.decode_tokens,
                         .page_size = absl::GetFlag(FLAGS_page_size),
                         .parallel = env.parallel}));
  RETURN_IF_ERROR(control.Barrier());
  ASSIGN_OR_RETURN(const int64_t rss_after, RssAnonBytes());
  RETURN_IF_ERROR(control.Barrier());

  gemma4::Model& model = *loaded.model;
  const int64_t vocab = model.config().vocab_size;
  if (vocab <= kFirstRandomId) {
    return absl::InvalidArgumentError(absl::StrCat("vocabulary of ", vocab, " ids is too small"));
  }
  std::vector<int32_t> prompt;
  prompt.reserve(s.prompt_len);
  prompt.push_back(kBos);
  std::mt19937_64 rng(absl::GetFlag(FLAGS_seed));
  std::uniform_int_distribution<int32_t> pick(kFirstRandomId, static_cast<int32_t>(vocab - 1));
  while (static_cast<int64_t>(prompt.size()) < s.prompt_len) prompt.push_back(pick(rng));

  const bool active = env.world.mode() == parallel::ParallelMode::kTp || env.world.dp_group() == 0;
  // Warm-up: first touches of scratch, cache pages and thread pools are not timed. Every group
  // runs the sequence here: Model::Forward sizes its scratch from the step's tokens and fails on
  // a first step with none, so idle groups must have stepped with tokens once before.
  RETURN_IF_ERROR(RunOnce(model, *loaded.cache, prompt, s.decode_tokens, true).status());

  std::vector<double> prefill_tps, decode_tps, step_s;
  uint64_t bytes = 0, calls = 0;
  for (int32_t r = 0; r < s.runs; ++r) {
    ASSIGN_OR_RETURN(RunTimes t, RunOnce(model, *loaded.cache, prompt, s.decode_tokens, active));
    prefill_tps.push_back(static_cast<double>(s.prompt_len) / t.prefill_s);
    decode_tps.push_back(static_cast<double>(s.decode_tokens) / t.decode_s);
    step_s.insert(step_s.end(), t.step_s.begin(), t.step_s.end());
    bytes += t.decode_bytes;
    calls += t.decode_calls;
  }
  const Summary prefill = Summarize(prefill_tps);
  const Summary decode = Summarize(decode_tps);
  const double steps = static_cast<double>(step_s.size());

  RankReport mine;
  mine.weight_mib =
      static_cast<double>(rss_after - rss_before) / env.ranks_in_process / (1024.0 * 1024.0);
  mine.decode_ms_per_step = 1e3 * Summarize(step_s).median;
  mine.bytes_per_step = static_cast<double>(bytes) / steps;
  mine.calls_per_step = static_cast<double>(calls) / steps;
  mine.prefill_tok_s = prefill.median;
  mine.decode_tok_s = decode.median;
  ASSIGN_OR_RETURN(std::vector<RankReport> reports, GatherReports(control, mine));
  if (!env.writes_output()) return absl::OkStatus();

  const int world = env.world.world_size();
  const char* mode = parallel::ParallelModeName(env.world.mode());
  const char* ranks_as = env.is_process_rank ? "processes" : "threads";
  const int threads_per_rank =
      s.threads > 0 ? s.threads
                    : std::max(1, static_cast<int>(std::thread::hardware_concurrency()) /
                                      std::max(1, env.ranks_in_process));
  double weight_mean = 0, bytes_mean = 0;
  for (const RankReport& r : reports) {
    weight_mean += r.weight_mib / world;
    bytes_mean += r.bytes_per_step / world;
  }
  const RankReport& lead = reports[0];

  if (absl::GetFlag(FLAGS_json)) {
    std::vector<std::string> per_rank;
    for (int r = 0; r < world; ++r) {
      const RankReport& p = reports[r];
      per_rank.push_back(
          absl::StrFormat("{\"rank\": %d, \"weight_mib\": %.2f, \"decode_ms_per_step\": %.4f, "
                          "\"bytes_sent_per_step\": %.1f, \"collectives_per_step\": %.2f, "
                          "\"prefill_tok_s\": %.3f, \"decode_tok_s\": %.3f}",
                          r, p.weight_mib, p.decode_ms_per_step, p.bytes_per_step, p.calls_per_step,
                          p.prefill_tok_s, p.decode_tok_s));
    }
    std::cout << absl::StrFormat(
        "{\"engine\": \"gemma-cpu\", \"threads\": %d, \"prompt_len\": %d, \"decode_tokens\": %d, "
        "\"runs\": %d, \"prefill_tok_s\": {\"median\": %.3f, \"min\": %.3f, \"max\": %.3f}, "
        "\"decode_tok_s\": {\"median\": %.3f, \"min\": %.3f, \"max\": %.3f}, "
        "\"mode\": \"%s\", \"world_size\": %d, \"tp_size\": %d, \"ranks_as\": \"%s\", "
        "\"threads_per_rank\": %d, \"weight_mib_per_rank\": %.2f, \"decode_ms_per_step\": %.4f, "
        "\"bytes_sent_per_step_per_rank\": %.1f, \"ranks\": [%s]}\n",
        s.threads, s.prompt_len, s.decode_tokens, s.runs, prefill.median, prefill.min, prefill.max,
        decode.median, decode.min, decode.max, mode, world, env.world.tp_size(), ranks_as,
        threads_per_rank, weight_mean, lead.decode_ms_per_step, bytes_mean,
        absl::StrJoin(per_rank, ", "));
  } else {
    std::cout << absl::StrFormat(
        "prompt %d tokens, decode %d tokens, %d runs, threads %d (0: all cores)\n"
        "prefill tokens/s: median %.2f (min %.2f, max %.2f)\n"
        "decode  tokens/s: median %.2f (min %.2f, max %.2f)\n",
        s.prompt_len, s.decode_tokens, s.runs, s.threads, prefill.median, prefill.min, prefill.max,
        decode.median, decode.min, decode.max);
    if (world > 1) {
      for (int r = 0; r < world; ++r) {
        const RankReport& p = reports[r];
        std::cout << absl::StrFormat(
            "rank %d: weight %.1f MiB, decode %.3f ms/step, sent %.0f bytes/step in %.1f "
            "collectives\n",
            r, p.weight_mib, p.decode_ms_per_step, p.bytes_per_step, p.calls_per_step);
      }
    }
    std::cout << absl::StrFormat(
        "%s W=%d as %s, %d threads/rank: weight %.1f MiB/rank, decode %.3f ms/step, "
        "sent %.0f bytes/step/rank\n",
        mode, world, ranks_as, threads_per_rank, weight_mean, lead.decode_ms_per_step, bytes_mean);
  }
  std::cout << std::flush;
  return absl::OkStatus();
}

absl::Status Run() {
  Settings s;
  s.prompt_len = absl::GetFlag(FLAGS_prompt_len);
  s.decode_tokens = absl::GetFlag(FLAGS_decode_tokens);
  s.runs = absl::GetFlag(FLAGS_runs);
  s.threads = absl::GetFlag(FLAGS_threads);
  if (s.prompt_len < 1) return absl::InvalidArgumentError("--prompt-len must be >= 1");
  if (s.decode_tokens < 1) return absl::InvalidArgumentError("--decode-tokens must be >= 1");
  if (s.runs < 1) return absl::InvalidArgumentError("--runs must be >= 1");
  if (s.threads < 0) return absl::InvalidArgumentError("--threads must be >= 0 (0: all cores)");
  return cli::RunOnRanks([&](cli::RankEnv& env) { return RunRank(env, s); });
}

}  // namespace
}  // namespace gemma

int main(int argc, char** argv) {
  return gemma::ToolMain(
      argc, argv, "gemma-bench",
      "prefill and decode tokens/s of one sequence on the CPU backend, on one rank or several\n"
      "  gemma-bench --model DIR --prompt-len 128 --decode-tokens 64 --runs 5 --threads N\n"
      "  [--tp N | --mode dp-ep --ep W | --world-size W --rank R --rendezvous HOST:PORT]",
      gemma::Run);
}
