#include "coordinator/proxy.h"

#include <algorithm>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "coordinator/request_checks.h"
#include "proto/status_convert.h"
#include "gemma/internal/v1/worker.grpc.pb.h"
#include "glog/logging.h"

namespace gemma::coordinator {
namespace {

using gemma::internal::v1::ReplicaGenerateRequest;
using gemma::internal::v1::ReplicaGenerateResponse;
using gemma::v1::GenerateRequest;
using gemma::v1::GenerateResponse;

uint64_t RandomSeed() {
  thread_local std::mt19937_64 generator{std::random_device{}()};
  return generator();
}

std::string CodeName(grpc::StatusCode code) {
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

class ProxyReactor final : public grpc::ServerWriteReactor<GenerateResponse> {
 public:
  ProxyReactor(grpc::CallbackServerContext* context, const GenerateRequest& request,
               Registry* registry, Timer* timer, const ProxyOptions& options)
      : context_(context), registry_(registry), timer_(timer), options_(options),
        request_(request) {
    absl::Status admitted = Admit();
    if (!admitted.ok()) {
      if (admitted.code() != absl::StatusCode::kInvalidArgument) {
        LOG(WARNING) << "request '" << request_.request_id() << "' refused: " << admitted;
      }
      absl::MutexLock lock(&mutex_);
      FinishLocked(ToGrpc(admitted));
    }
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mutex_);
    writing_ = false;
    if (!ok) {
      // The client's side of the call is broken: end the replica's call too.
      client_gone_ = true;
      if (upstream_active_) {
        attempts_.back()->context->TryCancel();
        ReleaseHoldLocked();  // no read follows
      }
    }
    if (attempt_ended_) {
      EndAttemptLocked();
    } else if (ok && upstream_active_) {
      attempts_.back()->upstream.StartRead(&message_);
    }
  }

  void OnCancel() override {
    absl::MutexLock lock(&mutex_);
    cancelled_ = true;
    if (upstream_active_) {
      attempts_.back()->context->TryCancel();  // its end finishes the call
    } else if (timer_pending_) {
      if (timer_->Cancel(timer_id_)) timer_pending_ = false;
      FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client"));
    }
  }

  void OnDone() override {
    bool last;
    {
      absl::MutexLock lock(&mutex_);
      server_done_ = true;
      last = DoneLocked();
    }
    if (last) delete this;
  }

 private:
  class Upstream final : public grpc::ClientReadReactor<ReplicaGenerateResponse> {
   public:
    explicit Upstream(ProxyReactor* proxy) : proxy_(proxy) {}
    void OnReadDone(bool ok) override { proxy_->OnUpstreamRead(ok); }
    void OnDone(const grpc::Status& status) override { proxy_->OnUpstreamDone(status); }

   private:
    ProxyReactor* proxy_;
  };

  // One send of the request to one replica; kept until the proxy is deleted.
  struct Attempt {
    explicit Attempt(ProxyReactor* proxy) : upstream(proxy) {}
    std::shared_ptr<Replica> replica;
    std::unique_ptr<grpc::ClientContext> context;
    ReplicaGenerateRequest request;
    Upstream upstream;
    // A hold on the replica's call while this reactor may still start reads on it: without
    // it the call can end (and its state be freed) between a read and the next StartRead.
    bool holding = false;
  };

  // No more reads on the current attempt: lets its call end.
  void ReleaseHoldLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
    Attempt& attempt = *attempts_.back();
    if (!attempt.holding) return;
    attempt.holding = false;
    attempt.upstream.RemoveHold();
  }

