#include "coordinator/registry.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "glog/logging.h"
#include "grpcpp/grpcpp.h"

namespace gemma::coordinator {

absl::StatusOr<std::string> Registry::Register(
    const gemma::internal::v1::RegisterRequest& request) {
  if (request.address().empty()) {
    return absl::InvalidArgumentError("Register: the worker sent no address to dial");
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
  entries_.erase(std::remove_if(entries_.begin(), entries_.end(),
                                [&](const Entry& e) {
                                  return e.replica->address == request.address();
                                }),
                 entries_.end());
  auto replica = std::make_shared<Replica>();
  replica->id = absl::StrCat("r", next_id_++);
  replica->address = request.address();
  replica->stub = gemma::internal::v1::Replica::NewStub(
      grpc::CreateChannel(request.address(), grpc::InsecureChannelCredentials()));
  Entry entry;
  entry.replica = replica;
  entry.last_heartbeat = Clock::now();
  entries_.push_back(std::move(entry));
  LOG(INFO) << "replica " << replica->id << " registered at " << replica->address
            << ", fingerprint " << request.model_fingerprint();
  return replica->id;
}

bool Registry::Heartbeat(const gemma::internal::v1::HeartbeatRequest& request) {
  absl::MutexLock lock(&mutex_);
  for (Entry& entry : entries_) {
    if (entry.replica->id == request.replica_id()) {
      entry.last_heartbeat = Clock::now();
      entry.load = request;
      return true;
    }
  }
  return false;
}

absl::StatusOr<std::shared_ptr<Replica>> Registry::Pick() {
  absl::MutexLock lock(&mutex_);
  const Clock::time_point now = Clock::now();
  std::shared_ptr<Replica> best;
  for (const Entry& entry : entries_) {
    if (!Healthy(entry, now)) continue;
    if (best == nullptr || entry.replica->outstanding.load() < best->outstanding.load()) {
      best = entry.replica;
    }
  }
  if (best == nullptr) {
    return absl::UnavailableError(absl::StrCat(
        "no healthy replica (", entries_.size(),
        " registered); start a gemma-worker or wait for one to heartbeat"));
  }
  best->outstanding.fetch_add(1);
  return best;
}

gemma::v1::GetStatusResponse Registry::Status() const {
  gemma::v1::GetStatusResponse response;
  absl::MutexLock lock(&mutex_);
  const Clock::time_point now = Clock::now();
  response.set_protocol_version(protocol_version_);
  response.set_model_fingerprint(fingerprint_);
  for (const Entry& entry : entries_) {
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
  }
  return response;
}

}  // namespace gemma::coordinator
