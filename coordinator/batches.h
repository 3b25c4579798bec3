// Batch jobs on the coordinator: creating them (each item checked and translated, refusals
// recorded per item), running their items through the coordinator's own Inference service at
// batch priority with a bound on items in flight per healthy replica, finishing and cancelling
// them, and the gemma.v1.Batches gRPC service. Everything durable is in the BatchStore: after a
// restart the runner picks up every unfinished batch, and items that were in flight run again.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "coordinator/auth.h"
#include "coordinator/batch_store.h"
#include "coordinator/openai_format.h"
#include "coordinator/registry.h"
#include "gemma/v1/batches.grpc.pb.h"
#include "gemma/v1/inference.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace gemma::coordinator {

struct BatchOptions {
  // Items of batches running at once per healthy replica (at least one in all while any
  // replica is healthy), so interactive requests keep their place.
  int max_in_flight_per_replica = 4;
  int64_t max_items = 100000;        // per batch
  size_t max_line_bytes = 1 << 20;   // per OpenAI input line
  int32_t priority = -1;             // of batch items on the replicas
  // An item that found no replica (UNAVAILABLE) or a full cluster (RESOURCE_EXHAUSTED) waits
  // this long before it is tried again; it never fails for that.
  std::chrono::milliseconds retry_wait{500};
  std::chrono::hours completion_window{24};  // then pending items expire
};

// PERMISSION_DENIED unless `who` may see batch `batch` (its owner, or an admin).
absl::Status MayAccess(const Principal& who, const gemma::v1::Batch& batch);

// The items of an OpenAI batch input file (JSONL): one per non-blank line, numbered from 1 as
// the file's lines are.
std::vector<gemma::v1::BatchItem> OpenAiBatchItems(absl::string_view content);

class BatchRunner {
 public:
  // `inference` reaches this coordinator's Inference service; `store`, `registry` and
  // `openai` must outlive the runner.
  // `internal_token` authenticates its calls to Inference (Authenticator::internal_token).
  BatchRunner(BatchStore* store, Registry* registry, std::shared_ptr<grpc::Channel> inference,
              const OpenAiOptions* openai, BatchOptions options, std::string internal_token);
  ~BatchRunner();  // stops; items in flight stay pending in the store

  void Start();
  void Stop();

  // Checks and commits a batch; it is in_progress when this returns. INVALID_ARGUMENT (the
  // whole batch refused) for a missing or repeated custom_id, an unreadable OpenAI line, or too
  // many items; items that fail their own checks are refused one by one.
  absl::StatusOr<gemma::v1::Batch> Create(const gemma::v1::CreateBatchHeader& header,
                                          const std::vector<gemma::v1::BatchItem>& items);
  absl::StatusOr<gemma::v1::Batch> Cancel(const std::string& id);
  BatchStore& store() { return *store_; }
  const BatchOptions& options() const { return options_; }

 private:
  void Loop();
  void RunItem(BatchItemRecord item, uint64_t thread_key);
  // Moves finished or cancelled batches on; returns after one pass.
  void Advance();
  int Bound();

  BatchStore* store_;
  Registry* registry_;
  std::unique_ptr<gemma::v1::Inference::Stub> stub_;
  const OpenAiOptions* openai_;
  const BatchOptions options_;
  const std::string internal_token_;

  std::mutex mutex_;
  std::condition_variable wake_;
  bool stop_ = false;
  // Items in flight, with their calls (to cancel them), and items waiting out retry_wait.
  std::map<std::pair<std::string, int64_t>, grpc::ClientContext*> running_;
  std::map<std::pair<std::string, int64_t>, std::chrono::steady_clock::time_point> cooling_;
  // Item calls, each on its thread, joined by the loop once they say they are done.
  std::map<uint64_t, std::thread> threads_;
  std::vector<uint64_t> done_threads_;
  uint64_t next_thread_ = 0;
  std::thread loop_;
};

class BatchesService final : public gemma::v1::Batches::Service {
 public:
  // `runner` is read at each call: null (a coordinator without --data-dir, or one still
  // starting) answers FAILED_PRECONDITION.
  BatchesService(const std::atomic<BatchRunner*>* runner, const Authenticator* auth)
      : runner_(runner), auth_(auth) {}
  grpc::Status CreateBatch(grpc::ServerContext* context,
                           grpc::ServerReader<gemma::v1::CreateBatchRequest>* reader,
                           gemma::v1::Batch* response) override;
  grpc::Status GetBatch(grpc::ServerContext* context, const gemma::v1::GetBatchRequest* request,
                        gemma::v1::Batch* response) override;
  grpc::Status ListBatches(grpc::ServerContext* context,
                           const gemma::v1::ListBatchesRequest* request,
                           gemma::v1::ListBatchesResponse* response) override;
  grpc::Status CancelBatch(grpc::ServerContext* context,
                           const gemma::v1::CancelBatchRequest* request,
                           gemma::v1::Batch* response) override;
  grpc::Status StreamResults(grpc::ServerContext* context,
                             const gemma::v1::StreamResultsRequest* request,
                             grpc::ServerWriter<gemma::v1::BatchResult>* writer) override;

 private:
  // The runner for a call `what` (a user or admin token when tokens are on), or why not:
  // FAILED_PRECONDITION saying how to get one. `who` is set to the caller.
  absl::StatusOr<BatchRunner*> Runner(const grpc::ServerContext* context, absl::string_view what,
                                      Principal* who) const;
  const std::atomic<BatchRunner*>* runner_;
  const Authenticator* auth_;
};

}  // namespace gemma::coordinator
