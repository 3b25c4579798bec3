#include "coordinator/registry.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "glog/logging.h"
#include "grpcpp/grpcpp.h"

namespace gemma::coordinator {

Registry::Registry(RegistryOptions options) : options_(std::move(options)) {}

absl::StatusOr<std::string> Registry::Register(
    const gemma::internal::v1::RegisterRequest& request) {
  if (request.address().empty()) {
    return absl::InvalidArgumentError("Register: the worker sent no address to dial");
  }
  if (request.vocab_size() < 0 || request.max_context() < 0 || request.world_size() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Register: the worker at ", request.address(), " sent vocab_size ",
        request.vocab_size(), ", max_context ", request.max_context(), ", world_size ",
        request.world_size(), "; none may be negative"));
  }
  absl::MutexLock lock(&mutex_);
  const std::string model = ResolveModelLocked(request.model_name());
  if (!options_.models.empty() && SpecOf(model) == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the worker at ", request.address(), " serves model \"", model,
        "\", which this coordinator's --models does not list (it serves: ",
        absl::StrJoin(ServedModelsLocked(), ", "), "); start it with --model-name NAME"));
  }
  if ((options_.replica_credentials != nullptr) != request.replica_tls()) {
    return absl::FailedPreconditionError(
        request.replica_tls()
            ? absl::StrCat("the worker at ", request.address(),
                           " serves its replica over TLS (--tls-cert), but this coordinator calls "
                           "replicas in plaintext: start it with --internal-ca and an internal "
                           "certificate, or the worker without --tls-cert")
            : absl::StrCat("the worker at ", request.address(),
                           " serves its replica in plaintext, but this coordinator calls "
                           "replicas over mutual TLS (--internal-ca): start the worker with "
                           "--tls-cert and --tls-key signed by that CA"));
  }
  if (have_reference_ && request.protocol_version() != protocol_version_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "protocol version ", request.protocol_version(), " of the worker at ", request.address(),
        " differs from the cluster's protocol version ", protocol_version_,
        "; run matching builds"));
  }
  if (auto known = fingerprints_.find(model); known != fingerprints_.end()) {
    if (request.model_fingerprint() != known->second) {
      return absl::FailedPreconditionError(absl::StrCat(
          "model fingerprint ", request.model_fingerprint(), " of the worker at ",
          request.address(), " differs from model \"", model, "\"'s fingerprint ",
          known->second, "; every worker of a model must load the same checkpoint (or give "
          "another --model-name)"));
    }
  } else {
    fingerprints_[model] = request.model_fingerprint();
  }
  if (!have_reference_) {
    have_reference_ = true;
    protocol_version_ = request.protocol_version();
    fingerprint_ = request.model_fingerprint();
  }
  // A worker this coordinator assigned to the model has arrived: once per replica (the other
  // groups of a dp-ep replica, and a replica registering again, are not new arrivals).
  const bool known_replica = std::any_of(entries_.begin(), entries_.end(), [&](const Entry& e) {
    return e.replica->address == request.address() ||
           (!request.placement_group().empty() &&
            e.replica->placement_group == request.placement_group());
  });
  for (auto it = assignments_.begin(); !known_replica && it != assignments_.end(); ++it) {
    if (it->model == model) {
      assignments_.erase(it);
      break;
    }
  }
  PruneLocked(Now());
  entries_.erase(std::remove_if(entries_.begin(), entries_.end(),
                                [&](const Entry& e) {
                                  if (e.replica->address != request.address()) return false;
                                  LOG(INFO) << "replica " << e.replica->id << " at "
                                            << e.replica->address << " is replaced";
                                  return true;
                                }),
                 entries_.end());
  auto replica = std::make_shared<Replica>();
  replica->id = absl::StrCat("r", next_id_++);
  replica->address = request.address();
  grpc::ChannelArguments channel_args;
  if (options_.replica_credentials != nullptr && !options_.replica_tls_name.empty()) {
    channel_args.SetSslTargetNameOverride(options_.replica_tls_name);
  }
  replica->stub = gemma::internal::v1::Replica::NewStub(grpc::CreateCustomChannel(
      request.address(),
      options_.replica_credentials != nullptr ? options_.replica_credentials
                                              : grpc::InsecureChannelCredentials(),
      channel_args));
  replica->vocab_size = request.vocab_size();
  replica->max_context = request.max_context();
  replica->world_size = request.world_size();
  replica->parallel = request.parallel();
  replica->placement_group = request.placement_group();
  replica->model = model;
  replica->name = request.name();
  Entry entry;
  entry.replica = replica;
  entry.last_heartbeat = Now();
  entries_.push_back(std::move(entry));
  LOG(INFO) << "replica " << replica->id
            << (replica->name.empty() ? "" : absl::StrCat(" (", replica->name, ")"))
            << " registered at " << replica->address
            << ", fingerprint " << request.model_fingerprint() << ", vocab "
            << request.vocab_size() << ", max context " << request.max_context() << ", "
            << request.world_size() << " rank(s) " << request.parallel() << ", model " << model;
  return replica->id;
}

