// gemma-forward: the float32 logits of every position of a token sequence, as a .npy file
// [num_tokens, vocab_size].
//   gemma-forward --model DIR --tokens 2,17,301 --logits-out logits.npy
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "common/npy.h"
#include "common/status_macros.h"
#include "glog/logging.h"
#include "worker/cli/cli_common.h"
#include "worker/engine/generate.h"

ABSL_FLAG(std::string, model, "", "Hugging Face Gemma 4 checkpoint directory");
ABSL_FLAG(std::string, tokens, "", "comma-separated token ids, e.g. 2,17,301");
ABSL_FLAG(std::string, logits_out, "", "output .npy file for the logits");
ABSL_FLAG(int32_t, threads, 0, "CPU threads (0: all cores)");
ABSL_FLAG(int64_t, prefill_chunk, 0, "tokens per prefill step (0: all in one step)");
ABSL_FLAG(int64_t, page_size, 16, "KV-cache page size in tokens");

namespace {

absl::Status Run() {
  if (absl::GetFlag(FLAGS_logits_out).empty()) {
    return absl::InvalidArgumentError("--logits-out FILE.npy is required");
  }
  ASSIGN_OR_RETURN(std::vector<int32_t> tokens, gemma::cli::ParseTokenList(absl::GetFlag(FLAGS_tokens)));
  ASSIGN_OR_RETURN(gemma::cli::LoadedModel loaded,
                   gemma::cli::LoadForCli(absl::GetFlag(FLAGS_model), absl::GetFlag(FLAGS_threads),
                                          static_cast<int64_t>(tokens.size()),
                                          absl::GetFlag(FLAGS_page_size)));
  ASSIGN_OR_RETURN(std::vector<float> logits,
                   gemma::PromptLogits(*loaded.model, *loaded.cache, tokens,
                                       absl::GetFlag(FLAGS_prefill_chunk)));
  const int64_t vocab = loaded.model->config().vocab_size;
  return gemma::WriteNpy(absl::GetFlag(FLAGS_logits_out), gemma::DType::kF32,
                         {static_cast<int64_t>(tokens.size()), vocab}, logits.data());
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "writes the float32 logits of every position as .npy [num_tokens, vocab_size]\n"
      "  gemma-forward --model DIR --tokens 2,17,301 --logits-out FILE.npy");
  gemma::cli::NormalizeFlagDashes(argc, argv);
  absl::ParseCommandLine(argc, argv);
  google::InitGoogleLogging(argv[0]);
  FLAGS_logtostderr = true;
  absl::Status status = Run();
  if (!status.ok()) {
    std::cerr << "gemma-forward: " << status.message() << "\n";
    return 1;
  }
  return 0;
}
