#include "coordinator/services.h"

#include <memory>
#include <optional>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "glog/logging.h"

namespace gemma::coordinator {
namespace {

using gemma::v1::GenerateRequest;
using gemma::v1::GenerateResponse;

constexpr int64_t kHeartbeatIntervalMs = 1000;

// The one conversion from absl::Status to grpc::Status in the coordinator.
grpc::Status ToGrpc(const absl::Status& status) {
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()),
                      std::string(status.message()));
}

grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context,
                                      const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpc(status));
  return reactor;
}

// Relays a replica's stream to the client, one message at a time: a read from the replica, then
// a write to the client, then the next read. The client's deadline and cancellation reach the
// replica through the client context. Deletes itself once both calls are done.
class ProxyReactor final : public grpc::ServerWriteReactor<GenerateResponse> {
 public:
  ProxyReactor(grpc::CallbackServerContext* server_context, const GenerateRequest& request,
               Registry* registry)
      : upstream_(this) {
    absl::Status valid = ValidateGenerateRequest(request);
    absl::StatusOr<std::shared_ptr<Replica>> replica =
        valid.ok() ? registry->Pick() : absl::StatusOr<std::shared_ptr<Replica>>(valid);
    if (!replica.ok()) {
      upstream_done_ = true;
      finished_ = true;
      Finish(ToGrpc(replica.status()));
      return;
    }
    replica_ = *replica;
    VLOG(1) << "request '" << request.request_id() << "' -> replica " << replica_->id;
    client_context_ = grpc::ClientContext::FromCallbackServerContext(*server_context);
    replica_->stub->async()->Generate(client_context_.get(), &request, &upstream_);
    upstream_.StartRead(&message_);
    upstream_.StartCall();
  }

  void OnWriteDone(bool ok) override {
    bool finish = false;
    grpc::Status status;
    {
      absl::MutexLock lock(&mutex_);
      writing_ = false;
      if (upstream_status_.has_value()) {
        finish = !finished_;
        finished_ = true;
        status = *upstream_status_;
      } else if (!ok) {
        client_context_->TryCancel();
      } else {
        upstream_.StartRead(&message_);
      }
    }
    if (finish) Finish(status);
  }

  void OnCancel() override {
    absl::MutexLock lock(&mutex_);
    if (client_context_ != nullptr) client_context_->TryCancel();
  }

  void OnDone() override {
    bool last;
    {
      absl::MutexLock lock(&mutex_);
      server_done_ = true;
      last = upstream_done_;
    }
    if (last) delete this;
  }

 private:
  class Upstream final : public grpc::ClientReadReactor<GenerateResponse> {
   public:
    explicit Upstream(ProxyReactor* proxy) : proxy_(proxy) {}
    void OnReadDone(bool ok) override { proxy_->OnUpstreamRead(ok); }
    void OnDone(const grpc::Status& status) override { proxy_->OnUpstreamDone(status); }

   private:
    ProxyReactor* proxy_;
  };

  void OnUpstreamRead(bool ok) {
    if (!ok) return;  // the status follows in OnUpstreamDone
    absl::MutexLock lock(&mutex_);
    writing_ = true;
    outgoing_ = std::move(message_);
    message_.Clear();
    StartWrite(&outgoing_);
  }

  void OnUpstreamDone(const grpc::Status& status) {
    replica_->outstanding.fetch_sub(1);
    grpc::Status relayed = status;
    if (status.error_code() == grpc::StatusCode::UNAVAILABLE) {
      // A transport failure names the replica, not the client's connection.
      relayed = grpc::Status(status.error_code(),
                             absl::StrCat("replica ", replica_->id, " at ", replica_->address,
                                          " is unavailable: ", status.error_message()));
      LOG(WARNING) << relayed.error_message();
    }
    bool finish = false;
    bool last;
    {
      absl::MutexLock lock(&mutex_);
      upstream_status_ = relayed;
      if (!writing_ && !finished_) {
        finish = true;
        finished_ = true;
      }
      upstream_done_ = true;
      last = server_done_;
    }
    if (finish) Finish(relayed);
    if (last) delete this;
  }

  Upstream upstream_;
  std::shared_ptr<Replica> replica_;
  std::unique_ptr<grpc::ClientContext> client_context_;
  GenerateResponse message_;   // being read from the replica
  GenerateResponse outgoing_;  // being written to the client
  absl::Mutex mutex_;
  bool writing_ = false;
  bool finished_ = false;
  bool server_done_ = false;
  bool upstream_done_ = false;
  std::optional<grpc::Status> upstream_status_;
};

}  // namespace

absl::Status ValidateGenerateRequest(const GenerateRequest& request) {
  switch (request.input_case()) {
    case GenerateRequest::kText:
      if (request.text().empty()) return absl::InvalidArgumentError("text is empty");
      break;
    case GenerateRequest::kTokenIds:
      if (request.token_ids().ids().empty()) {
        return absl::InvalidArgumentError("token_ids is empty; give at least one id");
      }
      for (int32_t id : request.token_ids().ids()) {
        if (id < 0) return absl::InvalidArgumentError(absl::StrCat("token id ", id, " is negative"));
      }
      break;
    default:
      return absl::InvalidArgumentError("the request has no input; set text or token_ids");
  }
  const gemma::v1::SamplingParams& sampling = request.sampling();
  if (sampling.temperature() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be >= 0 (0 is greedy), got ", sampling.temperature()));
  }
  if (sampling.top_k() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_k must be >= 0 (0 keeps every token), got ", sampling.top_k()));
  }
  if (sampling.has_top_p() && !(sampling.top_p() > 0 && sampling.top_p() <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_p must be in (0, 1], got ", sampling.top_p()));
  }
  if (request.max_tokens() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens must be >= 0 (0: the default), got ", request.max_tokens()));
  }
  return absl::OkStatus();
}

grpc::ServerWriteReactor<GenerateResponse>* InferenceService::Generate(
    grpc::CallbackServerContext* context, const GenerateRequest* request) {
  return new ProxyReactor(context, *request, registry_);
}

grpc::ServerUnaryReactor* ClusterService::GetStatus(grpc::CallbackServerContext* context,
                                                    const gemma::v1::GetStatusRequest*,
                                                    gemma::v1::GetStatusResponse* response) {
  *response = registry_->Status();
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* CoordinatorService::Register(
    grpc::CallbackServerContext* context, const gemma::internal::v1::RegisterRequest* request,
    gemma::internal::v1::RegisterResponse* response) {
  absl::StatusOr<std::string> id = registry_->Register(*request);
  if (!id.ok()) {
    LOG(WARNING) << "refused a worker: " << id.status().message();
    return FinishUnary(context, id.status());
  }
  response->set_replica_id(*id);
  response->set_heartbeat_interval_ms(kHeartbeatIntervalMs);
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* CoordinatorService::Heartbeat(
    grpc::CallbackServerContext* context, const gemma::internal::v1::HeartbeatRequest* request,
    gemma::internal::v1::HeartbeatResponse* response) {
  response->set_known(registry_->Heartbeat(*request));
  return FinishUnary(context, absl::OkStatus());
}

}  // namespace gemma::coordinator
