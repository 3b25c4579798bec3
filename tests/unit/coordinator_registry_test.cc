// The coordinator's replica registry (coordinator/registry.h) on a fake clock: routing to the
// least loaded healthy replica, admission (RESOURCE_EXHAUSTED naming the load and the limit),
// exclusion of replicas that failed a request, health by heartbeat age, a failed replica kept
// out until its worker registers again, the model limits and the status it reports.
#include "coordinator/registry.h"

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "gtest/gtest.h"

namespace gemma::coordinator {
namespace {

using std::chrono::milliseconds;
namespace iv1 = gemma::internal::v1;

class RegistryTest : public ::testing::Test {
 protected:
  Registry MakeRegistry(int64_t max_outstanding = 256) {
    RegistryOptions options;
    options.heartbeat_timeout = milliseconds(3000);
    options.max_outstanding_per_replica = max_outstanding;
    options.now = [this] { return now_; };
    return Registry(options);
  }

  // A registry serving one model of that layout (assignments lapse after 10 s).
  Registry ModelRegistry(const std::string& name, int ranks, int nodes, int min, int max) {
    RegistryOptions options;
    options.now = [this] { return now_; };
    options.assignment_timeout = milliseconds(10000);
    ModelSpec spec;
    spec.name = name;
    spec.path = "/models/" + name;
    spec.layout.ranks = ranks;
    spec.layout.nodes = nodes;
    spec.min_replicas = min;
    spec.max_replicas = max;
    options.models = {spec};
    options.default_model = name;
    return Registry(options);
  }

  static iv1::RegisterRequest Worker(const std::string& address, int32_t vocab = 512,
                                     int64_t max_context = 4096) {
    iv1::RegisterRequest request;
    request.set_protocol_version(1);
    request.set_model_fingerprint("00112233aabbccdd");
    request.set_address(address);
    request.set_vocab_size(vocab);
    request.set_max_context(max_context);
    request.set_world_size(2);
    request.set_parallel("tp=2");
    return request;
  }

  static bool Beat(Registry& registry, const std::string& id, int64_t preemptions = 0) {
    iv1::HeartbeatRequest beat;
    beat.set_replica_id(id);
    beat.set_running(3);
    beat.set_preemptions(preemptions);
    return registry.Heartbeat(beat);
  }