  absl::Status Admit() {
    if (absl::Status status = ValidateGenerateRequest(request_, registry_->Limits(request_.model()));
        !status.ok()) {
      return status;
    }
    if (absl::Status status = CheckDeadline(context_->deadline(),
                                            std::chrono::system_clock::now());
        !status.ok()) {
      return status;
    }
    PrepareForReplicas(&request_, RandomSeed());
    absl::StatusOr<std::shared_ptr<Replica>> replica = registry_->Pick({}, /*admit=*/true, request_.model());
    if (!replica.ok()) {
      // Every replica full, or none up right now: wait in the admission queue (bounded in
      // length and time) rather than refuse at once.
      const absl::StatusCode code = replica.status().code();
      if ((code != absl::StatusCode::kResourceExhausted &&
           code != absl::StatusCode::kUnavailable) ||
          options_.queue_wait.count() <= 0) {
        return replica.status();
      }
      if (!registry_->TryQueue(options_.max_queued)) {
        // The replica's message ends with its advice; the queue's state goes before it.
        std::string message(replica.status().message());
        constexpr absl::string_view kAdvice = "; retry later or add replicas";
        if (absl::EndsWith(message, kAdvice)) message.resize(message.size() - kAdvice.size());
        return absl::ResourceExhaustedError(
            absl::StrCat(message, ", and the admission queue is full (", options_.max_queued,
                         " requests waiting)", kAdvice));
      }
      absl::MutexLock lock(&mutex_);
      in_queue_ = true;
      queued_at_ = Timer::Clock::now();
      queue_deadline_ = queued_at_ + options_.queue_wait;
      const auto client_deadline = context_->deadline();
      if (client_deadline != std::chrono::system_clock::time_point::max()) {
        queue_deadline_ = std::min(
            queue_deadline_, queued_at_ + std::chrono::duration_cast<Timer::Clock::duration>(
                                              client_deadline - std::chrono::system_clock::now()));
      }
      timer_pending_ = true;
      timer_id_ = timer_->Schedule(queued_at_ + options_.poll_interval, [this] { OnWaitTimer(); });
      return absl::OkStatus();
    }
    absl::MutexLock lock(&mutex_);
    registry_->RequestStarted();
    counted_ = true;
    StartAttemptLocked(*std::move(replica));
    return absl::OkStatus();
  }

  void StartAttemptLocked(std::shared_ptr<Replica> replica) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
    attempts_.push_back(std::make_unique<Attempt>(this));
    Attempt& attempt = *attempts_.back();
    attempt.replica = std::move(replica);
    *attempt.request.mutable_request() = request_;
    if (have_prompt_) {
      // Resume: the prompt as the first call tokenized it, and what the client has already.
      auto* ids = attempt.request.mutable_request()->mutable_token_ids()->mutable_ids();
      ids->Clear();
      ids->Add(prompt_ids_.begin(), prompt_ids_.end());
      attempt.request.mutable_resume_token_ids()->Add(relayed_ids_.begin(), relayed_ids_.end());
    }
    VLOG(1) << "request '" << request_.request_id() << "' -> replica " << attempt.replica->id
            << " (attempt " << attempts_.size() << ")";
    // A plain context, not a child of the client's call: grpc tears a child call down through
    // its parent, and the client's call may be gone first (that crashed the coordinator under
    // load). The client's deadline is copied; its cancellation arrives through OnCancel.
    attempt.context = std::make_unique<grpc::ClientContext>();
    attempt.context->set_deadline(context_->deadline());
    upstream_active_ = true;
    attempt.replica->stub->async()->Generate(attempt.context.get(), &attempt.request,
                                              &attempt.upstream);
    attempt.holding = true;
    attempt.upstream.AddHold();
    attempt.upstream.StartRead(&message_);
    attempt.upstream.StartCall();
    last_progress_ = Timer::Clock::now();
    ArmWatchdogLocked(last_progress_ + options_.stall_timeout);
  }