void Registry::PruneLocked(Clock::time_point now) {
  entries_.erase(std::remove_if(entries_.begin(), entries_.end(),
                                [&](const Entry& e) {
                                  if (!Forgotten(e, now)) return false;
                                  LOG(INFO) << "replica " << e.replica->id << " at "
                                            << e.replica->address << " is forgotten: no "
                                            << "heartbeat for over "
                                            << options_.forget_after.count() << " ms";
                                  return true;
                                }),
                 entries_.end());
}

bool Registry::Heartbeat(const gemma::internal::v1::HeartbeatRequest& request) {
  absl::MutexLock lock(&mutex_);
  PruneLocked(Now());
  for (auto it = entries_.begin(); it != entries_.end(); ++it) {
    Entry& entry = *it;
    if (entry.replica->id != request.replica_id()) continue;
    if (request.left() &&
        (request.address().empty() || request.address() == entry.replica->address)) {
      LOG(INFO) << "replica " << entry.replica->id << " at " << entry.replica->address
                << " drained and left";
      entries_.erase(it);
      return true;
    }
    if (!request.address().empty() && request.address() != entry.replica->address) {
      // The id was issued again (this coordinator restarted) to the replica at the entry's
      // address: the sender is another replica, and must register again.
      LOG(INFO) << "a heartbeat for " << entry.replica->id << " came from "
                << request.address() << ", but " << entry.replica->id << " is at "
                << entry.replica->address << "; asking the sender to register again";
      return false;
    }
    if (entry.failed) {
      LOG(INFO) << "replica " << entry.replica->id << " failed a request; asking it to register "
                << "again";
      return false;
    }
    const Clock::time_point beat = Now();
    const double seconds = std::chrono::duration<double>(beat - entry.last_heartbeat).count();
    if (seconds > 0 && request.preemptions() >= entry.load.preemptions()) {
      const double rate = (request.preemptions() - entry.load.preemptions()) / seconds;
      entry.preemptions_per_s = 0.5 * entry.preemptions_per_s + 0.5 * rate;
    }
    entry.last_heartbeat = beat;
    entry.load = request;
    // A pending offer is done once the replica runs it (or a newer one), or given up on.
    const std::string key = entry.replica->placement_group.empty() ? entry.replica->id
                                                                   : entry.replica->placement_group;
    if (auto group = groups_.find(key); group != groups_.end() && group->second.offer) {
      GroupState& g = group->second;
      const uint64_t running = request.expert_placement().epoch();
      const bool active = running >= g.offer->epoch();
      const bool expired = Now() - g.offered_at > kOfferTimeout;
      if (active || expired) {
        for (gemma::v1::RebalanceRecord& r : g.switches) {
          if (r.epoch() != g.offer->epoch() || r.state() != "offered") continue;
          r.set_state(active ? "active" : "abandoned");
          if (active) r.set_switched_unix_ms(absl::ToUnixMillis(absl::Now()));
        }
        LOG(INFO) << "replica " << entry.replica->id << ": expert placement epoch "
                  << g.offer->epoch()
                  << (active ? " in use" : " abandoned: not in use after the offer timeout");
        g.offer.reset();
      }
    }
    for (const gemma::v1::ExpertLoad& window : request.expert_windows()) {
      if (!AddExpertLoad(window, &entry.expert_totals) ||
          !AddExpertLoad(window, &expert_totals_[entry.replica->model])) {
        LOG_EVERY_N(WARNING, 100) << "replica " << entry.replica->id << " sent an expert-load "
                                  << "window of another shape; dropped";
        continue;
      }
      gemma::v1::ExpertLoad numbered = window;
      numbered.set_sequence(++last_window_sequence_);
      entry.expert_windows.push_back(numbered);
      while (static_cast<int>(entry.expert_windows.size()) > options_.expert_windows_kept) {
        entry.expert_windows.pop_front();
      }
      gemma::v1::ExpertLoadWindow recent;
      recent.set_replica_id(entry.replica->id);
      recent.set_model(entry.replica->model);
      *recent.mutable_window() = std::move(numbered);
      recent_windows_.push_back(std::move(recent));
      while (recent_windows_.size() > kRecentWindowsKept) recent_windows_.pop_front();
    }
    entry.load.clear_expert_windows();
    return true;
  }
  return false;
}

