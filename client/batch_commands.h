// gemmactl batch: submit an OpenAI batch input file, watch it, read its results, list and
// cancel batches (gemma.v1.Batches).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "grpcpp/grpcpp.h"

namespace gemma::client {

struct BatchFlags {
  bool wait = false;        // submit: follow the batch to its end with a progress bar
  bool json = false;        // print the Batch messages as JSON
  std::string output;       // results: where the output lines go ("" or "-": stdout)
  std::string errors;       // results: where the error lines go ("": OUTPUT.errors.jsonl)
  int64_t poll_ms = 500;    // --wait: how often the batch is read
  std::string model_name = "gemma-4";  // the "model" written in OpenAI output bodies
  std::string token;                   // bearer token ("" for an open coordinator)
};

// OK when `args` (after "batch") name a subcommand with its arguments; otherwise
// INVALID_ARGUMENT saying what is wrong, with the usage. Checked before connecting.
absl::Status CheckBatchArgs(const std::vector<std::string>& args);

// `args`: the words after "batch" (e.g. {"submit", "in.jsonl"}). INVALID_ARGUMENT with the
// usage for a malformed command.
absl::Status BatchCommand(const std::vector<std::string>& args,
                          const std::shared_ptr<grpc::Channel>& channel, const BatchFlags& flags);

}  // namespace gemma::client
