// The coordinator's view of the replicas: registration (protocol version and model fingerprint
// must match the first replica's), heartbeats, health by heartbeat age, and routing to the
// healthy replica with the fewest outstanding requests. Thread-safe. Knows no engine.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "gemma/internal/v1/worker.grpc.pb.h"
#include "gemma/v1/cluster.pb.h"

namespace gemma::coordinator {

// One registered replica. Shared with the calls routed to it, so it outlives its removal.
struct Replica {
  std::string id;
  std::string address;
  std::unique_ptr<gemma::internal::v1::Replica::Stub> stub;
  std::atomic<int64_t> outstanding{0};
};

class Registry {
 public:
  using Clock = std::chrono::steady_clock;
  explicit Registry(std::chrono::milliseconds heartbeat_timeout)
      : heartbeat_timeout_(heartbeat_timeout) {}

  // The new replica's id. FAILED_PRECONDITION naming both values when the protocol version or
  // the fingerprint differs from the first registered replica's; INVALID_ARGUMENT for an empty
  // address. A worker registering again at the same address replaces its old entry.
  absl::StatusOr<std::string> Register(const gemma::internal::v1::RegisterRequest& request);
  // False when `id` is unknown (the worker should register again).
  bool Heartbeat(const gemma::internal::v1::HeartbeatRequest& request);
  // The healthy replica with the fewest outstanding requests (its count already incremented;
  // the caller decrements it when the call ends). UNAVAILABLE when none is healthy.
  absl::StatusOr<std::shared_ptr<Replica>> Pick();
  gemma::v1::GetStatusResponse Status() const;

 private:
  struct Entry {
    std::shared_ptr<Replica> replica;
    Clock::time_point last_heartbeat;
    gemma::internal::v1::HeartbeatRequest load;
  };
  bool Healthy(const Entry& entry, Clock::time_point now) const {
    return now - entry.last_heartbeat <= heartbeat_timeout_;
  }

  const std::chrono::milliseconds heartbeat_timeout_;
  mutable absl::Mutex mutex_;
  std::vector<Entry> entries_ ABSL_GUARDED_BY(mutex_);
  uint64_t next_id_ ABSL_GUARDED_BY(mutex_) = 1;
  bool have_reference_ ABSL_GUARDED_BY(mutex_) = false;
  uint32_t protocol_version_ ABSL_GUARDED_BY(mutex_) = 0;
  std::string fingerprint_ ABSL_GUARDED_BY(mutex_);
};

}  // namespace gemma::coordinator