absl::StatusOr<std::shared_ptr<Replica>> Registry::Pick(const std::vector<std::string>& exclude,
                                                        bool admit, absl::string_view model_name) {
  absl::MutexLock lock(&mutex_);
  const Clock::time_point now = Now();
  PruneLocked(now);
  const std::string model = ResolveModelLocked(model_name);
  if (!ServesLocked(model)) {
    return absl::NotFoundError(absl::StrCat("model \"", model, "\" is not served here; served: ",
                                            absl::StrJoin(ServedModelsLocked(), ", ")));
  }
  const int64_t limit = options_.max_outstanding_per_replica;
  std::shared_ptr<Replica> best;
  int64_t healthy = 0;
  int64_t in_flight = 0;
  for (const Entry& entry : entries_) {
    if (!Healthy(entry, now) || entry.replica->model != model || entry.draining()) continue;
    if (std::find(exclude.begin(), exclude.end(), entry.replica->id) != exclude.end()) continue;
    const int64_t outstanding = entry.replica->outstanding.load();
    ++healthy;
    in_flight += outstanding;
    if (admit && outstanding >= limit) continue;
    if (best == nullptr || outstanding < best->outstanding.load()) best = entry.replica;
  }
  if (best == nullptr && healthy > 0) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the cluster is full: ", in_flight, " requests in flight on ", healthy,
        " healthy replica", healthy == 1 ? "" : "s", " (limit ", limit,
        " each); retry later or add replicas"));
  }
  if (best == nullptr) {
    if (!exclude.empty()) {
      return absl::UnavailableError(absl::StrCat(
          "no other healthy replica (", entries_.size(), " registered, ", exclude.size(),
          " failed this request)"));
    }
    return absl::UnavailableError(absl::StrCat(
        "no healthy replica of model \"", model, "\" (", entries_.size(),
        " registered in all); start a gemma-worker or wait for one to heartbeat"));
  }
  best->outstanding.fetch_add(1);
  return best;
}

void Registry::MarkFailed(const Replica& replica, absl::string_view reason) {
  absl::MutexLock lock(&mutex_);
  for (Entry& entry : entries_) {
    if (entry.replica.get() != &replica) continue;
    if (!entry.failed) {
      LOG(WARNING) << "replica " << replica.id << " at " << replica.address
                   << " is unhealthy until it registers again: " << reason;
    }
    entry.failed = true;
    return;
  }
}

bool Registry::IsHealthy(const Replica& replica) const {
  absl::MutexLock lock(&mutex_);
  for (const Entry& entry : entries_) {
    if (entry.replica.get() == &replica) return Healthy(entry, Now());
  }
  return false;
}

