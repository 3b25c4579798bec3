// The coordinator's view of the replicas: registration (protocol version and model fingerprint
// must match the first replica's), heartbeats, health, admission and routing to the healthy
// replica with the fewest outstanding requests, and the cluster's counters. Thread-safe. Knows
// no engine.
//
// Health: a replica is healthy while its heartbeats are fresh (younger than the heartbeat
// timeout) and no request has failed on it since it registered. A failed replica gets no
// requests; its heartbeats are answered `known = false`, so a worker that is still alive
// registers again (a new entry, healthy), and one that died stays out. A worker restarted at
// the same address replaces its old entry when it registers.
#pragma once

#include <atomic>
#include <chrono>
#include <deque>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "coordinator/model_spec.h"
#include "gemma/internal/v1/worker.grpc.pb.h"
#include "grpcpp/security/credentials.h"
#include "gemma/v1/cluster.pb.h"

namespace gemma::coordinator {

// One registered replica. Shared with the calls routed to it, so it outlives its removal.
struct Replica {
  std::string id;
  std::string address;
  std::unique_ptr<gemma::internal::v1::Replica::Stub> stub;
  // From its registration; 0 or empty: not sent (an older worker).
  int32_t vocab_size = 0;
  int64_t max_context = 0;
  int32_t world_size = 0;
  std::string parallel;
  // Entries of one replica (its dp-ep groups) share it; empty: the entry is the replica.
  std::string placement_group;
  std::string model;  // its served name
  std::string name;   // its worker's --replica NAME, for operators ("" when none)
  std::atomic<int64_t> outstanding{0};
};

// A replica's experts for the balancer (rebalancer.h): the entries that share one placement,
// the placement in use, and the load of their latest windows counted under it.
struct BalanceGroup {
  std::string key;                       // placement_group, or the entry's id
  std::vector<std::string> replica_ids;  // healthy entries, registration order
  gemma::v1::ExpertPlacement placement;  // from the freshest heartbeat
  std::vector<int64_t> load;             // [layers * experts], summed over `windows` windows
  int64_t windows = 0;                   // windows summed (each entry's latest, same epoch)
  bool offer_pending = false;            // an offered placement not yet in use
  // The latest placement switch, if any, and when the latest offer was made.
  std::optional<gemma::v1::RebalanceRecord> last;
  std::chrono::steady_clock::time_point last_offer{};
};

// What requests must fit, over the healthy replicas (the smallest of those that sent them).
struct ModelLimits {
  int32_t vocab_size = 0;   // 0: unknown, not checked
  int64_t max_context = 0;  // 0: unknown, not checked
};

struct RegistryOptions {
  using Clock = std::chrono::steady_clock;
  std::chrono::milliseconds heartbeat_timeout{3000};
  // A replica without a heartbeat for this long is dropped from the registry (and from
  // GetStatus); its worker, if it comes back, registers again. 0: never.
  std::chrono::milliseconds forget_after{60000};
  // Admission: requests in flight on one replica before new requests are refused.
  int64_t max_outstanding_per_replica = 256;
  // The clock (tests pass a fake one); null: steady_clock.
  std::function<Clock::time_point()> now;
  // Expert-load windows kept per replica (the latest; totals are kept whole).
  int expert_windows_kept = 60;
  // The models served (--models): replicas register under these names only, and free workers
  // are assigned from them. Empty: any name; a worker that names none serves default_model.
  std::vector<ModelSpec> models;
  // The model of requests and registrations that name none (the first of `models` if any).
  std::string default_model = "gemma-4";
  // How the coordinator calls replicas: null for plaintext; mutual-TLS credentials
  // (--internal-ca), in which case only replicas that serve TLS may register.
  std::shared_ptr<grpc::ChannelCredentials> replica_credentials;
  // With replica_credentials: the name every replica's certificate must carry, checked instead
  // of the host of the address it registers (pods, whose addresses are not known when their
  // certificate is made). Empty: the address's host.
  std::string replica_tls_name;
  // A worker assigned a model counts toward its replicas this long before it registers.
  std::chrono::milliseconds assignment_timeout{120000};
};

// Adds `window` into `total` (same shape; a total with no shape takes the window's). False,
// leaving `total` as it was, when the shapes differ.
bool AddExpertLoad(const gemma::v1::ExpertLoad& window, gemma::v1::ExpertLoad* total);

class Registry {
 public:
  using Clock = std::chrono::steady_clock;
  explicit Registry(RegistryOptions options);

