// The coordinator's side of one gemma.v1.Inference.Generate call: checks it, admits it, relays
// it to a replica (gemma.internal.v1.Replica.Generate) and the replica's stream back to the
// client, and moves it to another replica when the first fails.
//
// Failover: when the replica's call ends as a replica failure (see IsReplicaFailure) before a
// final response was relayed, and the client is still there, the replica is marked failed in
// the registry, and the request is sent to another healthy replica (never one that failed it
// already) with its prompt as token ids (from the first response of the failed call) and the
// ids already relayed as resume_token_ids, so the client's stream goes on without an error or a
// repeated or missing token. Before the first send the coordinator resolves max_tokens 0 and
// gives sampled requests without a seed a random one, so the replica that takes over samples
// what the failed one would have. At most `max_attempts` sends; when no healthy replica is left
// it waits up to `requeue_wait` for one (a worker that restarts registers again) before
// failing with UNAVAILABLE saying what happened.
#pragma once

#include <chrono>

#include "coordinator/registry.h"
#include "coordinator/metrics.h"
#include "coordinator/timer.h"
#include "gemma/v1/inference.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace gemma::coordinator {

struct ProxyOptions {
  int max_attempts = 3;                          // sends of one request, the first included
  std::chrono::milliseconds requeue_wait{3000};  // wait for a healthy replica after a failure
  std::chrono::milliseconds poll_interval{50};   // how often the wait looks at the registry
  // A request that finds every replica of its model full (or none up) waits this long for
  // one to take it (bounded by its own deadline) before it is refused; 0: refused at once.
  std::chrono::milliseconds queue_wait{0};
  // Requests waiting so at most; past it, refused at once.
  int64_t max_queued = 1024;
  // A replica call that ends CANCELLED is the replica's doing only if the client's call is not
  // cancelled this long after.
  std::chrono::milliseconds cancel_grace{200};
  // A replica's call that streams nothing for this long (from its start, or since its last
  // message) counts as a failure of the replica: the request moves on. 0: no watchdog.
  std::chrono::milliseconds stall_timeout{60000};
  // Where the streams' timings and finishes are counted (not owned; null: nowhere).
  Metrics* metrics = nullptr;
};

// Whether a replica call that ended with `status` means the replica failed (its process, its
// connection or its engine) rather than the request: UNAVAILABLE, INTERNAL and UNKNOWN (a broken
// transport), OK without a final response, and CANCELLED when the client did not cancel (the
// proxy waits ProxyOptions::cancel_grace before it believes that: a client's cancellation can
// end the replica's call before the proxy hears of it).
// Never INVALID_ARGUMENT, RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED: those are the request's.
bool IsReplicaFailure(const grpc::Status& status, bool final_relayed, bool client_cancelled);

// Serves one Generate call; the reactor deletes itself when both sides are done. `registry`
// and `timer` must outlive it.
grpc::ServerWriteReactor<gemma::v1::GenerateResponse>* StartGenerateProxy(
    grpc::CallbackServerContext* context, const gemma::v1::GenerateRequest& request,
    Registry* registry, Timer* timer, const ProxyOptions& options);

}  // namespace gemma::coordinator