ModelLimits Registry::Limits(absl::string_view model_name) const {
  absl::MutexLock lock(&mutex_);
  const Clock::time_point now = Now();
  const std::string model = ResolveModelLocked(model_name);
  ModelLimits limits;
  bool any_healthy = false;
  for (const Entry& entry : entries_) {
    any_healthy |= Healthy(entry, now) && entry.replica->model == model;
  }
  for (const Entry& entry : entries_) {
    if (entry.replica->model != model) continue;
    if (any_healthy && !Healthy(entry, now)) continue;
    const Replica& r = *entry.replica;
    if (r.vocab_size > 0 && (limits.vocab_size == 0 || r.vocab_size < limits.vocab_size)) {
      limits.vocab_size = r.vocab_size;
    }
    if (r.max_context > 0 && (limits.max_context == 0 || r.max_context < limits.max_context)) {
      limits.max_context = r.max_context;
    }
  }
  return limits;
}

gemma::v1::GetStatusResponse Registry::Status() const {
  gemma::v1::GetStatusResponse response;
  response.set_requests_in_flight(in_flight_.load());
  response.set_requests_requeued(requeued_.load());
  response.set_requests_queued(queued_.load());
  response.set_max_outstanding_per_replica(options_.max_outstanding_per_replica);
  absl::MutexLock lock(&mutex_);
  const Clock::time_point now = Now();
  response.set_protocol_version(protocol_version_);
  response.set_model_fingerprint(fingerprint_);
  for (const Entry& entry : entries_) {
    if (Forgotten(entry, now)) continue;  // dropped at the next change
    gemma::v1::ReplicaStatus* status = response.add_replicas();
    status->set_id(entry.replica->id);
    status->set_address(entry.replica->address);
    status->set_healthy(Healthy(entry, now));
    status->set_running(entry.load.running());
    status->set_waiting(entry.load.waiting());
    *status->mutable_kv_pools() = entry.load.kv_pools();
    status->set_outstanding(entry.replica->outstanding.load());
    status->set_ms_since_heartbeat(
        std::chrono::duration_cast<std::chrono::milliseconds>(now - entry.last_heartbeat).count());
    status->set_world_size(entry.replica->world_size);
    status->set_parallel(entry.replica->parallel);
    status->set_preemptions(entry.load.preemptions());
    status->set_preemptions_per_s(entry.preemptions_per_s);
    status->set_max_context(entry.replica->max_context);
    status->set_model(entry.replica->model);
    status->set_name(entry.replica->name);
    status->set_draining(entry.draining());
  }
  for (const std::string& name : ServedModelsLocked()) {
    gemma::v1::ServedModel* model = response.add_models();
    model->set_name(name);
    int healthy = 0;
    std::vector<std::string> groups;
    for (const Entry& entry : entries_) {
      if (entry.replica->model != name || !Healthy(entry, now) || entry.draining()) continue;
      const std::string& key = entry.replica->placement_group.empty()
                                   ? entry.replica->id
                                   : entry.replica->placement_group;
      if (std::find(groups.begin(), groups.end(), key) == groups.end()) {
        groups.push_back(key);
        ++healthy;
      }
    }
    model->set_replicas(healthy);
    if (const ModelSpec* spec = SpecOf(name)) {
      model->set_path(spec->path);
      model->set_min_replicas(spec->min_replicas);
      model->set_max_replicas(spec->max_replicas);
      model->set_layout(DescribeLayout(spec->layout));
    }
  }
  for (const auto& [id, worker] : free_workers_) {
    const auto age = std::chrono::duration_cast<std::chrono::milliseconds>(now - worker.last_seen);
    if (age > std::chrono::seconds(10)) continue;  // gone, or assigned
    gemma::v1::FreeWorker* free = response.add_free_workers();
    free->set_worker_id(id);
    free->set_host(worker.host);
    free->set_backend(worker.backend);
    free->set_ranks(worker.ranks);
    free->set_ms_since_seen(age.count());
    free->set_memory_bytes(worker.memory_bytes);
  }
  return response;
}

std::string Registry::ResolveModelLocked(absl::string_view model) const {
  if (!model.empty()) return std::string(model);
  return options_.models.empty() ? options_.default_model : options_.models.front().name;
}

std::string Registry::ResolveModel(absl::string_view model) const {
  absl::MutexLock lock(&mutex_);
  return ResolveModelLocked(model);
}

bool Registry::ServesLocked(const std::string& resolved) const {
  if (SpecOf(resolved) != nullptr) return true;
  if (options_.models.empty() && resolved == options_.default_model) return true;
  return std::any_of(entries_.begin(), entries_.end(),
                     [&](const Entry& e) { return e.replica->model == resolved; });
}