  // The new replica's id. FAILED_PRECONDITION naming both values when the protocol version
  // differs from the first registered replica's or the fingerprint from the first of the same
  // model's, or naming the models served when its model is not one of `models`;
  // INVALID_ARGUMENT for an empty address. A worker registering again at the same address
  // replaces its old entry.
  absl::StatusOr<std::string> Register(const gemma::internal::v1::RegisterRequest& request);
  // False when `id` is unknown or has failed a request since it registered (the worker should
  // register again).
  bool Heartbeat(const gemma::internal::v1::HeartbeatRequest& request);
  // The healthy replica with the fewest outstanding requests whose id is not in `exclude`, its
  // count already incremented (the caller decrements it when the call ends). UNAVAILABLE when
  // there is none. With `admit`, only replicas below the admission limit count, and
  // RESOURCE_EXHAUSTED says the cluster is full when every healthy one is at it (a request
  // that moves after a failure was admitted already and is not refused).
  // Only replicas of `model` (empty: the default model) that are not draining; NOT_FOUND naming
  // the models served when no replica serves it and it is not in `models`.
  absl::StatusOr<std::shared_ptr<Replica>> Pick(const std::vector<std::string>& exclude = {},
                                                bool admit = true, absl::string_view model = "");
  // A request failed on `replica` (its process or its connection is gone): unhealthy at once,
  // until its worker registers again. Nothing when that entry is gone already.
  void MarkFailed(const Replica& replica, absl::string_view reason);
  // Whether `replica`'s entry is still healthy (false when it is gone): a call in flight to a
  // replica that stopped heartbeating is moved on without waiting for its stream to stall.
  bool IsHealthy(const Replica& replica) const;
  ModelLimits Limits(absl::string_view model = "") const;
  // The served name `model` stands for (the default model when empty).
  std::string ResolveModel(absl::string_view model) const;
  // Whether `model` (empty: the default) is served here: listed in --models, or the model of
  // a replica, or the default model of a coordinator without --models.
  bool Serves(absl::string_view model) const;
  // Every model name served: those of `models`, then any other a replica registered.
  std::vector<std::string> ServedModels() const;

  // Draining: `replica_id` (with the other entries of its placement group) takes no new
  // requests and is told to leave in its next heartbeat answer. NOT_FOUND for an unknown id.
  absl::StatusOr<std::vector<std::string>> Drain(const std::string& replica_id);
  bool DrainRequested(const std::string& replica_id) const;
  // A worker without a model asks for one: the model of `models` its ranks fit that is furthest
  // below its min replicas, else below its max (replicas and recent assignments counted);
  // otherwise it waits, listed as free in Status.
  gemma::internal::v1::JoinResponse Join(const gemma::internal::v1::JoinRequest& request);

  // Counters shown by Status.
  void RequestStarted() { in_flight_.fetch_add(1); }
  void RequestEnded() { in_flight_.fetch_sub(1); }
  void CountRequeue() { requeued_.fetch_add(1); }
  // The admission queue's length: false (nothing counted) when `max` are waiting already.
  bool TryQueue(int64_t max) {
    int64_t n = queued_.load();
    while (n < max) {
      if (queued_.compare_exchange_weak(n, n + 1)) return true;
    }
    return false;
  }
  void Dequeue() { queued_.fetch_sub(1); }

  std::chrono::milliseconds heartbeat_timeout() const { return options_.heartbeat_timeout; }
  int64_t max_outstanding_per_replica() const { return options_.max_outstanding_per_replica; }
  gemma::v1::GetStatusResponse Status() const;
  // The totals over every window received from `model`'s replicas (replicas gone included;
  // empty: the default model) and, per known replica of it (every replica when `model` is
  // empty), its totals and (with include_windows) its latest windows. NOT_FOUND naming the
  // models served for a model that is not.
  absl::StatusOr<gemma::v1::GetExpertLoadResponse> ExpertLoad(bool include_windows,
                                                              absl::string_view model) const;
  gemma::v1::GetExpertLoadResponse ExpertLoad(bool include_windows) const {
    return *ExpertLoad(include_windows, "");
  }
  // Windows numbered after `after_sequence`, oldest first (of `replica_id` alone when not
  // empty, of `model`'s replicas when not empty), from the last kRecentWindowsKept received.
  std::vector<gemma::v1::ExpertLoadWindow> WindowsAfter(int64_t after_sequence,
                                                        const std::string& replica_id,
                                                        const std::string& model = "") const;
  // The number of the last window received (0: none yet).
  int64_t LastWindowSequence() const;

  // Expert balancing. Groups of healthy entries whose experts are spread over ranks, with the
  // load of up to `max_windows` latest windows per entry counted under the placement in use
  // (of `epoch` instead, when not 0).
  std::vector<BalanceGroup> BalanceGroups(int max_windows, uint64_t epoch = 0) const;
  // Offers `placement` to every entry of group `key` (each heartbeat answer carries it until
  // one reports it in use, or `offer_timeout` passes: then the record says "abandoned").
  void OfferPlacement(const std::string& key, const gemma::v1::ExpertPlacement& placement,
                      gemma::v1::RebalanceRecord record);
  // The offer for `replica_id`'s group, if one is pending.
  std::optional<gemma::v1::ExpertPlacement> PendingOffer(const std::string& replica_id) const;
  // The balancedness measured after switch `epoch` of group `key`.
  void SetMeasured(const std::string& key, uint64_t epoch, double balancedness);
  static constexpr std::chrono::seconds kOfferTimeout{120};
  static constexpr size_t kRecentWindowsKept = 4096;

