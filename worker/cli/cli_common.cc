#include "worker/cli/cli_common.h"

#include <algorithm>
#include <iostream>
#include <thread>

#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/flag_dashes.h"
#include "common/status_macros.h"
#include "glog/logging.h"
#include "worker/backend/cpu/cpu_backend.h"
#ifdef GEMMA_HAVE_CUDA_BACKEND
#include "worker/backend/cuda/cuda_backend.h"
#include "worker/backend/cuda/cuda_staging.h"
#endif

namespace gemma::cli {

int ToolMain(int argc, char** argv, const char* name, const char* usage,
             const std::function<absl::Status()>& run) {
  absl::SetProgramUsageMessage(usage);
  gemma::NormalizeFlagDashes(argc, argv);
  absl::ParseCommandLine(argc, argv);
  google::InitGoogleLogging(argv[0]);
  // A crash (SIGSEGV, SIGABRT, ...) prints its stack to the log before the process dies.
  google::InstallFailureSignalHandler();
  FLAGS_logtostderr = true;
  absl::Status status = run();
  if (!status.ok()) {
    std::cerr << name << ": " << status.message() << "\n";
    return 1;
  }
  return 0;
}

absl::StatusOr<std::vector<int32_t>> ParseTokenList(absl::string_view text) {
  std::vector<int32_t> ids;
  if (absl::StripAsciiWhitespace(text).empty()) {
    return absl::InvalidArgumentError("--tokens is empty; give comma-separated ids, e.g. 2,17,301");
  }
  int index = 0;
  for (absl::string_view item : absl::StrSplit(text, ',')) {
    item = absl::StripAsciiWhitespace(item);
    int32_t id = 0;
    if (!absl::SimpleAtoi(item, &id) || id < 0) {
      return absl::InvalidArgumentError(absl::StrCat("--tokens item ", index, " (\"", item,
                                                     "\") is not a non-negative integer id"));
    }
    ids.push_back(id);
    ++index;
  }
  return ids;
}

absl::StatusOr<LoadedModel> LoadForCli(const std::string& model_dir, int threads,
                                       int64_t max_tokens, int64_t page_size,
                                       const gemma4::ModelParallel& parallel,
                                       int ranks_in_process, const std::string& backend) {
  if (model_dir.empty()) return absl::InvalidArgumentError("--model DIR is required");
  if (page_size <= 0) return absl::InvalidArgumentError("--page-size must be positive");
  if (threads < 0) return absl::InvalidArgumentError("--threads must be >= 0 (0: all cores)");
  LoadedModel loaded;
  if (backend == "cuda") {
#ifdef GEMMA_HAVE_CUDA_BACKEND
    if (CudaBackend::DeviceCount() <= 0) {
      return absl::FailedPreconditionError(
          "--backend cuda: no CUDA device is visible to this process; use --backend cpu");
    }
    CudaBackendOptions cuda_options;
    // Ranks sharing this process share its device: each takes a part of the free memory.
    cuda_options.arena_fraction /= std::max(1, ranks_in_process);
    ASSIGN_OR_RETURN(std::unique_ptr<CudaBackend> cuda, CudaBackend::Create(cuda_options));
    loaded.memory = std::make_unique<CudaMemorySpace>(*cuda);
    loaded.backend = std::move(cuda);
#else
    return absl::FailedPreconditionError(
        "--backend cuda: this build has no CUDA backend (configure with the CUDA toolkit and "
        "-DGEMMA_ENABLE_CUDA=ON); use --backend cpu");
#endif
  } else if (backend == "cpu") {
    CpuBackendOptions options;
    options.num_threads = threads > 0
                              ? threads
                              : std::max(1, static_cast<int>(std::thread::hardware_concurrency()) /
                                                std::max(1, ranks_in_process));
    loaded.backend = std::make_unique<CpuBackend>(options);
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--backend \"", backend, "\" is not one of cpu, cuda"));
  }
  gemma4::ModelParallel model_parallel = parallel;
  if (loaded.memory != nullptr) {
    auto staged = [&](parallel::Communicator* comm) -> parallel::Communicator* {
      if (comm == nullptr) return nullptr;
      loaded.staged_comms.push_back(
          parallel::WrapWithStaging(comm, parallel::MemoryOf(*comm), loaded.memory.get()));
      return loaded.staged_comms.back().get();
    };
    model_parallel.tp_comm = staged(parallel.tp_comm);
    // tp and ep may be one group: wrap it once.
    model_parallel.ep_comm = parallel.ep_comm == parallel.tp_comm ? model_parallel.tp_comm
                                                                   : staged(parallel.ep_comm);
  }
  ASSIGN_OR_RETURN(loaded.model,
                   gemma4::Model::Load(model_dir, *loaded.backend, model_parallel));
  KvCacheOptions cache_options;
  cache_options.page_size = page_size;
  cache_options.default_tokens = max_tokens + page_size;
  ASSIGN_OR_RETURN(loaded.cache, KvCache::Create(loaded.model->config(), *loaded.backend,
                                                 loaded.model->CacheOptions(cache_options)));
  return loaded;
}

}  // namespace gemma::cli