bool Registry::Serves(absl::string_view model) const {
  absl::MutexLock lock(&mutex_);
  return ServesLocked(ResolveModelLocked(model));
}

const ModelSpec* Registry::SpecOf(const std::string& model) const {
  for (const ModelSpec& spec : options_.models) {
    if (spec.name == model) return &spec;
  }
  return nullptr;
}

std::vector<std::string> Registry::ServedModelsLocked() const {
  std::vector<std::string> names;
  for (const ModelSpec& spec : options_.models) names.push_back(spec.name);
  if (names.empty()) names.push_back(options_.default_model);
  for (const Entry& entry : entries_) {
    if (std::find(names.begin(), names.end(), entry.replica->model) == names.end()) {
      names.push_back(entry.replica->model);
    }
  }
  return names;
}

std::vector<std::string> Registry::ServedModels() const {
  absl::MutexLock lock(&mutex_);
  return ServedModelsLocked();
}

absl::StatusOr<std::vector<std::string>> Registry::Drain(const std::string& replica_id) {
  absl::MutexLock lock(&mutex_);
  std::string key;
  for (const Entry& entry : entries_) {
    if (entry.replica->id != replica_id) continue;
    key = entry.replica->placement_group.empty() ? entry.replica->id
                                                 : entry.replica->placement_group;
  }
  if (key.empty()) {
    std::vector<std::string> ids;
    for (const Entry& entry : entries_) ids.push_back(entry.replica->id);
    return absl::NotFoundError(absl::StrCat("no replica \"", replica_id, "\"; known: ",
                                            ids.empty() ? "none" : absl::StrJoin(ids, ", ")));
  }
  std::vector<std::string> drained;
  for (Entry& entry : entries_) {
    const std::string& k = entry.replica->placement_group.empty()
                               ? entry.replica->id
                               : entry.replica->placement_group;
    if (k != key) continue;
    entry.drain_requested = true;
    drained.push_back(entry.replica->id);
    LOG(INFO) << "replica " << entry.replica->id << " draining on request: no new requests; "
              << "told to leave once its requests are done";
  }
  return drained;
}

bool Registry::DrainRequested(const std::string& replica_id) const {
  absl::MutexLock lock(&mutex_);
  for (const Entry& entry : entries_) {
    if (entry.replica->id == replica_id) return entry.drain_requested;
  }
  return false;
}

int Registry::ReplicasOfLocked(const std::string& model, Clock::time_point now) const {
  std::vector<std::string> groups;
  for (const Entry& entry : entries_) {
    if (entry.replica->model != model || !Healthy(entry, now) || entry.draining()) continue;
    const std::string& key = entry.replica->placement_group.empty()
                                 ? entry.replica->id
                                 : entry.replica->placement_group;
    if (std::find(groups.begin(), groups.end(), key) == groups.end()) groups.push_back(key);
  }
  int n = static_cast<int>(groups.size());
  for (const Assignment& a : assignments_) {
    if (a.model == model && now - a.at <= options_.assignment_timeout) ++n;
  }
  return n;
}