  std::chrono::steady_clock::time_point now_ = std::chrono::steady_clock::now();
};

TEST_F(RegistryTest, PicksTheLeastLoadedHealthyReplica) {
  Registry registry = MakeRegistry();
  const std::string a = *registry.Register(Worker("127.0.0.1:1001"));
  const std::string b = *registry.Register(Worker("127.0.0.1:1002"));
  EXPECT_NE(a, b);
  std::vector<std::shared_ptr<Replica>> held;
  for (int i = 0; i < 4; ++i) held.push_back(*registry.Pick());
  EXPECT_EQ(held[0]->outstanding.load() + held[1]->outstanding.load(), 4);
  int on_a = 0;
  for (const auto& r : held) on_a += r->id == a;
  EXPECT_EQ(on_a, 2);
  held[0]->outstanding.fetch_sub(1);
  std::shared_ptr<Replica> next = *registry.Pick();
  EXPECT_EQ(next->id, held[0]->id);
}

// After a coordinator restart ids are issued from r1 again: a worker still heartbeating with
// its old id, which now names another worker, is told to register again, and its heartbeats do
// not keep the other's entry alive.
TEST_F(RegistryTest, AHeartbeatFromAnotherAddressIsNotTheReplicasOwn) {
  Registry registry = MakeRegistry();
  const std::string b = *registry.Register(Worker("127.0.0.1:2002"));  // the new r1
  iv1::HeartbeatRequest stale;
  stale.set_replica_id(b);
  stale.set_address("127.0.0.1:2001");  // the worker that had r1 before the restart
  EXPECT_FALSE(registry.Heartbeat(stale));
  // B's own heartbeats count; A's do not keep B alive once B stops.
  iv1::HeartbeatRequest own = stale;
  own.set_address("127.0.0.1:2002");
  EXPECT_TRUE(registry.Heartbeat(own));
  now_ += milliseconds(2000);
  EXPECT_FALSE(registry.Heartbeat(stale));
  now_ += milliseconds(2000);
  EXPECT_EQ(registry.Status().replicas(0).healthy(), false);
  // A registers again and gets an id of its own.
  const std::string a = *registry.Register(Worker("127.0.0.1:2001"));
  EXPECT_NE(a, b);
  stale.set_replica_id(a);
  EXPECT_TRUE(registry.Heartbeat(stale));
}

TEST_F(RegistryTest, AdmissionRefusesWhenEveryHealthyReplicaIsFull) {
  Registry registry = MakeRegistry(/*max_outstanding=*/2);
  ASSERT_TRUE(registry.Register(Worker("127.0.0.1:1001")).ok());
  ASSERT_TRUE(registry.Register(Worker("127.0.0.1:1002")).ok());
  std::vector<std::shared_ptr<Replica>> held;
  for (int i = 0; i < 4; ++i) {
    absl::StatusOr<std::shared_ptr<Replica>> r = registry.Pick();
    ASSERT_TRUE(r.ok()) << i << ": " << r.status();
    held.push_back(*r);
  }
  absl::StatusOr<std::shared_ptr<Replica>> full = registry.Pick();
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(full.status().message(),
                                "the cluster is full: 4 requests in flight on 2 healthy "
                                "replicas (limit 2 each); retry later or add replicas"))
      << full.status();
  // A request moving after a failure was admitted already.
  absl::StatusOr<std::shared_ptr<Replica>> moved = registry.Pick({}, /*admit=*/false);
  ASSERT_TRUE(moved.ok()) << moved.status();
  EXPECT_EQ(moved->get()->outstanding.load(), 3);
  moved->get()->outstanding.fetch_sub(1);
  held.back()->outstanding.fetch_sub(1);
  EXPECT_TRUE(registry.Pick().ok());
  EXPECT_EQ(registry.Status().max_outstanding_per_replica(), 2);
}

TEST_F(RegistryTest, ExcludedReplicasAreNotPicked) {
  Registry registry = MakeRegistry();
  const std::string a = *registry.Register(Worker("127.0.0.1:1001"));
  const std::string b = *registry.Register(Worker("127.0.0.1:1002"));
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<std::shared_ptr<Replica>> r = registry.Pick({a}, false);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->get()->id, b);
  }
  absl::StatusOr<std::shared_ptr<Replica>> none = registry.Pick({a, b}, false);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(absl::StrContains(none.status().message(), "2 failed this request"))
      << none.status();
}

