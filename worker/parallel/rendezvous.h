// Status-returning access to a gloo::rendezvous::Store (the TCP store of a tool's process ranks,
// or the coordinator's store for a worker's ranks), whose interface reports failure by throwing.
// For keys of our own: the NCCL unique id, the GPUs a replica's ranks sit on.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "gloo/rendezvous/store.h"

namespace gemma::parallel {

absl::Status StoreSet(gloo::rendezvous::Store& store, const std::string& key,
                      absl::string_view value);
// Waits up to `timeout` for `key`; DEADLINE_EXCEEDED (or the store's error) naming the key.
absl::StatusOr<std::string> StoreGet(gloo::rendezvous::Store& store, const std::string& key,
                                     std::chrono::milliseconds timeout);

}  // namespace gemma::parallel