gemma::internal::v1::JoinResponse Registry::Join(const gemma::internal::v1::JoinRequest& request) {
  absl::MutexLock lock(&mutex_);
  const Clock::time_point now = Now();
  PruneLocked(now);
  assignments_.erase(std::remove_if(assignments_.begin(), assignments_.end(),
                                    [&](const Assignment& a) {
                                      return now - a.at > options_.assignment_timeout;
                                    }),
                     assignments_.end());
  forming_.erase(std::remove_if(forming_.begin(), forming_.end(),
                                [&](const Forming& f) {
                                  return now - f.started > options_.assignment_timeout;
                                }),
                 forming_.end());
  gemma::internal::v1::JoinResponse response;
  auto assign = [&](const ModelSpec& spec) {
    free_workers_.erase(request.worker_id());
    response.set_assigned(true);
    response.set_model_name(spec.name);
    response.set_model_path(spec.path);
    response.set_mode(spec.layout.mode);
    response.set_tp(spec.layout.tp);
    response.set_redundant_experts(spec.layout.redundant_experts);
  };
  auto readable = [&](const ModelSpec& spec) {
    return std::find(request.unreadable_models().begin(), request.unreadable_models().end(),
                     spec.name) == request.unreadable_models().end();
  };
  // A worker that turned down what it was given (it cannot read the checkpoint, or its share
  // does not fit) gives it back now rather than at the assignment timeout: its replica's
  // assignment, or its node of a replica being formed, goes to the next worker that fits.
  for (const std::string& declined : request.unreadable_models()) {
    for (auto it = assignments_.begin(); it != assignments_.end(); ++it) {
      if (it->model != declined || it->worker_id != request.worker_id()) continue;
      LOG(INFO) << "worker " << request.worker_id() << " turned down model " << declined
                << "; its assignment goes to the next worker that fits";
      assignments_.erase(it);
      break;
    }
    for (Forming& f : forming_) {
      auto member = f.node_of.find(request.worker_id());
      if (f.model != declined || member == f.node_of.end()) continue;
      LOG(INFO) << "worker " << request.worker_id() << " turned down node " << member->second
                << " of replica " << f.name << "; the next worker that fits takes it";
      f.open_nodes.insert(std::lower_bound(f.open_nodes.begin(), f.open_nodes.end(),
                                           member->second),
                          member->second);
      f.node_of.erase(member);
    }
  }
  // A replica of several workers that is still forming takes the next worker that fits it.
  for (Forming& f : forming_) {
    const ModelSpec* spec = SpecOf(f.model);
    if (f.open_nodes.empty() || spec == nullptr || spec->layout.ranks != request.ranks() ||
        !readable(*spec)) {
      continue;
    }
    const int node = f.open_nodes.front();
    f.open_nodes.erase(f.open_nodes.begin());
    f.node_of[request.worker_id()] = node;
    if (node == 0) {
      // The replica's leader came back (it holds the replica's assignment).
      assignments_.push_back({f.model, request.worker_id(), now});
    }
    assign(*spec);
    response.set_replica(f.name);
    response.set_nodes(f.nodes);
    response.set_node_rank(node);
    LOG(INFO) << "worker " << request.worker_id() << " on " << request.host() << " assigned node "
              << node << " of " << f.nodes << " of replica " << f.name << " (model " << f.model
              << ")";
    return response;
  }
  FreeWorker& free = free_workers_[request.worker_id()];
  free.host = request.host();
  free.backend = request.backend();
  free.ranks = request.ranks();
  free.memory_bytes = request.memory_bytes();
  free.last_seen = now;
  // The model its ranks fit, furthest below its min first (then the fewest replicas against its
  // max), never one at its max or one the worker cannot read.
  const ModelSpec* best = nullptr;
  double best_score = 0;
  std::vector<std::string> unfit;
  for (const ModelSpec& spec : options_.models) {
    if (spec.layout.ranks != request.ranks()) {
      unfit.push_back(absl::StrCat(spec.name, " needs ", spec.layout.ranks, " ranks"));
      continue;
    }
    if (!readable(spec)) {
      unfit.push_back(absl::StrCat(spec.name, ": this worker cannot read ", spec.path, " or hold its weights"));
      continue;
    }
    const int have = ReplicasOfLocked(spec.name, now);
    if (have >= spec.max_replicas) {
      unfit.push_back(absl::StrCat(spec.name, " has its ", spec.max_replicas, " replicas"));
      continue;
    }
    // Below min: 1 + the missing share; else the free share of max.
    const double score = have < spec.min_replicas
                             ? 1.0 + static_cast<double>(spec.min_replicas - have) /
                                         std::max(1, spec.min_replicas)
                             : 1.0 - static_cast<double>(have) / spec.max_replicas;
    if (best == nullptr || score > best_score) {
      best = &spec;
      best_score = score;
    }
  }
  if (best == nullptr) {
    response.set_assigned(false);
    response.set_retry_ms(2000);
    response.set_reason(options_.models.empty()
                            ? "this coordinator has no --models to assign; start the worker "
                              "with --model DIR"
                            : absl::StrCat("no model needs this worker now (",
                                           absl::StrJoin(unfit, "; "), ")"));
    return response;
  }
  assignments_.push_back({best->name, request.worker_id(), now});
  assign(*best);
  if (best->layout.nodes > 1) {
    // The first worker of a new replica of several: it leads; the next ones that fit join it.
    Forming forming;
    forming.model = best->name;
    forming.name = absl::StrCat(best->name, "-", ++formed_);
    forming.nodes = best->layout.nodes;
    for (int node = 1; node < forming.nodes; ++node) forming.open_nodes.push_back(node);
    forming.node_of[request.worker_id()] = 0;
    forming.started = now;
    response.set_replica(forming.name);
    response.set_nodes(forming.nodes);
    response.set_node_rank(0);
    forming_.push_back(std::move(forming));
  }
  LOG(INFO) << "worker " << request.worker_id() << " on " << request.host() << " ("
            << request.ranks() << " " << request.backend() << " ranks) assigned model "
            << best->name << " (" << DescribeLayout(best->layout) << ")";
  return response;
}

