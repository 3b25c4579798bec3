// gemma-forward: the float32 logits of every position of a token sequence, as a .npy file
// [num_tokens, vocab_size].
//   gemma-forward --model DIR --tokens 2,17,301 --logits-out logits.npy [--backend cpu|cuda]
// Spread over ranks as threads (--tp N, or --mode dp-ep --ep W [--tp T]) or as processes
// (--world-size W --rank R --rendezvous HOST:PORT, one process per rank; rank 0 writes).
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "common/npy.h"
#include "common/status_macros.h"
#include "common/tool_main.h"
#include "glog/logging.h"
#include "worker/cli/cli_common.h"
#include "worker/cli/model_flags.h"
#include "worker/cli/parallel_ranks.h"
#include "worker/cli/rank_driver.h"
#include "worker/replica/load.h"

ABSL_FLAG(std::string, tokens, "",
          "comma-separated token ids, e.g. 2,17,301 (ranks other than 0 of a multi-process run "
          "take them from rank 0)");
ABSL_FLAG(std::string, logits_out, "", "output .npy file for the logits (written by rank 0)");

namespace {

absl::Status Run() {
  std::vector<int32_t> tokens;
  if (!absl::GetFlag(FLAGS_tokens).empty() || absl::GetFlag(FLAGS_rank) <= 0) {
    ASSIGN_OR_RETURN(tokens, gemma::cli::ParseTokenList(absl::GetFlag(FLAGS_tokens)));
  }
  const bool leader = absl::GetFlag(FLAGS_rank) <= 0;
  if (leader && absl::GetFlag(FLAGS_logits_out).empty()) {
    return absl::InvalidArgumentError("--logits-out FILE.npy is required");
  }
  const int64_t min_cache = static_cast<int64_t>(tokens.size());
  return gemma::cli::RunOnRanks([&](gemma::cli::RankEnv& env) -> absl::Status {
    ASSIGN_OR_RETURN(gemma::replica::LoadOptions load, gemma::cli::RankLoadOptions(env, min_cache));
    ASSIGN_OR_RETURN(gemma::replica::LoadedRank loaded, gemma::replica::LoadRank(load));
    ASSIGN_OR_RETURN(std::vector<float> logits,
                     gemma::cli::RankPromptLogits(env, *loaded.model, *loaded.cache, tokens,
                                                  absl::GetFlag(FLAGS_prefill_chunk)));
    if (!env.writes_output()) return absl::OkStatus();
    const int64_t vocab = loaded.model->config().vocab_size;
    return gemma::WriteNpy(absl::GetFlag(FLAGS_logits_out), gemma::DType::kF32,
                           {static_cast<int64_t>(logits.size()) / vocab, vocab}, logits.data());
  }, absl::GetFlag(FLAGS_backend));
}

}  // namespace

int main(int argc, char** argv) {
  return gemma::ToolMain(
      argc, argv, "gemma-forward",
      "writes the float32 logits of every position as .npy [num_tokens, vocab_size]\n"
      "  gemma-forward --model DIR --tokens 2,17,301 --logits-out FILE.npy",
      Run);
}
