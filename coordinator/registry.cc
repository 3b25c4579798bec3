#include "coordinator/registry.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
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
  if (have_reference_) {
    if (request.protocol_version() != protocol_version_) {
      return absl::FailedPreconditionError(absl::StrCat(
          "protocol version ", request.protocol_version(), " of the worker at ", request.address(),
          " differs from the cluster's protocol version ", protocol_version_,
          "; run matching builds"));
    }
    if (request.model_fingerprint() != fingerprint_) {
      return absl::FailedPreconditionError(absl::StrCat(
          "model fingerprint ", request.model_fingerprint(), " of the worker at ",
          request.address(), " differs from the cluster's model fingerprint ", fingerprint_,
          "; every worker must load the same checkpoint"));
    }
  } else {
    have_reference_ = true;
    protocol_version_ = request.protocol_version();
    fingerprint_ = request.model_fingerprint();
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
  replica->stub = gemma::internal::v1::Replica::NewStub(
      grpc::CreateChannel(request.address(), grpc::InsecureChannelCredentials()));
  replica->vocab_size = request.vocab_size();
  replica->max_context = request.max_context();
  replica->world_size = request.world_size();
  replica->parallel = request.parallel();
  Entry entry;
  entry.replica = replica;
  entry.last_heartbeat = Now();
  entries_.push_back(std::move(entry));
  LOG(INFO) << "replica " << replica->id << " registered at " << replica->address
            << ", fingerprint " << request.model_fingerprint() << ", vocab "
            << request.vocab_size() << ", max context " << request.max_context() << ", "
            << request.world_size() << " rank(s) " << request.parallel();
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
  for (Entry& entry : entries_) {
    if (entry.replica->id != request.replica_id()) continue;
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
    entry.last_heartbeat = Now();
    entry.load = request;
    for (const gemma::v1::ExpertLoad& window : request.expert_windows()) {
      if (!AddExpertLoad(window, &entry.expert_totals) ||
          !AddExpertLoad(window, &expert_totals_)) {
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
                                                        bool admit) {
  absl::MutexLock lock(&mutex_);
  const Clock::time_point now = Now();
  PruneLocked(now);
  const int64_t limit = options_.max_outstanding_per_replica;
  std::shared_ptr<Replica> best;
  int64_t healthy = 0;
  int64_t in_flight = 0;
  for (const Entry& entry : entries_) {
    if (!Healthy(entry, now)) continue;
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
        "no healthy replica (", entries_.size(),
        " registered); start a gemma-worker or wait for one to heartbeat"));
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

ModelLimits Registry::Limits() const {
  absl::MutexLock lock(&mutex_);
  const Clock::time_point now = Now();
  ModelLimits limits;
  bool any_healthy = false;
  for (const Entry& entry : entries_) any_healthy |= Healthy(entry, now);
  for (const Entry& entry : entries_) {
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
    status->set_max_context(entry.replica->max_context);
  }
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

gemma::v1::GetExpertLoadResponse Registry::ExpertLoad(bool include_windows) const {
  absl::MutexLock lock(&mutex_);
  gemma::v1::GetExpertLoadResponse response;
  *response.mutable_totals() = expert_totals_;
  for (const Entry& entry : entries_) {
    gemma::v1::ReplicaExpertLoad* replica = response.add_replicas();
    replica->set_replica_id(entry.replica->id);
    *replica->mutable_totals() = entry.expert_totals;
    if (include_windows) {
      for (const gemma::v1::ExpertLoad& w : entry.expert_windows) *replica->add_windows() = w;
    }
  }
  return response;
}

std::vector<gemma::v1::ExpertLoadWindow> Registry::WindowsAfter(
    int64_t after_sequence, const std::string& replica_id) const {
  absl::MutexLock lock(&mutex_);
  std::vector<gemma::v1::ExpertLoadWindow> out;
  for (const gemma::v1::ExpertLoadWindow& w : recent_windows_) {
    if (w.window().sequence() <= after_sequence) continue;
    if (!replica_id.empty() && w.replica_id() != replica_id) continue;
    out.push_back(w);
  }
  return out;
}

int64_t Registry::LastWindowSequence() const {
  absl::MutexLock lock(&mutex_);
  return last_window_sequence_;
}

}  // namespace gemma::coordinator
