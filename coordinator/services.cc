#include "coordinator/services.h"

#include <chrono>
#include <deque>
#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "glog/logging.h"

namespace gemma::coordinator {
namespace {

namespace iv1 = gemma::internal::v1;

constexpr int64_t kHeartbeatIntervalMs = 1000;

grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context,
                                      const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpc(status));
  return reactor;
}

// One StoreGet: a waiter in the store, completed by a Set, the store's timer, or the call's
// cancellation (the client's deadline, or the server shutting down).
class StoreGetReactor final : public grpc::ServerUnaryReactor {
 public:
  StoreGetReactor(Store* store, const iv1::StoreGetRequest& request,
                  iv1::StoreGetResponse* response)
      : store_(store) {
    // OnCancel runs only after this constructor has returned, so waiter_ is set by then.
    waiter_ = store_->Get(request.key(), std::chrono::milliseconds(request.timeout_ms()),
                          [this, response](absl::StatusOr<std::string> value) {
                            if (value.ok()) {
                              response->set_value(*std::move(value));
                              Finish(grpc::Status::OK);
                            } else {
                              Finish(ToGrpc(value.status()));
                            }
                          });
  }
  void OnCancel() override { store_->CancelGet(waiter_); }
  void OnDone() override { delete this; }

 private:
  Store* store_;
  uint64_t waiter_ = 0;
};

// A server stream refused before it starts.
template <typename T>
class RefusedStream final : public grpc::ServerWriteReactor<T> {
 public:
  explicit RefusedStream(const absl::Status& status) { this->Finish(ToGrpc(status)); }
  void OnDone() override { delete this; }
};

}  // namespace

grpc::ServerWriteReactor<gemma::v1::GenerateResponse>* InferenceService::Generate(
    grpc::CallbackServerContext* context, const gemma::v1::GenerateRequest* request) {
  if (absl::Status auth = auth_->Check(context->client_metadata(), {Role::kUser}, "Generate");
      !auth.ok()) {
    return new RefusedStream<gemma::v1::GenerateResponse>(auth);
  }
  return StartGenerateProxy(context, *request, registry_, &timer_, options_);
}

