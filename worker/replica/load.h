// Bringing a rank's share of a checkpoint up: its backend (CPU threads or a CUDA device), its
// communicators wrapped for the memory the backend computes in, its model shard and its KV
// cache. main()s fill LoadOptions from their flags.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/backend/backend.h"
#include "worker/model/gemma4/kv_cache.h"
#include "worker/model/gemma4/model.h"
#include "worker/parallel/communicator.h"
#include "worker/parallel/staging_communicator.h"

namespace gemma::replica {

struct LoadOptions {
  std::string model_dir = {};
  // "cpu" or "cuda" (the first visible device; FAILED_PRECONDITION without one or in a build
  // without CUDA).
  std::string backend = "cpu";
  // CPU threads; 0: the machine's cores divided among `ranks_in_process`.
  int threads = 0;
  // Ranks sharing this process (threads), which share its cores or its device.
  int ranks_in_process = 1;
  // Positions the KV cache must hold, and its page size.
  int64_t cache_tokens = 4096;
  int64_t page_size = 16;
  // The KV cache's element type, as the tools' --kv-dtype spells it: "auto" (bf16 on "cuda",
  // f32 on "cpu"), "f32", or "bf16" ("cuda" only: the CPU backend is the fp32 reference).
  std::string kv_dtype = "auto";
  // --enforce-eager: every step runs its ops as called, with no step graphs (on "cuda" decode
  // steps are otherwise recorded as CUDA graphs, NCCL sums included; see Model).
  bool enforce_eager = false;
  // The rank's communicators and layout. On "cuda" they are wrapped so that each buffer
  // reaches them in the memory they read (device buffers staged through the host for Gloo and
  // the in-process group, host buffers through the device for NCCL).
  gemma4::ModelParallel parallel = {};
};

struct LoadedRank {
  std::unique_ptr<Backend> backend;
  // On a GPU backend, the device memory seen by the staging communicators below (declared after
  // the backend and before the model, so they outlive the model and die before the backend).
  std::unique_ptr<parallel::MemorySpace> memory;
  std::vector<std::unique_ptr<parallel::Communicator>> staged_comms;
  std::unique_ptr<gemma4::Model> model;
  std::unique_ptr<KvCache> cache;
};

// The help of the --kv-dtype and --enforce-eager flags, which the tools and gemma-worker share.
inline constexpr char kKvDtypeFlagHelp[] =
    "KV-cache element type: auto (bf16 on cuda, f32 on cpu), f32, or bf16 (cuda only; the CPU "
    "backend is the fp32 reference)";
inline constexpr char kEnforceEagerFlagHelp[] =
    "run every step's ops as called: no CUDA graphs (--backend cuda records decode steps, NCCL "
    "sums of tensor-parallel ranks included, and replays them)";

// The KV-cache element type that `kv_dtype` (a --kv-dtype value) gives on `backend`.
// INVALID_ARGUMENT naming the flag for a value other than auto, f32 and bf16, and for bf16 on
// any backend but "cuda".
absl::StatusOr<DType> ResolveKvDType(const std::string& kv_dtype, const std::string& backend);

// INVALID_ARGUMENT for options out of range (naming the flag the tools spell them with).
absl::StatusOr<LoadedRank> LoadRank(const LoadOptions& options);

}  // namespace gemma::replica