bool AddExpertLoad(const gemma::v1::ExpertLoad& window, gemma::v1::ExpertLoad* total) {
  if (window.counts_size() !=
      static_cast<int64_t>(window.num_layers()) * window.num_experts()) {
    return false;
  }
  if (total->counts_size() == 0) {
    total->set_num_layers(window.num_layers());
    total->set_num_experts(window.num_experts());
    total->mutable_counts()->Resize(window.counts_size(), 0);
    total->set_first_step(window.first_step());
    total->set_expert_ranks(window.expert_ranks());
  } else if (total->num_layers() != window.num_layers() ||
             total->num_experts() != window.num_experts()) {
    return false;
  } else if (total->expert_ranks() != window.expert_ranks()) {
    total->set_expert_ranks(0);  // replicas of different layouts: no one split over ranks
  }
  for (int i = 0; i < window.counts_size(); ++i) {
    total->set_counts(i, total->counts(i) + window.counts(i));
  }
  total->set_last_step(window.last_step());
  total->set_windows(total->windows() + std::max<int64_t>(1, window.windows()));
  total->set_recomputed_tokens(total->recomputed_tokens() + window.recomputed_tokens());
  return true;
}

absl::StatusOr<gemma::v1::GetExpertLoadResponse> Registry::ExpertLoad(
    bool include_windows, absl::string_view model) const {
  absl::MutexLock lock(&mutex_);
  const std::string resolved = model.empty() ? options_.default_model : std::string(model);
  if (!ServesLocked(resolved)) {
    return absl::NotFoundError(absl::StrCat("no model \"", resolved, "\" is served (served: ",
                                            absl::StrJoin(ServedModelsLocked(), ", "), ")"));
  }
  gemma::v1::GetExpertLoadResponse response;
  response.set_model(resolved);
  if (auto totals = expert_totals_.find(resolved); totals != expert_totals_.end()) {
    *response.mutable_totals() = totals->second;
  }
  for (const Entry& entry : entries_) {
    if (!model.empty() && entry.replica->model != resolved) continue;
    gemma::v1::ReplicaExpertLoad* replica = response.add_replicas();
    replica->set_replica_id(entry.replica->id);
    replica->set_model(entry.replica->model);
    *replica->mutable_totals() = entry.expert_totals;
    *replica->mutable_placement() = entry.load.expert_placement();
    const std::string& key = entry.replica->placement_group.empty()
                                 ? entry.replica->id
                                 : entry.replica->placement_group;
    if (auto group = groups_.find(key); group != groups_.end()) {
      for (const gemma::v1::RebalanceRecord& r : group->second.switches) {
        *replica->add_switches() = r;
      }
    }
    if (include_windows) {
      for (const gemma::v1::ExpertLoad& w : entry.expert_windows) *replica->add_windows() = w;
    }
  }
  return response;
}

std::vector<gemma::v1::ExpertLoadWindow> Registry::WindowsAfter(
    int64_t after_sequence, const std::string& replica_id, const std::string& model) const {
  absl::MutexLock lock(&mutex_);
  std::vector<gemma::v1::ExpertLoadWindow> out;
  for (const gemma::v1::ExpertLoadWindow& w : recent_windows_) {
    if (w.window().sequence() <= after_sequence) continue;
    if (!replica_id.empty() && w.replica_id() != replica_id) continue;
    if (!model.empty() && w.model() != model) continue;
    out.push_back(w);
  }
  return out;
}