grpc::ServerUnaryReactor* ClusterService::GetStatus(grpc::CallbackServerContext* context,
                                                    const gemma::v1::GetStatusRequest*,
                                                    gemma::v1::GetStatusResponse* response) {
  if (absl::Status auth = auth_->Check(context->client_metadata(), {Role::kUser}, "GetStatus");
      !auth.ok()) {
    return FinishUnary(context, auth);
  }
  *response = registry_->Status();
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* ClusterService::GetExpertLoad(
    grpc::CallbackServerContext* context, const gemma::v1::GetExpertLoadRequest* request,
    gemma::v1::GetExpertLoadResponse* response) {
  if (absl::Status auth = auth_->Check(context->client_metadata(), {Role::kUser}, "GetExpertLoad");
      !auth.ok()) {
    return FinishUnary(context, auth);
  }
  absl::StatusOr<gemma::v1::GetExpertLoadResponse> load =
      registry_->ExpertLoad(request->include_windows(), request->model());
  if (!load.ok()) return FinishUnary(context, load.status());
  *response = *std::move(load);
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* ClusterService::Drain(grpc::CallbackServerContext* context,
                                                const gemma::v1::DrainRequest* request,
                                                gemma::v1::DrainResponse* response) {
  if (absl::Status auth = auth_->Check(context->client_metadata(), {}, "Drain"); !auth.ok()) {
    return FinishUnary(context, auth);
  }
  absl::StatusOr<std::vector<std::string>> drained = registry_->Drain(request->replica_id());
  if (!drained.ok()) return FinishUnary(context, drained.status());
  for (const std::string& id : *drained) response->add_replica_ids(id);
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* ClusterService::Rebalance(grpc::CallbackServerContext* context,
                                                    const gemma::v1::RebalanceRequest* request,
                                                    gemma::v1::RebalanceResponse* response) {
  // Moving experts is the operator's call: admin only.
  if (absl::Status auth = auth_->Check(context->client_metadata(), {}, "Rebalance"); !auth.ok()) {
    return FinishUnary(context, auth);
  }
  if (rebalancer_ == nullptr) {
    return FinishUnary(context, absl::UnimplementedError("this coordinator does not rebalance"));
  }
  *response = rebalancer_->Rebalance(*request);
  if (!request->replica_id().empty() && response->replicas_size() == 0) {
    // Say which of the conditions the named replica misses.
    std::string why = "is not known (gemmactl status lists the replicas)";
    const gemma::v1::GetStatusResponse status = registry_->Status();
    for (const gemma::v1::ReplicaStatus& r : status.replicas()) {
      if (r.id() != request->replica_id()) continue;
      why = !r.healthy() ? "is not healthy"
                         : absl::StrCat("has no experts spread over ranks to move (its model ",
                                        r.model(), " is dense, or one rank holds every expert: ",
                                        r.parallel(), ")");
    }
    return FinishUnary(context, absl::NotFoundError(absl::StrCat(
                                    "nothing to rebalance: replica ", request->replica_id(), " ",
                                    why)));
  }
  return FinishUnary(context, absl::OkStatus());
}

namespace {

// One WatchExpertLoad stream: sends the windows that arrived since the last one sent, and when
// there are none looks again after kWatchPollMs on the timer. Every reaction and the timer's
// polls take the state's mutex; once the reactor is done the polls find it gone.
class WatchReactor : public grpc::ServerWriteReactor<gemma::v1::ExpertLoadWindow> {
 public:
  WatchReactor(Registry* registry, Timer* timer, const gemma::v1::WatchExpertLoadRequest& request)
      : registry_(registry), timer_(timer), state_(std::make_shared<State>()),
        replica_(request.replica_id()),
        model_(request.model()),
        after_(request.after_sequence() > 0 ? request.after_sequence()
                                            : registry->LastWindowSequence()) {
    state_->reactor = this;
    absl::MutexLock lock(&state_->mutex);
    PollLocked();
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&state_->mutex);
    writing_ = false;
    if (!ok) {
      FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "the client left"));
      return;
    }
    PollLocked();
  }
  void OnCancel() override {
    absl::MutexLock lock(&state_->mutex);
    cancelled_ = true;
    if (timer_id_ != 0) timer_->Cancel(timer_id_);
    if (!writing_) FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
  }
  void OnDone() override {
    {
      absl::MutexLock lock(&state_->mutex);
      state_->reactor = nullptr;
    }
    delete this;
  }

 private:
  struct State {
    absl::Mutex mutex;
    WatchReactor* reactor = nullptr;
  };

  void PollLocked() {
    if (cancelled_ || finished_ || writing_) return;
    if (pending_.empty()) {
      for (auto& w : registry_->WindowsAfter(after_, replica_, model_)) {
        pending_.push_back(std::move(w));
      }
    }
    if (!pending_.empty()) {
      current_ = std::move(pending_.front());
      pending_.pop_front();
      after_ = current_.window().sequence();
      writing_ = true;
      StartWrite(&current_);
      return;
    }
    std::shared_ptr<State> state = state_;
    timer_id_ = timer_->Schedule(
        Timer::Clock::now() + std::chrono::milliseconds(ClusterService::kWatchPollMs),
        [state] {
          absl::MutexLock lock(&state->mutex);
          if (state->reactor != nullptr) {
            state->reactor->timer_id_ = 0;
            state->reactor->PollLocked();
          }
        });
  }
  void FinishLocked(const grpc::Status& status) {
    if (finished_) return;
    finished_ = true;
    Finish(status);
  }

  Registry* registry_;
  Timer* timer_;
  std::shared_ptr<State> state_;
  const std::string replica_;
  const std::string model_;
  int64_t after_;
  std::deque<gemma::v1::ExpertLoadWindow> pending_;
  gemma::v1::ExpertLoadWindow current_;
  bool writing_ = false;
  bool cancelled_ = false;
  bool finished_ = false;
  uint64_t timer_id_ = 0;
};

}  // namespace

grpc::ServerWriteReactor<gemma::v1::ExpertLoadWindow>* ClusterService::WatchExpertLoad(
    grpc::CallbackServerContext* context, const gemma::v1::WatchExpertLoadRequest* request) {
  if (absl::Status auth =
          auth_->Check(context->client_metadata(), {Role::kUser}, "WatchExpertLoad");
      !auth.ok()) {
    return new RefusedStream<gemma::v1::ExpertLoadWindow>(auth);
  }
  return new WatchReactor(registry_, &timer_, *request);
}

