// gemma.internal.v1.Replica on a replica leader: each Generate call becomes one engine request
// whose events are streamed back as they arrive; a cancelled call cancels the request. Knows the
// engine and the proto, nothing of the coordinator.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <utility>

#include "gemma/internal/v1/worker.grpc.pb.h"
#include "common/tokenizer/tokenizer.h"
#include "worker/engine/engine.h"

namespace gemma::service {

// What the heartbeat reports, refreshed by the engine's step observer.
struct ReplicaLoad {
  std::atomic<int64_t> running{0};
  std::atomic<int64_t> waiting{0};
  std::atomic<int64_t> pages_used[2] = {0, 0};
  std::atomic<int64_t> pages_total[2] = {0, 0};
  std::atomic<int64_t> preemptions{0};
};

class ReplicaService final : public gemma::internal::v1::Replica::CallbackService {
 public:
  // `engine` (running on another thread) and `tokenizer` (may be null) are not owned. With
  // `caller_name`, a call is taken only from a TLS client whose certificate names it (a DNS
  // subject alternative name or the common name): over mutual TLS, the coordinator alone, not
  // every holder of a certificate from the same CA (another worker's, say).
  ReplicaService(engine::Engine* engine, const tokenizer::Tokenizer* tokenizer,
                 std::string caller_name = "")
      : engine_(engine), tokenizer_(tokenizer), caller_name_(std::move(caller_name)) {}

  grpc::ServerWriteReactor<gemma::internal::v1::ReplicaGenerateResponse>* Generate(
      grpc::CallbackServerContext* context,
      const gemma::internal::v1::ReplicaGenerateRequest* request) override;

 private:
  engine::Engine* engine_;
  const tokenizer::Tokenizer* tokenizer_;
  std::string caller_name_;
};

}  // namespace gemma::service
