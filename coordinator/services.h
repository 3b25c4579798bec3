// The coordinator's gRPC services: gemma.v1.Inference (Generate: checked, admitted and proxied
// to a replica by proxy.h, moved to another replica when one fails), gemma.v1.Cluster, and the
// internal gemma.internal.v1.Coordinator for workers (Register, Heartbeat, and the rendezvous
// store's StoreSet, StoreGet, StoreAdd, StoreDeletePrefix). ToGrpc is the one conversion of a
// Status into a grpc::Status.
#pragma once

#include "absl/status/status.h"
#include "coordinator/auth.h"
#include "coordinator/proxy.h"
#include "coordinator/rebalancer.h"
#include "coordinator/registry.h"
#include "coordinator/store.h"
#include "coordinator/timer.h"
#include "gemma/internal/v1/worker.grpc.pb.h"
#include "gemma/v1/cluster.grpc.pb.h"
#include "gemma/v1/inference.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "proto/status_convert.h"

namespace gemma::coordinator {

using gemma::ToGrpc;  // proto/status_convert.h

class InferenceService final : public gemma::v1::Inference::CallbackService {
 public:
  // `auth` (not owned) decides who may call; every service here checks it.
  InferenceService(Registry* registry, ProxyOptions options, const Authenticator* auth)
      : registry_(registry), options_(options), auth_(auth) {}
  grpc::ServerWriteReactor<gemma::v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const gemma::v1::GenerateRequest* request) override;

 private:
  Registry* registry_;
  const ProxyOptions options_;
  const Authenticator* auth_;
  Timer timer_;  // the waits for a replica after a failure
};

class ClusterService final : public gemma::v1::Cluster::CallbackService {
 public:
  // `rebalancer` (not owned) may be null: Rebalance is then UNIMPLEMENTED.
  ClusterService(Registry* registry, const Authenticator* auth, Rebalancer* rebalancer = nullptr)
      : registry_(registry), auth_(auth), rebalancer_(rebalancer) {}
  grpc::ServerUnaryReactor* GetStatus(grpc::CallbackServerContext* context,
                                      const gemma::v1::GetStatusRequest* request,
                                      gemma::v1::GetStatusResponse* response) override;
  grpc::ServerUnaryReactor* GetExpertLoad(grpc::CallbackServerContext* context,
                                          const gemma::v1::GetExpertLoadRequest* request,
                                          gemma::v1::GetExpertLoadResponse* response) override;
  // Polls the registry every kWatchPollMs on the timer thread (no gRPC thread waits).
  grpc::ServerWriteReactor<gemma::v1::ExpertLoadWindow>* WatchExpertLoad(
      grpc::CallbackServerContext* context,
      const gemma::v1::WatchExpertLoadRequest* request) override;
  static constexpr int kWatchPollMs = 100;
  // Admin only.
  grpc::ServerUnaryReactor* Drain(grpc::CallbackServerContext* context,
                                  const gemma::v1::DrainRequest* request,
                                  gemma::v1::DrainResponse* response) override;
  // Admin only.
  grpc::ServerUnaryReactor* Rebalance(grpc::CallbackServerContext* context,
                                      const gemma::v1::RebalanceRequest* request,
                                      gemma::v1::RebalanceResponse* response) override;

 private:
  Registry* registry_;
  const Authenticator* auth_;
  Rebalancer* rebalancer_;
  Timer timer_;
};

class CoordinatorService final : public gemma::internal::v1::Coordinator::CallbackService {
 public:
  CoordinatorService(Registry* registry, Store* store, const Authenticator* auth)
      : registry_(registry), store_(store), auth_(auth) {}
  grpc::ServerUnaryReactor* Register(grpc::CallbackServerContext* context,
                                     const gemma::internal::v1::RegisterRequest* request,
                                     gemma::internal::v1::RegisterResponse* response) override;
  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* context,
                                      const gemma::internal::v1::HeartbeatRequest* request,
                                      gemma::internal::v1::HeartbeatResponse* response) override;
  grpc::ServerUnaryReactor* Join(grpc::CallbackServerContext* context,
                                 const gemma::internal::v1::JoinRequest* request,
                                 gemma::internal::v1::JoinResponse* response) override;
  grpc::ServerUnaryReactor* StoreSet(grpc::CallbackServerContext* context,
                                     const gemma::internal::v1::StoreSetRequest* request,
                                     gemma::internal::v1::StoreSetResponse* response) override;
  // Waits for the key without holding a gRPC thread.
  grpc::ServerUnaryReactor* StoreGet(grpc::CallbackServerContext* context,
                                     const gemma::internal::v1::StoreGetRequest* request,
                                     gemma::internal::v1::StoreGetResponse* response) override;
  grpc::ServerUnaryReactor* StoreAdd(grpc::CallbackServerContext* context,
                                     const gemma::internal::v1::StoreAddRequest* request,
                                     gemma::internal::v1::StoreAddResponse* response) override;
  grpc::ServerUnaryReactor* StoreDeletePrefix(
      grpc::CallbackServerContext* context,
      const gemma::internal::v1::StoreDeletePrefixRequest* request,
      gemma::internal::v1::StoreDeletePrefixResponse* response) override;

 private:
  Registry* registry_;
  Store* store_;
  const Authenticator* auth_;
};

}  // namespace gemma::coordinator
