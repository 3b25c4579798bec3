// gemma-generate: generates token ids after a prompt and prints them on one line.
//   gemma-generate --model DIR --tokens 2,17,301 --max-new-tokens 32 [--temperature T
//                  --top-k K --top-p P --seed S] [--backend cpu|cuda] [--tp N ...]
#include <algorithm>
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "common/tool_main.h"
#include "glog/logging.h"
#include "worker/cli/cli_common.h"
#include "worker/cli/model_flags.h"
#include "worker/cli/parallel_ranks.h"
#include "worker/cli/rank_driver.h"
#include "worker/engine/generate.h"
#include "worker/replica/load.h"

ABSL_FLAG(std::string, tokens, "", "comma-separated prompt token ids, e.g. 2,17,301");
ABSL_FLAG(int64_t, max_new_tokens, 32, "tokens to generate");
ABSL_FLAG(double, temperature, 0.0, "sampling temperature; 0 = greedy");
ABSL_FLAG(int32_t, top_k, 0, "keep the k most likely tokens (0 = all)");
ABSL_FLAG(double, top_p, 1.0, "nucleus probability in (0, 1]");
ABSL_FLAG(uint64_t, seed, 0, "sampling seed");
ABSL_FLAG(bool, stop_at_eos, false, "stop after an end-of-sequence id of config.json");

namespace {

absl::Status Run() {
  const double temperature = absl::GetFlag(FLAGS_temperature);
  const double top_p = absl::GetFlag(FLAGS_top_p);
  const int64_t max_new = absl::GetFlag(FLAGS_max_new_tokens);
  if (temperature < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--temperature must be >= 0, got ", temperature));
  }
  if (!(top_p > 0 && top_p <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("--top-p must be in (0, 1], got ", top_p));
  }
  if (absl::GetFlag(FLAGS_top_k) < 0) {
    return absl::InvalidArgumentError("--top-k must be >= 0 (0 keeps every token)");
  }
  if (max_new < 0) return absl::InvalidArgumentError("--max-new-tokens must be >= 0");
  std::vector<int32_t> tokens;
  if (!absl::GetFlag(FLAGS_tokens).empty() || absl::GetFlag(FLAGS_rank) <= 0) {
    ASSIGN_OR_RETURN(tokens, gemma::cli::ParseTokenList(absl::GetFlag(FLAGS_tokens)));
  }
  const int64_t min_cache = static_cast<int64_t>(tokens.size()) + max_new;
  gemma::GenerateOptions options;
  options.max_new_tokens = max_new;
  options.prefill_chunk = absl::GetFlag(FLAGS_prefill_chunk);
  options.sampling.temperature = static_cast<float>(temperature);
  options.sampling.top_k = absl::GetFlag(FLAGS_top_k);
  options.sampling.top_p = static_cast<float>(top_p);
  options.sampling.seed = absl::GetFlag(FLAGS_seed);
  return gemma::cli::RunOnRanks([&](gemma::cli::RankEnv& env) -> absl::Status {
    ASSIGN_OR_RETURN(gemma::replica::LoadOptions load, gemma::cli::RankLoadOptions(env, min_cache));
    ASSIGN_OR_RETURN(gemma::replica::LoadedRank loaded, gemma::replica::LoadRank(load));
    gemma::GenerateOptions rank_options = options;
    if (absl::GetFlag(FLAGS_stop_at_eos)) {
      for (int64_t id : loaded.model->config().eos_token_ids) {
        rank_options.stop_ids.push_back(static_cast<int32_t>(id));
      }
    }
    ASSIGN_OR_RETURN(
        std::vector<int32_t> output,
        gemma::cli::RankGenerate(env, *loaded.model, *loaded.cache, tokens, rank_options));
    if (env.writes_output()) std::cout << absl::StrJoin(output, " ") << "\n" << std::flush;
    return absl::OkStatus();
  }, absl::GetFlag(FLAGS_backend));
}

}  // namespace

int main(int argc, char** argv) {
  return gemma::ToolMain(argc, argv, "gemma-generate",
                              "generates token ids after a prompt and prints them space separated\n"
                              "  gemma-generate --model DIR --tokens 2,17,301 --max-new-tokens 32",
                              Run);
}