  // The progress watchdog: a replica's call that streams nothing for stall_timeout (from its
  // start, or since its last message), or whose replica is no longer healthy (checked every
  // heartbeat timeout: a frozen or cut-off replica), is treated as a failed replica. One timer per proxy,
  // re-armed from its own callback while the call makes progress.
  void ArmWatchdogLocked(Timer::Clock::time_point when) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
    if (watchdog_pending_ || finished_) return;
    // Also wakes every heartbeat timeout to see whether the replica is still healthy.
    const Timer::Clock::time_point health_check =
        Timer::Clock::now() + std::max(registry_->heartbeat_timeout(), std::chrono::milliseconds(50));
    when = options_.stall_timeout.count() <= 0 ? health_check : std::min(when, health_check);
    watchdog_pending_ = true;
    watchdog_id_ = timer_->Schedule(when, [this] { OnWatchdog(); });
  }

  void StopWatchdogLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
    if (watchdog_pending_ && timer_->Cancel(watchdog_id_)) watchdog_pending_ = false;
  }

  void OnWatchdog() {
    bool last;
    {
      absl::MutexLock lock(&mutex_);
      watchdog_pending_ = false;
      // Once the final response went out the replica owes nothing: leaving now is fine.
      if (!finished_ && upstream_active_ && broken_.ok() && !final_relayed_) {
        const auto now = Timer::Clock::now();
        const Replica& replica = *attempts_.back()->replica;
        if (!registry_->IsHealthy(replica)) {
          // Frozen, cut off or gone: its heartbeats stopped (or another call failed on it).
          broken_ = grpc::Status(
              grpc::StatusCode::UNAVAILABLE,
              absl::StrCat("replica ", replica.id, " at ", replica.address,
                           " is unhealthy (no heartbeat within ",
                           registry_->heartbeat_timeout().count(), " ms, or failed)"));
          attempts_.back()->context->TryCancel();
        } else if (options_.stall_timeout.count() > 0 &&
                   now - last_progress_ >= options_.stall_timeout) {
          broken_ = grpc::Status(
              grpc::StatusCode::DEADLINE_EXCEEDED,
              absl::StrCat("it streamed nothing for ",
                           std::chrono::duration_cast<std::chrono::milliseconds>(
                               now - last_progress_).count(),
                           " ms (--stall-timeout-ms ", options_.stall_timeout.count(), ")"));
          attempts_.back()->context->TryCancel();
        } else {
          ArmWatchdogLocked(last_progress_ + options_.stall_timeout);
        }
      }
      last = DoneLocked();
    }
    if (last) delete this;
  }

  void OnUpstreamRead(bool ok) {
    absl::MutexLock lock(&mutex_);
    last_progress_ = Timer::Clock::now();
    if (!ok) {
      ReleaseHoldLocked();  // the stream is over; its status follows in OnUpstreamDone
      return;
    }
    if (!have_prompt_ && message_.prompt_token_ids_size() > 0) {
      prompt_ids_.assign(message_.prompt_token_ids().begin(), message_.prompt_token_ids().end());
      have_prompt_ = true;
    }
    if (finished_ || client_gone_) {
      message_.Clear();
      ReleaseHoldLocked();
      return;  // the replica's call is being cancelled
    }
    GenerateResponse& response = *message_.mutable_response();
    if (absl::Status broken = CheckResponseLocked(response); !broken.ok()) {
      // Nothing of it reaches the client: the replica is blamed and the request moves on.
      broken_ = grpc::Status(grpc::StatusCode::INTERNAL, std::string(broken.message()));
      attempts_.back()->context->TryCancel();
      message_.Clear();
      ReleaseHoldLocked();
      return;
    }
    relayed_ids_.insert(relayed_ids_.end(), response.token_ids().begin(),
                        response.token_ids().end());
    if (response.has_final()) final_relayed_ = true;
    CountLocked(response);
    outgoing_ = std::move(response);
    message_.Clear();
    writing_ = true;
    StartWrite(&outgoing_);
  }

  // What a replica streams is checked before it is relayed: ids inside its vocabulary, and no
  // more of them than max_tokens (resolved before the first send).
  absl::Status CheckResponseLocked(const GenerateResponse& response)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
    const int32_t vocab = attempts_.back()->replica->vocab_size;
    for (int32_t id : response.token_ids()) {
      if (id < 0 || (vocab > 0 && id >= vocab)) {
        return absl::InternalError(absl::StrCat("it streamed token id ", id, ", outside its ",
                                                "vocabulary of ", vocab));
      }
    }
    const int64_t total =
        static_cast<int64_t>(relayed_ids_.size()) + response.token_ids_size();
    if (request_.max_tokens() > 0 && total > request_.max_tokens()) {
      return absl::InternalError(absl::StrCat("it streamed ", total, " tokens for max_tokens ",
                                              request_.max_tokens()));
    }
    return absl::OkStatus();
  }

  void OnUpstreamDone(const grpc::Status& status) {
    bool last;
    {
      absl::MutexLock lock(&mutex_);
      attempts_.back()->replica->outstanding.fetch_sub(1);
      upstream_active_ = false;
      attempt_status_ = status;
      attempt_ended_ = true;
      if (!writing_) EndAttemptLocked();
      last = DoneLocked();
    }
    if (last) delete this;
  }

  // The replica's call has ended and its last message is written: finish, or fail over.
  void EndAttemptLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
    attempt_ended_ = false;
    const grpc::Status status = attempt_status_;
    if (finished_) return;
    // The final response reached the client: the request is done, whatever the replica did
    // after (left, or was cut off, before its call closed).
    if (final_relayed_) {
      FinishLocked(grpc::Status::OK);
      return;
    }
    if (!broken_.ok()) {  // the replica sent what no replica may send
      const grpc::Status broken = broken_;
      broken_ = grpc::Status::OK;
      FailOverLocked(broken);
      return;
    }
    const bool client_cancelled = cancelled_ || client_gone_ || context_->IsCancelled();
    if (client_cancelled) {
      FinishLocked(status.ok() ? grpc::Status(grpc::StatusCode::CANCELLED, "cancelled") : status);
      return;
    }
    if (!IsReplicaFailure(status, final_relayed_, client_cancelled)) {
      FinishLocked(status);  // the request's own error, as the replica said it
      return;
    }
    if (status.error_code() == grpc::StatusCode::CANCELLED) {
      // The client's cancellation reaches the replica's call (propagated through its context)
      // before, or at the same time as, OnCancel reaches this reactor: give it a moment before
      // the replica is blamed. OnCancel meanwhile finishes the call (see OnCancel).
      checking_cancel_ = true;
      timer_pending_ = true;
      timer_id_ = timer_->Schedule(Timer::Clock::now() + options_.cancel_grace,
                                   [this] { OnWaitTimer(); });
      return;
    }
    FailOverLocked(status);
  }

  // The replica failed `status`: blame it, then send the request elsewhere or give up.
  void FailOverLocked(const grpc::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
    const Replica& failed = *attempts_.back()->replica;
    const std::string what = absl::StrCat(
        "replica ", failed.id, " at ", failed.address, " failed after ", relayed_ids_.size(),
        " streamed token", relayed_ids_.size() == 1 ? "" : "s", " (",
        status.ok() ? std::string("its stream ended without a final response")
                    : absl::StrCat(CodeName(status.error_code()), ": ", status.error_message()),
        ")");
    registry_->MarkFailed(failed, what);
    failed_ids_.push_back(failed.id);
    failures_.push_back(what);
    // A max_tokens that gave way to the context was reached when prompt and tokens fill it
    // (the replica lowered it; another would refuse to resume with nothing left to generate).
    const bool context_full = request_.max_tokens_up_to_context() && have_prompt_ &&
                              failed.max_context > 0 &&
                              static_cast<int64_t>(prompt_ids_.size() + relayed_ids_.size()) >=
                                  failed.max_context;
    if (static_cast<int64_t>(relayed_ids_.size()) >= request_.max_tokens() || context_full) {
      // Every id reached the client, only the final response is missing: send it here.
      LOG(WARNING) << "request '" << request_.request_id() << "': " << what
                   << "; every id was streamed, the coordinator ends the stream";
      outgoing_.Clear();
      gemma::v1::GenerateFinal* final = outgoing_.mutable_final();
      final->set_finish_reason("max_tokens");
      final->set_prompt_tokens(static_cast<int64_t>(prompt_ids_.size()));
      final->set_generated_tokens(static_cast<int64_t>(relayed_ids_.size()));
      CountLocked(outgoing_);
      finished_ = true;
      StopWatchdogLocked();
      if (counted_) registry_->RequestEnded();
      StartWriteAndFinish(&outgoing_, grpc::WriteOptions(), grpc::Status::OK);
      return;
    }
    if (!have_prompt_ && !relayed_ids_.empty()) {
      // A replica that sends no prompt ids (an older worker): a token-id input is its own
      // prompt; a text or chat input cannot be resumed without repeating ids.
      if (request_.has_token_ids()) {
        prompt_ids_.assign(request_.token_ids().ids().begin(), request_.token_ids().ids().end());
        have_prompt_ = true;
      } else {
        FailLocked("the replica sent no prompt ids, so the request cannot resume elsewhere");
        return;
      }
    }
    if (static_cast<int>(attempts_.size()) >= options_.max_attempts) {
      FailLocked(absl::StrCat("gave up after ", attempts_.size(), " attempt",
                              attempts_.size() == 1 ? "" : "s", " (--max-attempts ",
                              options_.max_attempts, ")"));
      return;
    }
    wait_deadline_ = Timer::Clock::now() + options_.requeue_wait;
    waited_ = false;
    TryRequeueLocked();
  }

  void TryRequeueLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
    absl::StatusOr<std::shared_ptr<Replica>> replica = registry_->Pick(failed_ids_, false, request_.model());
    if (replica.ok()) {
      registry_->CountRequeue();
      LOG(WARNING) << "request '" << request_.request_id() << "': " << failures_.back()
                   << "; re-queued on replica " << (*replica)->id << " at "
                   << (*replica)->address << ", resuming after " << relayed_ids_.size()
                   << " tokens";
      StartAttemptLocked(*std::move(replica));
      return;
    }
    const Timer::Clock::time_point now = Timer::Clock::now();
    if (now >= wait_deadline_) {
      FailLocked(absl::StrCat("no healthy replica took the request over within ",
                              options_.requeue_wait.count(), " ms (",
                              replica.status().message(), ")"));
      return;
    }
    if (!waited_) {
      waited_ = true;
      LOG(WARNING) << "request '" << request_.request_id() << "': " << failures_.back()
                   << "; waiting up to " << options_.requeue_wait.count()
                   << " ms for a healthy replica";
    }
    timer_pending_ = true;
    timer_id_ = timer_->Schedule(std::min(now + options_.poll_interval, wait_deadline_),
                                 [this] { OnWaitTimer(); });
  }

  void OnWaitTimer() {
    bool last;
    {
      absl::MutexLock lock(&mutex_);
      timer_pending_ = false;
      if (!finished_) {
        if (cancelled_ || context_->IsCancelled()) {
          FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client"));
        } else if (checking_cancel_) {
          checking_cancel_ = false;
          FailOverLocked(attempt_status_);  // the client did not cancel: the replica did
        } else if (in_queue_) {
          TryAdmitLocked();
        } else {
          TryRequeueLocked();
        }
      }
      last = DoneLocked();
    }
    if (last) delete this;
  }

  // One look at the registry for a request in the admission queue.
  void TryAdmitLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
    absl::StatusOr<std::shared_ptr<Replica>> replica =
        registry_->Pick({}, /*admit=*/true, request_.model());
    const Timer::Clock::time_point now = Timer::Clock::now();
    if (replica.ok()) {
      LeaveQueueLocked();
      VLOG(1) << "request '" << request_.request_id() << "' admitted after "
              << std::chrono::duration_cast<std::chrono::milliseconds>(now - queued_at_).count()
              << " ms in the admission queue";
      registry_->RequestStarted();
      counted_ = true;
      StartAttemptLocked(*std::move(replica));
      return;
    }
    const absl::StatusCode code = replica.status().code();
    if (code != absl::StatusCode::kResourceExhausted && code != absl::StatusCode::kUnavailable) {
      FinishLocked(ToGrpc(replica.status()));
      return;
    }
    if (now >= queue_deadline_) {
      const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(now - queued_at_);
      LOG(WARNING) << "request '" << request_.request_id() << "' refused after " << waited.count()
                   << " ms in the admission queue: " << replica.status();
      FinishLocked(ToGrpc(absl::Status(
          code, absl::StrCat(replica.status().message(), " (after ", waited.count(),
                             " ms in the admission queue)"))));
      return;
    }
    timer_pending_ = true;
    timer_id_ = timer_->Schedule(std::min(now + options_.poll_interval, queue_deadline_),
                                 [this] { OnWaitTimer(); });
  }

  void LeaveQueueLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
    if (!in_queue_) return;
    in_queue_ = false;
    registry_->Dequeue();
  }

  void FailLocked(const std::string& why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
    const std::string message = absl::StrCat(absl::StrJoin(failures_, "; then "), "; ", why);
    LOG(WARNING) << "request '" << request_.request_id() << "' failed: " << message;
    FinishLocked(grpc::Status(grpc::StatusCode::UNAVAILABLE, message));
  }

  // The metrics of a message about to go to the client: its first token's latency or the gap
  // since the previous token message, and the finish.
  void CountLocked(const GenerateResponse& response) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
    Metrics* metrics = options_.metrics;
    if (metrics == nullptr) return;
    const auto now = std::chrono::steady_clock::now();
    auto seconds = [](std::chrono::steady_clock::duration d) {
      return std::chrono::duration<double>(d).count();
    };
    if (series_ == nullptr) series_ = &metrics->Series(registry_->ResolveModel(request_.model()));
    relayed_tokens_ += response.token_ids_size();
    if (response.token_ids_size() > 0) {
      if (!first_token_counted_) {
        metrics->FirstToken(*series_, seconds(now - arrived_));
        first_token_counted_ = true;
      } else {
        metrics->InterToken(*series_, seconds(now - last_token_));
      }
      last_token_ = now;
    }
    if (response.has_final()) {
      final_counted_ = true;
      metrics->Finished(*series_, response.final().finish_reason(),
                        response.final().prompt_tokens(), response.final().generated_tokens(),
                        seconds(now - arrived_));
    }
  }

  // A request that ends without its final message, cancelled by its client or cut after
  // tokens went out, counts as finished_reason "abort" (as vLLM counts them) with the tokens
  // its client got, so that request and token totals add up; one that failed before any token
  // counts as a failure by its status code.
  void CountAbortLocked(const grpc::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
    Metrics* metrics = options_.metrics;
    if (metrics == nullptr || final_counted_) return;
    if (status.error_code() != grpc::StatusCode::CANCELLED && relayed_tokens_ == 0) {
      final_counted_ = true;
      metrics->Failed(registry_->Serves(request_.model()) ? registry_->ResolveModel(request_.model())
                                                          : std::string(),
                      absl::AsciiStrToLower(absl::StatusCodeToString(
                          static_cast<absl::StatusCode>(status.error_code()))));
      return;
    }
    if (series_ == nullptr) series_ = &metrics->Series(registry_->ResolveModel(request_.model()));
    final_counted_ = true;
    // The prompt counts once a replica has taken it (it says so with its first message).
    metrics->Finished(*series_, "abort",
                      have_prompt_ ? static_cast<int64_t>(prompt_ids_.size()) : 0,
                      relayed_tokens_,
                      std::chrono::duration<double>(std::chrono::steady_clock::now() - arrived_)
                          .count());
  }

  void FinishLocked(const grpc::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
    if (finished_) return;
    finished_ = true;
    if (!status.ok()) CountAbortLocked(status);
    LeaveQueueLocked();
    StopWatchdogLocked();
    if (counted_) registry_->RequestEnded();  // before the client can see the end
    Finish(status);
  }

  // Whether nothing will call this reactor again.
  bool DoneLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
    return server_done_ && !upstream_active_ && !timer_pending_ && !watchdog_pending_;
  }

  grpc::CallbackServerContext* const context_;
  Registry* const registry_;
  Timer* const timer_;
  const ProxyOptions options_;
  GenerateRequest request_;  // as sent on the first attempt

  absl::Mutex mutex_;
  const std::chrono::steady_clock::time_point arrived_ = std::chrono::steady_clock::now();
  std::chrono::steady_clock::time_point last_token_ ABSL_GUARDED_BY(mutex_);
  bool first_token_counted_ ABSL_GUARDED_BY(mutex_) = false;
  bool final_counted_ ABSL_GUARDED_BY(mutex_) = false;
  int64_t relayed_tokens_ ABSL_GUARDED_BY(mutex_) = 0;  // token ids sent to the client
  // The request series of its served model, looked up at its first message.
  const Metrics::ModelSeries* series_ ABSL_GUARDED_BY(mutex_) = nullptr;
  bool counted_ ABSL_GUARDED_BY(mutex_) = false;  // in the registry's requests in flight
  std::vector<std::unique_ptr<Attempt>> attempts_ ABSL_GUARDED_BY(mutex_);
  ReplicaGenerateResponse message_;  // being read from the replica
  GenerateResponse outgoing_;        // being written to the client
  bool have_prompt_ ABSL_GUARDED_BY(mutex_) = false;
  std::vector<int32_t> prompt_ids_ ABSL_GUARDED_BY(mutex_);
  std::vector<int32_t> relayed_ids_ ABSL_GUARDED_BY(mutex_);  // every id written to the client
  bool final_relayed_ ABSL_GUARDED_BY(mutex_) = false;
  // Set when the replica streamed something invalid (its call is then cancelled).
  grpc::Status broken_ ABSL_GUARDED_BY(mutex_);
  std::vector<std::string> failed_ids_ ABSL_GUARDED_BY(mutex_);
  std::vector<std::string> failures_ ABSL_GUARDED_BY(mutex_);
  bool upstream_active_ ABSL_GUARDED_BY(mutex_) = false;  // a replica call not yet done
  bool attempt_ended_ ABSL_GUARDED_BY(mutex_) = false;    // done, waiting for a write
  grpc::Status attempt_status_ ABSL_GUARDED_BY(mutex_);
  bool writing_ ABSL_GUARDED_BY(mutex_) = false;
  bool timer_pending_ ABSL_GUARDED_BY(mutex_) = false;  // a wait (see OnWaitTimer)
  bool checking_cancel_ ABSL_GUARDED_BY(mutex_) = false;  // the wait is cancel_grace
  uint64_t timer_id_ ABSL_GUARDED_BY(mutex_) = 0;
  bool watchdog_pending_ ABSL_GUARDED_BY(mutex_) = false;
  uint64_t watchdog_id_ ABSL_GUARDED_BY(mutex_) = 0;
  Timer::Clock::time_point last_progress_ ABSL_GUARDED_BY(mutex_);
  Timer::Clock::time_point wait_deadline_ ABSL_GUARDED_BY(mutex_);
  bool waited_ ABSL_GUARDED_BY(mutex_) = false;
  // In the admission queue: since when, and until when.
  bool in_queue_ ABSL_GUARDED_BY(mutex_) = false;
  Timer::Clock::time_point queued_at_ ABSL_GUARDED_BY(mutex_);
  Timer::Clock::time_point queue_deadline_ ABSL_GUARDED_BY(mutex_);
  bool cancelled_ ABSL_GUARDED_BY(mutex_) = false;    // OnCancel: the client cancelled
  bool client_gone_ ABSL_GUARDED_BY(mutex_) = false;  // a write to the client failed
  bool finished_ ABSL_GUARDED_BY(mutex_) = false;
  bool server_done_ ABSL_GUARDED_BY(mutex_) = false;
};

}  // namespace

bool IsReplicaFailure(const grpc::Status& status, bool final_relayed, bool client_cancelled) {
  if (final_relayed) return false;
  switch (status.error_code()) {
    case grpc::StatusCode::OK:  // ended without a final response
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::INTERNAL:
    case grpc::StatusCode::UNKNOWN:
      return true;
    case grpc::StatusCode::CANCELLED:
      return !client_cancelled;  // the replica's server cancelled it (shutting down)
    default:
      return false;
  }
}

grpc::ServerWriteReactor<GenerateResponse>* StartGenerateProxy(
    grpc::CallbackServerContext* context, const GenerateRequest& request, Registry* registry,
    Timer* timer, const ProxyOptions& options) {
  return new ProxyReactor(context, request, registry, timer, options);
}

}  // namespace gemma::coordinator
