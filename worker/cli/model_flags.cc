#include "worker/cli/model_flags.h"

#include <algorithm>
#include <string>

#include "absl/flags/flag.h"

ABSL_FLAG(std::string, model, "", "Hugging Face Gemma 4 checkpoint directory");
ABSL_FLAG(std::string, backend, "cpu", "cpu or cuda (every rank of this process on device 0)");
ABSL_FLAG(int32_t, threads, 0, "CPU threads per rank (0: the cores divided among the ranks)");
ABSL_FLAG(int64_t, page_size, 16, "KV-cache page size in tokens");
ABSL_FLAG(int64_t, cache_tokens, 4096,
          "KV-cache capacity in positions (raised to what the prompt and generation need)");
ABSL_FLAG(int64_t, prefill_chunk, 0, "tokens per prefill step (0: all in one step)");

namespace gemma::cli {

replica::LoadOptions RankLoadOptions(const RankEnv& env, int64_t min_cache_tokens) {
  return {.model_dir = absl::GetFlag(FLAGS_model),
          .backend = absl::GetFlag(FLAGS_backend),
          .threads = absl::GetFlag(FLAGS_threads),
          .ranks_in_process = env.ranks_in_process,
          .cache_tokens = std::max(absl::GetFlag(FLAGS_cache_tokens), min_cache_tokens),
          .page_size = absl::GetFlag(FLAGS_page_size),
          .parallel = env.parallel};
}

}  // namespace gemma::cli
