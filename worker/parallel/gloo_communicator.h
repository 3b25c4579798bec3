// Communicator over Gloo's TCP transport: the CPU data plane and the per-replica control group
// (step plans). Ranks rendezvous through a gloo::rendezvous::Store (normally a TcpStoreClient).
// Knows nothing of models or devices; buffers are host memory. No Gloo type leaks from here.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "worker/parallel/communicator.h"

namespace gloo::rendezvous {
class Store;
}  // namespace gloo::rendezvous

namespace gemma::parallel {

struct GlooOptions {
  int rank = 0;
  int world_size = 1;
  // Where this rank listens: an address or host name ("127.0.0.1") or, when that is empty, a
  // network interface name ("lo", "eth0"). One of the two must be set.
  std::string hostname;
  std::string interface;
  // Bound on joining the group and on every collective.
  std::chrono::milliseconds timeout = kDefaultCollectiveTimeout;
  // Namespace for this group's keys in the store, so several groups can share one store.
  std::string key_prefix = "gloo";
};

// Joins the group (a full mesh of TCP pairs) through `store`, which need only live until this
// returns. UNAVAILABLE / DEADLINE_EXCEEDED if the peers do not show up within the timeout.
//
// Gloo reports errors by throwing; every Gloo call made through the returned communicator goes
// through one wrapper that converts those exceptions to a Status (timeouts DEADLINE_EXCEEDED,
// I/O errors such as a lost peer UNAVAILABLE) and marks the communicator dead.
// AllReduce uses Gloo's ring allreduce (every rank gets identical bits, summed in ring order);
// ReduceScatter is an all-to-all plus a local rank-order sum.
absl::StatusOr<std::unique_ptr<Communicator>> CreateGlooCommunicator(
    const GlooOptions& options, gloo::rendezvous::Store& store);

}  // namespace gemma::parallel