TEST_F(RegistryTest, HealthFollowsHeartbeatAge) {
  Registry registry = MakeRegistry();
  const std::string a = *registry.Register(Worker("127.0.0.1:1001"));
  now_ += milliseconds(2500);
  EXPECT_TRUE(Beat(registry, a));
  now_ += milliseconds(2500);
  EXPECT_TRUE(registry.Pick().ok());
  now_ += milliseconds(600);
  absl::StatusOr<std::shared_ptr<Replica>> none = registry.Pick();
  EXPECT_EQ(none.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_FALSE(registry.Status().replicas(0).healthy());
  // A late heartbeat brings it back.
  EXPECT_TRUE(Beat(registry, a));
  EXPECT_TRUE(registry.Status().replicas(0).healthy());
  EXPECT_TRUE(registry.Pick().ok());
  EXPECT_FALSE(Beat(registry, "r999"));
}

TEST_F(RegistryTest, ReplicaWithoutHeartbeatsIsForgottenAfterAWhile) {
  Registry registry = MakeRegistry();  // forget_after: the default 60 s
  const std::string a = *registry.Register(Worker("127.0.0.1:1001"));
  const std::string b = *registry.Register(Worker("127.0.0.1:1002"));
  now_ += milliseconds(59000);
  EXPECT_TRUE(Beat(registry, b));
  EXPECT_EQ(registry.Status().replicas_size(), 2);  // a: unhealthy, still listed
  now_ += milliseconds(1001);
  const gemma::v1::GetStatusResponse status = registry.Status();
  ASSERT_EQ(status.replicas_size(), 1);
  EXPECT_EQ(status.replicas(0).id(), b);
  // A worker that comes back late is asked to register again.
  EXPECT_FALSE(Beat(registry, a));
  EXPECT_TRUE(registry.Register(Worker("127.0.0.1:1001")).ok());
  EXPECT_EQ(registry.Status().replicas_size(), 2);
}

TEST_F(RegistryTest, FailedReplicaIsOutUntilItRegistersAgain) {
  Registry registry = MakeRegistry();
  const std::string a = *registry.Register(Worker("127.0.0.1:1001"));
  const std::string b = *registry.Register(Worker("127.0.0.1:1002"));
  std::shared_ptr<Replica> failed = *registry.Pick();
  ASSERT_EQ(failed->id, a);
  registry.MarkFailed(*failed, "UNAVAILABLE: connection refused");
  // Unhealthy at once, fresh heartbeats or not; the worker is told to register again.
  EXPECT_FALSE(registry.Status().replicas(0).healthy());
  EXPECT_FALSE(Beat(registry, a));
  EXPECT_FALSE(registry.Status().replicas(0).healthy());
  for (int i = 0; i < 3; ++i) EXPECT_EQ(registry.Pick().value()->id, b);
  // b fails too: nothing healthy.
  registry.MarkFailed(*registry.Pick().value(), "UNAVAILABLE");
  EXPECT_EQ(registry.Pick().status().code(), absl::StatusCode::kUnavailable);
  // The worker at a's address registers again (restarted, or told by its heartbeat): a new,
  // healthy entry that replaces the failed one.
  absl::StatusOr<std::string> again = registry.Register(Worker("127.0.0.1:1001"));
  ASSERT_TRUE(again.ok());
  EXPECT_NE(*again, a);
  absl::StatusOr<std::shared_ptr<Replica>> picked = registry.Pick();
  ASSERT_TRUE(picked.ok()) << picked.status();
  EXPECT_EQ(picked->get()->id, *again);
  EXPECT_TRUE(Beat(registry, *again));
  const gemma::v1::GetStatusResponse status = registry.Status();
  ASSERT_EQ(status.replicas_size(), 2);
  int healthy = 0;
  for (const auto& r : status.replicas()) healthy += r.healthy();
  EXPECT_EQ(healthy, 1);
  // Marking the old (replaced) replica again changes nothing.
  registry.MarkFailed(*failed, "late");
  EXPECT_TRUE(registry.Pick().ok());
}

TEST_F(RegistryTest, LimitsAreTheSmallestKnownOverHealthyReplicas) {
  Registry registry = MakeRegistry();
  EXPECT_EQ(registry.Limits().vocab_size, 0);
  EXPECT_EQ(registry.Limits().max_context, 0);
  ASSERT_TRUE(registry.Register(Worker("127.0.0.1:1001", 0, 0)).ok());  // an older worker
  EXPECT_EQ(registry.Limits().vocab_size, 0);
  ASSERT_TRUE(registry.Register(Worker("127.0.0.1:1002", 512, 4096)).ok());
  ASSERT_TRUE(registry.Register(Worker("127.0.0.1:1003", 512, 2048)).ok());
  EXPECT_EQ(registry.Limits().vocab_size, 512);
  EXPECT_EQ(registry.Limits().max_context, 2048);
  // Only healthy replicas count while there is one.
  const gemma::v1::GetStatusResponse status = registry.Status();
  std::shared_ptr<Replica> small;
  for (int i = 0; i < 3 && small == nullptr; ++i) {
    std::shared_ptr<Replica> r = *registry.Pick();
    if (r->address == "127.0.0.1:1003") small = r;
  }
  ASSERT_NE(small, nullptr);
  registry.MarkFailed(*small, "gone");
  EXPECT_EQ(registry.Limits().max_context, 4096);
}

TEST_F(RegistryTest, BadRegistrationsAreRefused) {
  Registry registry = MakeRegistry();
  iv1::RegisterRequest no_address = Worker("");
  EXPECT_EQ(registry.Register(no_address).status().code(), absl::StatusCode::kInvalidArgument);
  iv1::RegisterRequest negative = Worker("127.0.0.1:1001", -1);
  absl::StatusOr<std::string> refused = registry.Register(negative);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(refused.status().message(), "vocab_size -1"));
  ASSERT_TRUE(registry.Register(Worker("127.0.0.1:1001")).ok());
  iv1::RegisterRequest other = Worker("127.0.0.1:1002");
  other.set_model_fingerprint("ffffffffffffffff");
  refused = registry.Register(other);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(refused.status().message(), "ffffffffffffffff"));
  EXPECT_TRUE(absl::StrContains(refused.status().message(), "00112233aabbccdd"));
}

