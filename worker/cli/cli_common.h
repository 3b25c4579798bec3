// Helpers shared by the command-line tools: parsing token lists and building the CPU backend,
// model and cache from flags. Errors are Statuses the tools print before exiting non-zero.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "worker/backend/backend.h"
#include "worker/engine/kv_cache.h"
#include "worker/model/gemma4/model.h"
#include "worker/parallel/staging_communicator.h"

namespace gemma::cli {


// The main() of a tool: sets the usage text, parses the flags (dashes allowed), sends logs to
// stderr, runs `run`, and on error prints "NAME: message" and returns 1.
int ToolMain(int argc, char** argv, const char* name, const char* usage,
             const std::function<absl::Status()>& run);

// "2,17,301" -> {2, 17, 301}. INVALID_ARGUMENT naming the bad item.
absl::StatusOr<std::vector<int32_t>> ParseTokenList(absl::string_view text);

struct LoadedModel {
  std::unique_ptr<Backend> backend;
  // On a GPU backend, the device memory seen by the staging communicators below (declared after
  // the backend and before the model, so they outlive the model and die before the backend).
  std::unique_ptr<parallel::MemorySpace> memory;
  std::vector<std::unique_ptr<parallel::Communicator>> staged_comms;
  std::unique_ptr<gemma4::Model> model;
  std::unique_ptr<KvCache> cache;
};

// Loads this rank's share of `model_dir` with a cache able to hold `max_tokens` positions, on
// `backend`: "cpu" (threads 0: the machine's cores divided among `ranks_in_process`) or "cuda"
// (the first visible device; FAILED_PRECONDITION without one or in a build without CUDA). On
// "cuda", the communicators of `parallel` are wrapped so that each buffer reaches them in the
// memory they read (device buffers staged through the host for Gloo and the in-process group,
// host buffers through the device for NCCL).
absl::StatusOr<LoadedModel> LoadForCli(const std::string& model_dir, int threads,
                                       int64_t max_tokens, int64_t page_size,
                                       const gemma4::ModelParallel& parallel = {},
                                       int ranks_in_process = 1,
                                       const std::string& backend = "cpu");

}  // namespace gemma::cli
