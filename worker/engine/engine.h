// The replica leader's engine loop: continuous batching over the paged KV cache, chunked
// prefill under a per-step token budget, preemption and recomputation, sampling and stop
// conditions, token streaming by callback or queue. No RPC: the cluster services wrap it.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/model_config.h"
#include "common/tokenizer/tokenizer.h"
#include "worker/model/gemma4/kv_cache.h"
#include "worker/engine/request.h"
#include "worker/engine/scheduler.h"
#include "worker/engine/step_executor.h"
#include "worker/model/gemma4/model.h"

namespace gemma::engine {

struct EngineOptions {
  SchedulerOptions scheduler;
  // Decodes text for stop strings and RequestOutput::text; not owned, may be null (then a
  // request with stop strings is refused).
  const tokenizer::Tokenizer* tokenizer = nullptr;
  // Ids that end every request (unless it sets ignore_end_ids); empty: the config's eos ids.
  std::vector<int32_t> end_ids;
  // Seeds the seeds of requests that bring none.
  uint64_t seed = 0;
};

// What one Step() did; also handed to the step observer.
struct StepStats {
  uint64_t step = 0;            // 1 for the first executed step
  int64_t num_running = 0;      // after the step (finished sequences gone)
  int64_t num_waiting = 0;
  int64_t num_scheduled = 0;    // sequences in this step's batch
  int64_t num_preempted = 0;    // preempted while planning this step
  int64_t tokens_prefilled = 0; // prompt and recomputation tokens fed
  int64_t tokens_decoded = 0;   // decode tokens fed
  // Of the prefill tokens, those re-fed after a preemption (positions computed before).
  int64_t tokens_recomputed = 0;
  int64_t num_finished = 0;     // requests that finished (any reason) in this step
  int64_t pages_used[2] = {0, 0};   // per pool (kSlidingPool, kFullPool), after the step
  int64_t pages_total[2] = {0, 0};
};

// Totals since the engine was created.
struct EngineCounters {
  uint64_t steps = 0;
  int64_t preemptions = 0;
  int64_t tokens_prefilled = 0;
  int64_t tokens_decoded = 0;
  int64_t tokens_recomputed = 0;
  int64_t requests_submitted = 0;
  int64_t requests_finished = 0;
  int64_t requests_cancelled = 0;
};

// A sequence as the scheduler holds it, for tests and debugging views.
struct SequenceView {
  uint64_t id = 0;
  SequenceState state = SequenceState::kWaiting;
  int64_t cached_positions = 0;        // kv.length
  int64_t num_generated = 0;
  int64_t pages_held[2] = {0, 0};
  int64_t sliding_positions_held = 0;  // now
  int64_t sliding_positions_peak = 0;  // during the latest step that scheduled it
  int64_t last_chunk = 0;              // tokens fed in that step
  int64_t num_preemptions = 0;
};

class Engine {
 public:
  // A single-rank engine over `model` and `cache` (neither owned; both must outlive it).
  static absl::StatusOr<std::unique_ptr<Engine>> Create(gemma4::Model* model, KvCache* cache,
                                                        const EngineOptions& options);
  // An engine whose steps run through `executor` (e.g. a multi-rank one); `config` is the
  // model's, `cache` the leader's.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(std::unique_ptr<StepExecutor> executor,
                                                        const ModelConfig& config, KvCache* cache,
                                                        const EngineOptions& options);
  ~Engine();

  // Queues a request; it joins the batch at a later Step(). Returns its id. INVALID_ARGUMENT for
  // an empty prompt, ids outside the vocabulary, max_tokens < 1, bad sampling values, stop
  // strings without a tokenizer, or more positions than max_position_embeddings;
  // RESOURCE_EXHAUSTED when the request could not fit in the KV pools even alone.
  // Thread-safe; `callback` is called from the stepping thread (see OutputCallback).
  absl::StatusOr<uint64_t> Submit(Request request, OutputCallback callback);
  // Cancels a request: at the start of the next Step() its pages are freed and it receives its
  // final event (kCancelled). Unknown or finished ids are ignored. Thread-safe.
  void Cancel(uint64_t request_id);

  // Runs one step: applies submissions and cancellations, plans the batch, runs one forward
  // call, samples, applies stop conditions and delivers events. A step with nothing to run
  // returns stats with num_scheduled = 0. A failed forward call fails every request of the
  // batch (kError) and returns the error. One thread at a time.
  absl::StatusOr<StepStats> Step();
  // Steps until no request is left (or a step fails).
  absl::Status RunUntilIdle();
  // Steps until `*stop` is set, waiting (not spinning) while there is no work.
  absl::Status Run(const std::atomic<bool>* stop);

  // Submitted requests not yet finished. Thread-safe.
  bool HasWork() const;
  // Waits up to `timeout` for a live request or a cancellation; whether there is one.
  bool WaitForWork(absl::Duration timeout);
  EngineCounters counters() const;  // thread-safe
  // Called at the end of every executed step, on the stepping thread.
  void set_step_observer(std::function<void(const StepStats&)> observer) {
    step_observer_ = std::move(observer);
  }
  // The scheduler's sequences; call from the stepping thread only (e.g. a step observer).
  std::vector<SequenceView> Sequences() const;
  const KvCache& cache() const { return *cache_; }
  const std::vector<int32_t>& end_ids() const { return end_ids_; }

 private:
  Engine(std::unique_ptr<StepExecutor> executor, const ModelConfig& config, KvCache* cache,
         const EngineOptions& options);
  struct Event {
    OutputCallback callback;
    RequestOutput output;
  };
  absl::Status Validate(const Request& request) const;
  // Applies the token sampled for `s`; true when `s` finished.
  bool OnToken(Sequence& s, int32_t token, RequestOutput* output);
  void Finish(Sequence& s, FinishReason reason, RequestOutput* output);
  void Deliver(std::vector<Event>* events);

  std::unique_ptr<StepExecutor> executor_;
  ModelConfig config_;
  KvCache* cache_;
  EngineOptions options_;
  std::vector<int32_t> end_ids_;
  Scheduler scheduler_;
  std::function<void(const StepStats&)> step_observer_;
  uint64_t step_number_ = 0;
  std::vector<uint64_t> released_;  // since the last executed batch

  mutable absl::Mutex mutex_;
  uint64_t next_id_ ABSL_GUARDED_BY(mutex_) = 1;
  uint64_t seed_state_ ABSL_GUARDED_BY(mutex_) = 0;
  std::vector<std::unique_ptr<Sequence>> incoming_ ABSL_GUARDED_BY(mutex_);
  std::vector<uint64_t> cancels_ ABSL_GUARDED_BY(mutex_);
  int64_t num_live_ ABSL_GUARDED_BY(mutex_) = 0;  // submitted, not finished
  EngineCounters counters_ ABSL_GUARDED_BY(mutex_);
};

// Collects a request's events for a consumer on another thread.
class OutputQueue {
 public:
  // A callback that pushes into this queue (which must outlive the request).
  OutputCallback AsCallback();
  void Push(const RequestOutput& output);
  // The next event, or nullopt at `deadline`.
  std::optional<RequestOutput> PopUntil(absl::Time deadline);
  std::optional<RequestOutput> TryPop();

 private:
  absl::Mutex mutex_;
  std::deque<RequestOutput> events_ ABSL_GUARDED_BY(mutex_);
};

}  // namespace gemma::engine
