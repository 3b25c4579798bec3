// gemma.internal.v1.Replica on a replica leader: each Generate call becomes one engine request
// whose events are streamed back as they arrive; a cancelled call cancels the request. Knows the
// engine and the proto, nothing of the coordinator.
#pragma once

#include <atomic>
#include <cstdint>

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
  // `engine` (running on another thread) and `tokenizer` (may be null) are not owned.
  ReplicaService(engine::Engine* engine, const tokenizer::Tokenizer* tokenizer)
      : engine_(engine), tokenizer_(tokenizer) {}

  grpc::ServerWriteReactor<gemma::internal::v1::ReplicaGenerateResponse>* Generate(
      grpc::CallbackServerContext* context,
      const gemma::internal::v1::ReplicaGenerateRequest* request) override;

 private:
  engine::Engine* engine_;
  const tokenizer::Tokenizer* tokenizer_;
};

}  // namespace gemma::service
