#include "worker/service/replica_service.h"

#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/request_defaults.h"
#include "common/tokenizer/chat_format.h"
#include "common/tokenizer/unicode.h"
#include "glog/logging.h"
#include "proto/status_convert.h"

namespace gemma::service {
namespace {

using gemma::internal::v1::ReplicaGenerateRequest;
using gemma::internal::v1::ReplicaGenerateResponse;
using gemma::v1::GenerateRequest;
using gemma::v1::GenerateResponse;


using gemma::ToGrpc;

absl::StatusOr<engine::Request> ToEngineRequest(const ReplicaGenerateRequest& call,
                                                const tokenizer::Tokenizer* tokenizer) {
  const GenerateRequest& proto = call.request();
  engine::Request request;
  if ((proto.input_case() == GenerateRequest::kText ||
       proto.input_case() == GenerateRequest::kChat) &&
      tokenizer == nullptr) {
    return absl::InvalidArgumentError(
        "this replica has no tokenizer; send token_ids or start the worker with --tokenizer");
  }
  switch (proto.input_case()) {
    case GenerateRequest::kTokenIds:
      request.prompt.assign(proto.token_ids().ids().begin(), proto.token_ids().ids().end());
      break;
    case GenerateRequest::kText: {
      request.prompt = tokenizer->EncodePrompt(proto.text());  // <bos> first
      break;
    }
    case GenerateRequest::kChat: {
      std::vector<tokenizer::ChatMessage> messages;
      for (const gemma::v1::ChatMessage& m : proto.chat().messages()) {
        // Contents are placed by byte offset below: repair first, so offsets stay true.
        messages.push_back({m.role(), tokenizer::IsValidUtf8(m.content())
                                          ? m.content()
                                          : tokenizer::RepairUtf8(m.content())});
      }
      if (messages.empty()) {
        return absl::InvalidArgumentError("chat has no messages; give at least one user turn");
      }
      tokenizer::EncodeOptions options;  // the rendered chat starts with <bos> already
      absl::StatusOr<std::string> rendered = tokenizer::RenderGemma4Chat(
          messages, {},
          proto.chat().control_tokens_in_content() ? nullptr : &options.plain_ranges);
      if (!rendered.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("cannot render the chat: ", rendered.status().message()));
      }
      // Control tokens spelled in a message are plain text unless the request asks otherwise.
      request.prompt = tokenizer->Encode(*rendered, options);
      break;
    }
    default:
      break;
  }
  if (request.prompt.empty()) {
    return absl::InvalidArgumentError("the request has no input; set text or token_ids");
  }
  // The coordinator has checked the sampling values; the engine's Submit asserts them again.
  // Here only what the conversion itself needs.
  const gemma::v1::SamplingParams& sampling = proto.sampling();
  if (proto.max_tokens() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens must be >= 0 (0: the default), got ", proto.max_tokens()));
  }
  request.sampling.temperature = sampling.temperature();
  request.sampling.top_k = sampling.top_k();
  request.sampling.top_p = sampling.has_top_p() ? sampling.top_p() : 1.0f;
  if (sampling.has_seed()) request.sampling.seed = sampling.seed();
  request.max_tokens = proto.max_tokens() > 0 ? proto.max_tokens() : kDefaultMaxTokens;
  request.max_tokens_up_to_context = proto.max_tokens_up_to_context();
  request.skip_special_tokens = proto.skip_special_tokens();
  request.ignore_end_ids = proto.ignore_eos();
  request.priority = proto.priority();
  request.stop_token_ids.assign(proto.stop_token_ids().begin(), proto.stop_token_ids().end());
  request.stop_strings.assign(proto.stop_strings().begin(), proto.stop_strings().end());
  request.client_id = proto.request_id();
  request.num_resumed = call.resume_token_ids_size();
  request.prompt.insert(request.prompt.end(), call.resume_token_ids().begin(),
                        call.resume_token_ids().end());
  return request;
}

// Streams one engine request. The engine's callback (stepping thread) queues events; one write
// is in flight at a time; the final event is written with the OK status.
class GenerateReactor final : public grpc::ServerWriteReactor<ReplicaGenerateResponse> {
 public:
  GenerateReactor(engine::Engine* engine, const tokenizer::Tokenizer* tokenizer,
                  const ReplicaGenerateRequest& proto)
      : engine_(engine), shared_(std::make_shared<Shared>()) {
    shared_->reactor = this;
    absl::StatusOr<engine::Request> request = ToEngineRequest(proto, tokenizer);
    if (!request.ok()) {
      FinishOnce(ToGrpc(request.status()));
      return;
    }
    prompt_tokens_ = static_cast<int64_t>(request->prompt.size()) - request->num_resumed;
    prompt_ids_.assign(request->prompt.begin(), request->prompt.begin() + prompt_tokens_);
    std::shared_ptr<Shared> shared = shared_;
    const int64_t prompt_tokens = prompt_tokens_;
    absl::StatusOr<uint64_t> id =
        engine_->Submit(std::move(*request), [shared, prompt_tokens](const engine::RequestOutput& out) {
          absl::MutexLock lock(&shared->mutex);
          if (shared->reactor == nullptr) return;
          shared->reactor->OnEvent(out, prompt_tokens);
        });
    if (!id.ok()) {
      FinishOnce(ToGrpc(id.status()));
      return;
    }
    absl::MutexLock lock(&shared_->mutex);
    engine_id_ = *id;
    if (cancelled_) engine_->Cancel(engine_id_);
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&shared_->mutex);
    writing_ = false;
    if (!ok) {
      if (engine_id_ != 0) engine_->Cancel(engine_id_);
      FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "the stream was closed"));
      return;
    }
    WriteNextLocked();
  }

  void OnCancel() override {
    absl::MutexLock lock(&shared_->mutex);
    cancelled_ = true;
    if (engine_id_ != 0) engine_->Cancel(engine_id_);
    if (!writing_) FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client"));
  }

  void OnDone() override {
    {
      absl::MutexLock lock(&shared_->mutex);
      shared_->reactor = nullptr;
    }
    delete this;
  }

 private:
  struct Shared {
    absl::Mutex mutex;
    GenerateReactor* reactor = nullptr;  // null once the call is done
  };

  // Called with shared_->mutex held, from the engine's stepping thread.
  void OnEvent(const engine::RequestOutput& out, int64_t prompt_tokens) {
    if (finished_) return;
    if (out.finished && out.finish_reason == engine::FinishReason::kError) {
      LOG(ERROR) << "request " << out.request_id << " failed: " << out.status;
      FinishLocked(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                absl::StrCat("the replica failed: ", out.status.message())));
      return;
    }
    ReplicaGenerateResponse message;
    if (!sent_prompt_) {
      sent_prompt_ = true;
      message.mutable_prompt_token_ids()->Add(prompt_ids_.begin(), prompt_ids_.end());
    }
    GenerateResponse& response = *message.mutable_response();
    response.mutable_token_ids()->Add(out.token_ids.begin(), out.token_ids.end());
    response.set_text(out.text);
    if (out.finished) {
      gemma::v1::GenerateFinal* final = response.mutable_final();
      final->set_finish_reason(engine::FinishReasonName(out.finish_reason));
      final->set_prompt_tokens(prompt_tokens);
      final->set_generated_tokens(out.num_generated);
    }
    pending_.push_back({std::move(message), out.finished});
    if (!writing_) WriteNextLocked();
  }

  void WriteNextLocked() {
    if (finished_ || pending_.empty()) return;
    current_ = std::move(pending_.front().first);
    const bool last = pending_.front().second;
    pending_.pop_front();
    if (last) {
      finished_ = true;
      StartWriteAndFinish(&current_, grpc::WriteOptions(), grpc::Status::OK);
    } else {
      writing_ = true;
      StartWrite(&current_);
    }
  }

  void FinishLocked(const grpc::Status& status) {
    if (finished_) return;
    finished_ = true;
    Finish(status);
  }
  void FinishOnce(const grpc::Status& status) {
    absl::MutexLock lock(&shared_->mutex);
    FinishLocked(status);
  }

  engine::Engine* engine_;
  std::shared_ptr<Shared> shared_;
  int64_t prompt_tokens_ = 0;
  // Guarded by shared_->mutex.
  uint64_t engine_id_ = 0;
  bool writing_ = false;
  bool finished_ = false;
  bool cancelled_ = false;
  bool sent_prompt_ = false;
  std::vector<int32_t> prompt_ids_;
  std::deque<std::pair<ReplicaGenerateResponse, bool>> pending_;
  ReplicaGenerateResponse current_;
};

}  // namespace

