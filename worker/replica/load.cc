#include "worker/replica/load.h"

#include <algorithm>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "glog/logging.h"
#include "worker/backend/cpu/cpu_backend.h"
#ifdef GEMMA_HAVE_CUDA_BACKEND
#include "worker/backend/cuda/cuda_backend.h"
#include "worker/backend/cuda/cuda_staging.h"
#endif

namespace gemma::replica {

absl::StatusOr<DType> ResolveKvDType(const std::string& kv_dtype, const std::string& backend) {
  if (kv_dtype == "f32") return DType::kF32;
  if (kv_dtype == "auto") return backend == "cuda" ? DType::kBF16 : DType::kF32;
  if (kv_dtype != "bf16") {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv-dtype \"", kv_dtype, "\" is not one of auto, f32, bf16"));
  }
  if (backend != "cuda") {
    return absl::InvalidArgumentError(absl::StrCat(
        "--kv-dtype bf16 needs --backend cuda: the ", backend,
        " backend keeps its KV cache in f32 (it is the fp32 reference); use --kv-dtype auto or "
        "f32"));
  }
  return DType::kBF16;
}

absl::StatusOr<LoadedRank> LoadRank(const LoadOptions& o) {
  if (o.model_dir.empty()) return absl::InvalidArgumentError("--model DIR is required");
  if (o.page_size <= 0) return absl::InvalidArgumentError("--page-size must be positive");
  if (o.threads < 0) return absl::InvalidArgumentError("--threads must be >= 0 (0: all cores)");
  ASSIGN_OR_RETURN(const DType kv_dtype, ResolveKvDType(o.kv_dtype, o.backend));
  LoadedRank loaded;
  if (o.backend == "cuda") {
#ifdef GEMMA_HAVE_CUDA_BACKEND
    if (CudaBackend::DeviceCount() <= 0) {
      return absl::FailedPreconditionError(
          "--backend cuda: no CUDA device is visible to this process; use --backend cpu");
    }
    CudaBackendOptions cuda_options;
    // Ranks sharing this process share its device: each takes a part of the free memory.
    cuda_options.arena_fraction /= std::max(1, o.ranks_in_process);
    cuda_options.kv_dtype = kv_dtype;
    ASSIGN_OR_RETURN(std::unique_ptr<CudaBackend> cuda, CudaBackend::Create(cuda_options));
    loaded.memory = std::make_unique<CudaMemorySpace>(*cuda);
    loaded.backend = std::move(cuda);
#else
    return absl::FailedPreconditionError(
        "--backend cuda: this build has no CUDA backend (configure with the CUDA toolkit and "
        "-DGEMMA_ENABLE_CUDA=ON); use --backend cpu");
#endif
  } else if (o.backend == "cpu") {
    CHECK(kv_dtype == DType::kF32) << "ResolveKvDType gives f32 on the CPU";
    CpuBackendOptions options;
    options.num_threads = o.threads > 0
                              ? o.threads
                              : std::max(1, static_cast<int>(std::thread::hardware_concurrency()) /
                                                std::max(1, o.ranks_in_process));
    loaded.backend = std::make_unique<CpuBackend>(options);
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--backend \"", o.backend, "\" is not one of cpu, cuda"));
  }
  gemma4::ModelParallel model_parallel = o.parallel;
  if (loaded.memory != nullptr) {
    auto staged = [&](parallel::Communicator* comm) -> parallel::Communicator* {
      if (comm == nullptr) return nullptr;
      loaded.staged_comms.push_back(
          parallel::WrapWithStaging(comm, parallel::MemoryOf(*comm), loaded.memory.get()));
      return loaded.staged_comms.back().get();
    };
    model_parallel.tp_comm = staged(o.parallel.tp_comm);
    // tp and ep may be one group: wrap it once.
    model_parallel.ep_comm = o.parallel.ep_comm == o.parallel.tp_comm
                                 ? model_parallel.tp_comm
                                 : staged(o.parallel.ep_comm);
  }
  ASSIGN_OR_RETURN(loaded.model,
                   gemma4::Model::Load(o.model_dir, *loaded.backend, model_parallel));
  loaded.model->set_use_graphs(!o.enforce_eager);
  KvCacheOptions cache_options;
  cache_options.page_size = o.page_size;
  cache_options.default_tokens = o.cache_tokens + o.page_size;
  ASSIGN_OR_RETURN(loaded.cache, KvCache::Create(loaded.model->config(), *loaded.backend,
                                                 loaded.model->CacheOptions(cache_options)));
  return loaded;
}

}  // namespace gemma::replica