 private:
  // Balancing state of one placement group.
  struct GroupState {
    std::optional<gemma::v1::ExpertPlacement> offer;
    Clock::time_point offered_at{};
    std::vector<gemma::v1::RebalanceRecord> switches;  // oldest first, the last kept 32
  };
  struct Entry {
    std::shared_ptr<Replica> replica;
    Clock::time_point last_heartbeat;
    gemma::internal::v1::HeartbeatRequest load;
    bool failed = false;
    bool drain_requested = false;  // gemmactl drain: told to leave
    double preemptions_per_s = 0;  // smoothed over heartbeats
    bool draining() const { return drain_requested || load.draining(); }
    gemma::v1::ExpertLoad expert_totals;
    std::deque<gemma::v1::ExpertLoad> expert_windows;
  };
  bool Healthy(const Entry& entry, Clock::time_point now) const {
    return !entry.failed && now - entry.last_heartbeat <= options_.heartbeat_timeout;
  }
  Clock::time_point Now() const { return options_.now ? options_.now() : Clock::now(); }
  bool Forgotten(const Entry& entry, Clock::time_point now) const {
    return options_.forget_after.count() > 0 &&
           now - entry.last_heartbeat > options_.forget_after;
  }
  // Drops the forgotten entries.
  void PruneLocked(Clock::time_point now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);

  const RegistryOptions options_;
  std::atomic<int64_t> in_flight_{0};
  std::atomic<int64_t> requeued_{0};
  std::atomic<int64_t> queued_{0};
  mutable absl::Mutex mutex_;
  std::vector<Entry> entries_ ABSL_GUARDED_BY(mutex_);
  uint64_t next_id_ ABSL_GUARDED_BY(mutex_) = 1;
  bool have_reference_ ABSL_GUARDED_BY(mutex_) = false;
  uint32_t protocol_version_ ABSL_GUARDED_BY(mutex_) = 0;
  std::string fingerprint_ ABSL_GUARDED_BY(mutex_);
  // Per served model (models differ in shape).
  std::map<std::string, gemma::v1::ExpertLoad> expert_totals_ ABSL_GUARDED_BY(mutex_);
  int64_t last_window_sequence_ ABSL_GUARDED_BY(mutex_) = 0;
  std::deque<gemma::v1::ExpertLoadWindow> recent_windows_ ABSL_GUARDED_BY(mutex_);
  std::map<std::string, GroupState> groups_ ABSL_GUARDED_BY(mutex_);
  // Per served name, the fingerprint of its first replica.
  std::map<std::string, std::string> fingerprints_ ABSL_GUARDED_BY(mutex_);
  struct FreeWorker {
    std::string host, backend;
    int32_t ranks = 0;
    int64_t memory_bytes = 0;
    Clock::time_point last_seen;
  };
  std::map<std::string, FreeWorker> free_workers_ ABSL_GUARDED_BY(mutex_);
  // Models assigned to joining workers that have not registered yet: one per replica, however
  // many workers form it (the worker that leads it holds it). A worker that turns its model
  // down (JoinRequest.unreadable_models) gives it back at once.
  struct Assignment {
    std::string model;
    std::string worker_id;
    Clock::time_point at;
  };
  std::vector<Assignment> assignments_ ABSL_GUARDED_BY(mutex_);
  // Replicas of several workers (layout nodes > 1) being formed, kept until the assignment
  // timeout: the next joining worker that fits gets the lowest of `open_nodes`; a worker that
  // turns the model down gives its node back.
  struct Forming {
    std::string model;
    std::string name;
    int nodes = 1;
    std::vector<int> open_nodes;             // ascending
    std::map<std::string, int> node_of;      // worker id -> its node
    Clock::time_point started;
  };
  std::vector<Forming> forming_ ABSL_GUARDED_BY(mutex_);
  int64_t formed_ ABSL_GUARDED_BY(mutex_) = 0;  // replica names handed out
  // Healthy, not draining replicas of `model` (a placement group counts once) plus its recent
  // assignments.
  int ReplicasOfLocked(const std::string& model, Clock::time_point now) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  std::string ResolveModelLocked(absl::string_view model) const;
  bool ServesLocked(const std::string& resolved) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  std::vector<std::string> ServedModelsLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  const ModelSpec* SpecOf(const std::string& model) const;
};

}  // namespace gemma::coordinator