grpc::ServerUnaryReactor* CoordinatorService::Register(grpc::CallbackServerContext* context,
                                                       const iv1::RegisterRequest* request,
                                                       iv1::RegisterResponse* response) {
  if (absl::Status auth = auth_->Check(context->client_metadata(), {Role::kWorker}, "Register");
      !auth.ok()) {
    return FinishUnary(context, auth);
  }
  absl::StatusOr<std::string> id = registry_->Register(*request);
  if (!id.ok()) {
    LOG(WARNING) << "refused a worker: " << id.status().message();
    return FinishUnary(context, id.status());
  }
  response->set_replica_id(*id);
  response->set_heartbeat_interval_ms(kHeartbeatIntervalMs);
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* CoordinatorService::Heartbeat(grpc::CallbackServerContext* context,
                                                        const iv1::HeartbeatRequest* request,
                                                        iv1::HeartbeatResponse* response) {
  if (absl::Status auth = auth_->Check(context->client_metadata(), {Role::kWorker}, "Heartbeat");
      !auth.ok()) {
    return FinishUnary(context, auth);
  }
  response->set_known(registry_->Heartbeat(*request));
  if (response->known()) {
    response->set_drain(registry_->DrainRequested(request->replica_id()));
    if (std::optional<gemma::v1::ExpertPlacement> offer =
            registry_->PendingOffer(request->replica_id())) {
      *response->mutable_expert_placement() = *std::move(offer);
    }
  }
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* CoordinatorService::Join(grpc::CallbackServerContext* context,
                                                   const iv1::JoinRequest* request,
                                                   iv1::JoinResponse* response) {
  if (absl::Status auth = auth_->Check(context->client_metadata(), {Role::kWorker}, "Join");
      !auth.ok()) {
    return FinishUnary(context, auth);
  }
  if (request->worker_id().empty() || request->ranks() <= 0) {
    return FinishUnary(context, absl::InvalidArgumentError(
                                    "Join: a worker id and a positive rank count are required"));
  }
  *response = registry_->Join(*request);
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* CoordinatorService::StoreSet(grpc::CallbackServerContext* context,
                                                       const iv1::StoreSetRequest* request,
                                                       iv1::StoreSetResponse*) {
  if (absl::Status auth = auth_->Check(context->client_metadata(), {Role::kWorker}, "StoreSet");
      !auth.ok()) {
    return FinishUnary(context, auth);
  }
  return FinishUnary(context, store_->Set(request->key(), request->value()));
}

grpc::ServerUnaryReactor* CoordinatorService::StoreGet(grpc::CallbackServerContext* context,
                                                       const iv1::StoreGetRequest* request,
                                                       iv1::StoreGetResponse* response) {
  if (absl::Status auth = auth_->Check(context->client_metadata(), {Role::kWorker}, "StoreGet");
      !auth.ok()) {
    return FinishUnary(context, auth);
  }
  return new StoreGetReactor(store_, *request, response);
}

grpc::ServerUnaryReactor* CoordinatorService::StoreAdd(grpc::CallbackServerContext* context,
                                                       const iv1::StoreAddRequest* request,
                                                       iv1::StoreAddResponse* response) {
  if (absl::Status auth = auth_->Check(context->client_metadata(), {Role::kWorker}, "StoreAdd");
      !auth.ok()) {
    return FinishUnary(context, auth);
  }
  absl::StatusOr<int64_t> value = store_->Add(request->key(), request->delta());
  if (value.ok()) response->set_value(*value);
  return FinishUnary(context, value.status());
}

grpc::ServerUnaryReactor* CoordinatorService::StoreDeletePrefix(
    grpc::CallbackServerContext* context, const iv1::StoreDeletePrefixRequest* request,
    iv1::StoreDeletePrefixResponse* response) {
  if (absl::Status auth = auth_->Check(context->client_metadata(), {Role::kWorker}, "StoreDeletePrefix");
      !auth.ok()) {
    return FinishUnary(context, auth);
  }
  absl::StatusOr<int64_t> deleted = store_->DeletePrefix(request->prefix());
  if (deleted.ok()) response->set_deleted(*deleted);
  return FinishUnary(context, deleted.status());
}

}  // namespace gemma::coordinator