int64_t Registry::LastWindowSequence() const {
  absl::MutexLock lock(&mutex_);
  return last_window_sequence_;
}

std::vector<BalanceGroup> Registry::BalanceGroups(int max_windows, uint64_t epoch) const {
  absl::MutexLock lock(&mutex_);
  const Clock::time_point now = Now();
  std::vector<BalanceGroup> groups;
  for (const Entry& entry : entries_) {
    const gemma::v1::ExpertPlacement& placement = entry.load.expert_placement();
    if (!Healthy(entry, now) || placement.num_ranks() <= 1) continue;
    const std::string key = entry.replica->placement_group.empty()
                                ? entry.replica->id
                                : entry.replica->placement_group;
    auto it = std::find_if(groups.begin(), groups.end(),
                           [&](const BalanceGroup& g) { return g.key == key; });
    if (it == groups.end()) {
      BalanceGroup group;
      group.key = key;
      group.placement = placement;
      group.load.assign(static_cast<size_t>(placement.num_layers()) * placement.num_experts(),
                        0);
      if (auto state = groups_.find(key); state != groups_.end()) {
        group.offer_pending = state->second.offer.has_value();
        group.last_offer = state->second.offered_at;
        if (!state->second.switches.empty()) group.last = state->second.switches.back();
      }
      groups.push_back(std::move(group));
      it = groups.end() - 1;
    } else if (placement.epoch() > it->placement.epoch()) {
      it->placement = placement;  // the freshest
    }
    it->replica_ids.push_back(entry.replica->id);
  }
  for (BalanceGroup& group : groups) {
    const uint64_t want = epoch != 0 ? epoch : group.placement.epoch();
    for (const Entry& entry : entries_) {
      if (std::find(group.replica_ids.begin(), group.replica_ids.end(), entry.replica->id) ==
          group.replica_ids.end()) {
        continue;
      }
      int taken = 0;
      for (auto w = entry.expert_windows.rbegin();
           w != entry.expert_windows.rend() && taken < max_windows; ++w) {
        if (w->placement_epoch() != want ||
            static_cast<size_t>(w->counts_size()) != group.load.size()) {
          continue;
        }
        for (size_t i = 0; i < group.load.size(); ++i) group.load[i] += w->counts(i);
        ++taken;
      }
      group.windows += taken;
    }
  }
  return groups;
}

void Registry::OfferPlacement(const std::string& key, const gemma::v1::ExpertPlacement& placement,
                              gemma::v1::RebalanceRecord record) {
  absl::MutexLock lock(&mutex_);
  GroupState& g = groups_[key];
  g.offer = placement;
  g.offered_at = Now();
  // A newer offer replaces one still pending.
  for (gemma::v1::RebalanceRecord& r : g.switches) {
    if (r.state() == "offered") r.set_state("abandoned");
  }
  g.switches.push_back(std::move(record));
  if (g.switches.size() > 32) g.switches.erase(g.switches.begin());
}

std::optional<gemma::v1::ExpertPlacement> Registry::PendingOffer(
    const std::string& replica_id) const {
  absl::MutexLock lock(&mutex_);
  for (const Entry& entry : entries_) {
    if (entry.replica->id != replica_id) continue;
    const std::string& key = entry.replica->placement_group.empty()
                                 ? entry.replica->id
                                 : entry.replica->placement_group;
    auto it = groups_.find(key);
    if (it == groups_.end() || !it->second.offer) return std::nullopt;
    return it->second.offer;
  }
  return std::nullopt;
}

void Registry::SetMeasured(const std::string& key, uint64_t epoch, double balancedness) {
  absl::MutexLock lock(&mutex_);
  auto it = groups_.find(key);
  if (it == groups_.end()) return;
  for (gemma::v1::RebalanceRecord& r : it->second.switches) {
    if (r.epoch() == epoch) r.set_balancedness_measured(balancedness);
  }
}

}  // namespace gemma::coordinator