TEST_F(RegistryTest, StatusReportsReplicasAndCounters) {
  Registry registry = MakeRegistry(7);
  const std::string a = *registry.Register(Worker("127.0.0.1:1001"));
  ASSERT_TRUE(Beat(registry, a, /*preemptions=*/5));
  registry.RequestStarted();
  registry.RequestStarted();
  registry.RequestEnded();
  registry.CountRequeue();
  std::shared_ptr<Replica> held = *registry.Pick();
  now_ += milliseconds(120);
  const gemma::v1::GetStatusResponse status = registry.Status();
  EXPECT_EQ(status.requests_in_flight(), 1);
  EXPECT_EQ(status.requests_requeued(), 1);
  EXPECT_EQ(status.max_outstanding_per_replica(), 7);
  EXPECT_EQ(status.model_fingerprint(), "00112233aabbccdd");
  ASSERT_EQ(status.replicas_size(), 1);
  const gemma::v1::ReplicaStatus& r = status.replicas(0);
  EXPECT_EQ(r.id(), a);
  EXPECT_EQ(r.address(), "127.0.0.1:1001");
  EXPECT_TRUE(r.healthy());
  EXPECT_EQ(r.running(), 3);
  EXPECT_EQ(r.outstanding(), 1);
  EXPECT_EQ(r.world_size(), 2);
  EXPECT_EQ(r.parallel(), "tp=2");
  EXPECT_EQ(r.preemptions(), 5);
  EXPECT_EQ(r.max_context(), 4096);
  EXPECT_EQ(r.ms_since_heartbeat(), 120);
}

}  // namespace
}  // namespace gemma::coordinator

namespace gemma::coordinator {
namespace {

gemma::v1::ExpertLoad Window(std::vector<int64_t> counts, int64_t first, int64_t last,
                             int32_t layers = 2, int32_t experts = 3) {
  gemma::v1::ExpertLoad w;
  w.set_num_layers(layers);
  w.set_num_experts(experts);
  w.mutable_counts()->Add(counts.begin(), counts.end());
  w.set_first_step(first);
  w.set_last_step(last);
  w.set_windows(1);
  return w;
}

TEST_F(RegistryTest, ExpertLoadWindowsSumPerReplicaAndOverTheClusterWithABoundedHistory) {
  RegistryOptions options;
  options.expert_windows_kept = 2;
  options.now = [this] { return now_; };
  Registry registry(options);
  const std::string a = *registry.Register(Worker("127.0.0.1:1001"));
  const std::string b = *registry.Register(Worker("127.0.0.1:1002"));
  iv1::HeartbeatRequest beat;
  beat.set_replica_id(a);
  *beat.add_expert_windows() = Window({1, 0, 2, 3, 0, 0}, 1, 4);
  *beat.add_expert_windows() = Window({0, 1, 0, 0, 1, 1}, 5, 9);
  ASSERT_TRUE(registry.Heartbeat(beat));
  beat.clear_expert_windows();
  *beat.add_expert_windows() = Window({5, 0, 0, 0, 0, 5}, 10, 12);
  // A window of another shape (another model) is dropped, the others kept.
  *beat.add_expert_windows() = Window({1, 1}, 13, 13, 1, 2);
  ASSERT_TRUE(registry.Heartbeat(beat));
  iv1::HeartbeatRequest other;
  other.set_replica_id(b);
  *other.add_expert_windows() = Window({0, 0, 1, 0, 0, 1}, 1, 2);
  ASSERT_TRUE(registry.Heartbeat(other));

  gemma::v1::GetExpertLoadResponse load = registry.ExpertLoad(/*include_windows=*/true);
  EXPECT_EQ(std::vector<int64_t>(load.totals().counts().begin(), load.totals().counts().end()),
            (std::vector<int64_t>{6, 1, 3, 3, 1, 7}));
  EXPECT_EQ(load.totals().windows(), 4);
  ASSERT_EQ(load.replicas_size(), 2);
  const gemma::v1::ReplicaExpertLoad& ra = load.replicas(0);
  EXPECT_EQ(ra.replica_id(), a);
  EXPECT_EQ(std::vector<int64_t>(ra.totals().counts().begin(), ra.totals().counts().end()),
            (std::vector<int64_t>{6, 1, 2, 3, 1, 6}));
  EXPECT_EQ(ra.totals().first_step(), 1);
  EXPECT_EQ(ra.totals().last_step(), 12);
  ASSERT_EQ(ra.windows_size(), 2);  // the latest two of three
  EXPECT_EQ(ra.windows(0).first_step(), 5);
  EXPECT_EQ(ra.windows(1).first_step(), 10);
  EXPECT_EQ(registry.ExpertLoad(false).replicas(0).windows_size(), 0);
  // GetStatus does not carry the windows.
  EXPECT_EQ(registry.Status().replicas_size(), 2);
}

// A coordinator that calls replicas over mutual TLS takes only replicas that serve it, and one
// that calls in plaintext only plaintext ones: a mismatch would fail every request.
TEST_F(RegistryTest, ReplicasMustServeTheWayTheCoordinatorCallsThem) {
  Registry plain = MakeRegistry();
  iv1::RegisterRequest tls = Worker("127.0.0.1:1001");
  tls.set_replica_tls(true);
  absl::StatusOr<std::string> refused = plain.Register(tls);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(refused.status().message(), "serves its replica over TLS"))
      << refused.status();
  EXPECT_TRUE(plain.Register(Worker("127.0.0.1:1002")).ok());