// A call refused before it starts: finishes with `status` at once.
class RefusedReactor final : public grpc::ServerWriteReactor<ReplicaGenerateResponse> {
 public:
  explicit RefusedReactor(const grpc::Status& status) { Finish(status); }
  void OnDone() override { delete this; }
};

// Whether the TLS client of `context` presents a certificate naming `name`.
bool CallerNamed(grpc::CallbackServerContext* context, const std::string& name) {
  const std::shared_ptr<const grpc::AuthContext> auth = context->auth_context();
  if (auth == nullptr || !auth->IsPeerAuthenticated()) return false;
  for (const char* property : {"x509_subject_alternative_name", "x509_common_name"}) {
    for (const grpc::string_ref& value : auth->FindPropertyValues(property)) {
      if (std::string(value.data(), value.size()) == name) return true;
    }
  }
  return false;
}

grpc::ServerWriteReactor<ReplicaGenerateResponse>* ReplicaService::Generate(
    grpc::CallbackServerContext* context, const ReplicaGenerateRequest* request) {
  if (!caller_name_.empty() && !CallerNamed(context, caller_name_)) {
    return new RefusedReactor(grpc::Status(
        grpc::StatusCode::PERMISSION_DENIED,
        "this replica takes calls from its coordinator only (a certificate naming " +
            caller_name_ + ", --coordinator-tls-name)"));
  }
  return new GenerateReactor(engine_, tokenizer_, *request);
}

}  // namespace gemma::service
