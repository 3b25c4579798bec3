// The coordinator's gRPC services: gemma.v1.Inference (validates, then proxies the stream to a
// replica chosen by the registry), gemma.v1.Cluster, and the internal gemma.internal.v1
// Coordinator (Register, Heartbeat). The only place where Statuses become grpc::Status.
#pragma once

#include "absl/status/status.h"
#include "coordinator/registry.h"
#include "gemma/internal/v1/worker.grpc.pb.h"
#include "gemma/v1/cluster.grpc.pb.h"
#include "gemma/v1/inference.grpc.pb.h"

namespace gemma::coordinator {

// INVALID_ARGUMENT with a message for a request no replica could serve.
absl::Status ValidateGenerateRequest(const gemma::v1::GenerateRequest& request);

class InferenceService final : public gemma::v1::Inference::CallbackService {
 public:
  explicit InferenceService(Registry* registry) : registry_(registry) {}
  grpc::ServerWriteReactor<gemma::v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const gemma::v1::GenerateRequest* request) override;

 private:
  Registry* registry_;
};

class ClusterService final : public gemma::v1::Cluster::CallbackService {
 public:
  explicit ClusterService(Registry* registry) : registry_(registry) {}
  grpc::ServerUnaryReactor* GetStatus(grpc::CallbackServerContext* context,
                                      const gemma::v1::GetStatusRequest* request,
                                      gemma::v1::GetStatusResponse* response) override;

 private:
  Registry* registry_;
};

class CoordinatorService final : public gemma::internal::v1::Coordinator::CallbackService {
 public:
  explicit CoordinatorService(Registry* registry) : registry_(registry) {}
  grpc::ServerUnaryReactor* Register(grpc::CallbackServerContext* context,
                                     const gemma::internal::v1::RegisterRequest* request,
                                     gemma::internal::v1::RegisterResponse* response) override;
  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* context,
                                      const gemma::internal::v1::HeartbeatRequest* request,
                                      gemma::internal::v1::HeartbeatResponse* response) override;

 private:
  Registry* registry_;
};

}  // namespace gemma::coordinator