  RegistryOptions options;
  grpc::SslCredentialsOptions ssl;
  options.replica_credentials = grpc::SslCredentials(ssl);
  Registry mutual(options);
  refused = mutual.Register(Worker("127.0.0.1:1003"));
  ASSERT_FALSE(refused.ok());
  EXPECT_TRUE(absl::StrContains(refused.status().message(),
                                "start the worker with --tls-cert and --tls-key"))
      << refused.status();
  EXPECT_TRUE(mutual.Register(tls).ok());
}

// A model whose replica spans two workers: the first worker that fits leads a new replica, the
// next one completes it (same name, node 1), and with the model at its max a third waits; a
// replica left half-formed past the assignment timeout stops taking workers.
TEST_F(RegistryTest, ReplicasOfSeveralWorkersAreAssignedNodeByNode) {
  Registry registry = ModelRegistry("big", /*ranks=*/2, /*nodes=*/2, /*min=*/1, /*max=*/2);
  auto join = [&](const std::string& id, int ranks) {
    iv1::JoinRequest request;
    request.set_worker_id(id);
    request.set_host("host-" + id);
    request.set_backend("cpu");
    request.set_ranks(ranks);
    return registry.Join(request);
  };
  EXPECT_FALSE(join("w0", 1).assigned());  // 1 rank: the model needs 2 per worker
  const iv1::JoinResponse a = join("w1", 2);
  ASSERT_TRUE(a.assigned());
  EXPECT_EQ(a.nodes(), 2);
  EXPECT_EQ(a.node_rank(), 0);
  EXPECT_EQ(a.replica(), "big-1");
  const iv1::JoinResponse b = join("w2", 2);
  ASSERT_TRUE(b.assigned());
  EXPECT_EQ(b.replica(), "big-1");
  EXPECT_EQ(b.node_rank(), 1);
  // The second replica (max 2) starts with the next worker and is left half-formed.
  const iv1::JoinResponse c = join("w3", 2);
  ASSERT_TRUE(c.assigned());
  EXPECT_EQ(c.replica(), "big-2");
  EXPECT_EQ(c.node_rank(), 0);
  now_ += milliseconds(11000);
  // Both assignments lapsed unregistered, so a new replica starts; big-2 takes no one now.
  const iv1::JoinResponse d = join("w4", 2);
  ASSERT_TRUE(d.assigned());
  EXPECT_EQ(d.replica(), "big-3");
  EXPECT_EQ(d.node_rank(), 0);
  const iv1::JoinResponse e = join("w5", 2);
  EXPECT_EQ(e.replica(), "big-3");
  EXPECT_EQ(e.node_rank(), 1);
}

// An assignment counts toward its model's replicas until that replica registers, once: the
// second dp-ep group of the same replica does not use up another worker's assignment.
TEST_F(RegistryTest, OneReplicaUsesUpOneAssignmentWhateverItsGroups) {
  Registry registry = ModelRegistry("moe", /*ranks=*/2, /*nodes=*/1, /*min=*/0, /*max=*/2);
  auto join = [&](const std::string& id) {
    iv1::JoinRequest request;
    request.set_worker_id(id);
    request.set_ranks(2);
    return registry.Join(request);
  };
  ASSERT_TRUE(join("w1").assigned());
  ASSERT_TRUE(join("w2").assigned());
  EXPECT_FALSE(join("w3").assigned());  // two replicas, both still loading
  // w1's replica registers both its dp-ep groups; w2's assignment still counts.
  for (const std::string address : {"127.0.0.1:1001", "127.0.0.1:1002"}) {
    iv1::RegisterRequest group = Worker(address);
    group.set_model_name("moe");
    group.set_placement_group("replica-w1/");
    ASSERT_TRUE(registry.Register(group).ok());
  }
  EXPECT_FALSE(join("w3").assigned());
}

// A worker that cannot take what it was assigned (an unreadable checkpoint, weights that do not
// fit) says so when it joins again, and gives the assignment back at once: the model's slot,
// or its node of a replica being formed, goes to the next worker instead of waiting out the
// assignment timeout.
TEST_F(RegistryTest, AnAssignmentTurnedDownGoesToTheNextWorkerAtOnce) {
  auto join = [](Registry& registry, const std::string& id,
                 std::vector<std::string> unreadable = {}) {
    iv1::JoinRequest request;
    request.set_worker_id(id);
    request.set_ranks(2);
    for (const std::string& m : unreadable) request.add_unreadable_models(m);
    return registry.Join(request);
  };
  Registry one = ModelRegistry("small", /*ranks=*/2, /*nodes=*/1, /*min=*/1, /*max=*/1);
  ASSERT_TRUE(join(one, "w1").assigned());
  EXPECT_FALSE(join(one, "w2").assigned());  // the model's one replica is w1's, loading
  const iv1::JoinResponse declined = join(one, "w1", {"small"});
  EXPECT_FALSE(declined.assigned());
  EXPECT_NE(declined.reason().find("cannot read"), std::string::npos) << declined.reason();
  EXPECT_TRUE(join(one, "w2").assigned());

  Registry big = ModelRegistry("big", /*ranks=*/2, /*nodes=*/2, /*min=*/1, /*max=*/1);
  const iv1::JoinResponse leader = join(big, "w1");
  ASSERT_TRUE(leader.assigned());
  const iv1::JoinResponse second = join(big, "w2");
  ASSERT_TRUE(second.assigned());
  EXPECT_EQ(second.node_rank(), 1);
  EXPECT_FALSE(join(big, "w3").assigned());  // big-1 is complete and the model at its max
  EXPECT_FALSE(join(big, "w2", {"big"}).assigned());
  const iv1::JoinResponse replacement = join(big, "w3");
  ASSERT_TRUE(replacement.assigned());
  EXPECT_EQ(replacement.replica(), leader.replica());
  EXPECT_EQ(replacement.node_rank(), 1);
  // The leader turns it down too: node 0 of the same replica goes to the next worker.
  EXPECT_FALSE(join(big, "w1", {"big"}).assigned());
  const iv1::JoinResponse new_leader = join(big, "w4");
  ASSERT_TRUE(new_leader.assigned());
  EXPECT_EQ(new_leader.replica(), leader.replica());
  EXPECT_EQ(new_leader.node_rank(), 0);
  EXPECT_FALSE(join(big, "w5").assigned());
}

}  // namespace
}  // namespace gemma::coordinator
