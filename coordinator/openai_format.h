// OpenAI's request and response shapes, without the HTTP: translating a /v1/completions or
// /v1/chat/completions body into a gemma.v1.GenerateRequest (refusing what this server cannot
// honour with an OpenAI-shaped error naming the field), and building the response bodies,
// stream chunks, finish reasons and errors. Used by the HTTP API, the batch jobs (OpenAI batch
// input lines) and gemmactl (OpenAI batch output files).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "gemma/v1/batches.pb.h"
#include "gemma/v1/inference.pb.h"
#include "grpcpp/support/status.h"
#include "nlohmann/json.hpp"

namespace gemma::coordinator {

struct OpenAiOptions {
  // The default model's id; with `served_models`, every id they return is accepted and listed
  // by GET /v1/models (a request's "model" then picks the replicas).
  std::string model_name = "gemma-4";
  std::function<std::vector<std::string>()> served_models;
  // A model's context (positions one request may use) over its healthy replicas; 0 or unset:
  // unknown (GET /v1/models then leaves out max_model_len).
  std::function<int64_t(const std::string&)> max_model_len;
  // Unix seconds the models were first served (the "created" of /v1/models).
  int64_t created = 0;
  // Largest request body accepted (413 past it).
  size_t max_body_bytes = size_t{8} << 20;
  // max_tokens of a chat completion that names none (a completion's default is OpenAI's, 16).
  // Either default is lowered to what the context leaves after a long input rather than
  // refusing it (GenerateRequest.max_tokens_up_to_context).
  int64_t default_chat_max_tokens = 1024;
};

// An error as the OpenAI API reports it: HTTP status and the "error" object.
struct ApiError {
  int http_status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;  // the offending field, when there is one
  std::string code;
  nlohmann::json ToJson() const;
};

// HTTP 400, "invalid_request_error", naming `param` (may be empty).
ApiError InvalidRequestError(std::string param, std::string message);

enum class ApiKind { kCompletion, kChat };

// The GenerateRequest a /v1/completions (kCompletion) or /v1/chat/completions (kChat) body asks
// for, and whether it streams; an ApiError for a body this server cannot serve as asked.
struct ParsedRequest {
  gemma::v1::GenerateRequest request;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
};
struct ParseResult {
  bool ok = false;
  ParsedRequest parsed;
  ApiError error;
};
ParseResult ParseOpenAiRequest(const nlohmann::json& body, ApiKind kind,
                               const OpenAiOptions& options);

// OpenAI's finish reason for ours: "stop" (an end id, a stop id or string), "length"
// (max_tokens, the context), else ours as it is.
std::string OpenAiFinishReason(const std::string& ours);

// The ApiError for a failed Generate call (INVALID_ARGUMENT 400, NOT_FOUND 404,
// RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, DEADLINE_EXCEEDED 504, ...).
ApiError ApiErrorFromGrpc(const grpc::Status& status);

// JSON text; bytes that are not UTF-8 (a token's text may end inside a character) become
// U+FFFD rather than an exception.
std::string Dump(const nlohmann::json& value);
// Parses `text` as one JSON object into *out. Otherwise false, with *error naming `what` and
// saying what is wrong and where: "the request body is not valid JSON: syntax error while
// parsing object key ... at line 1, column 2", or "... is a JSON array, not an object".
bool ParseJsonObject(const std::string& text, const std::string& what, nlohmann::json* out,
                     std::string* error);
// "<prefix><24 random hex digits>".
std::string NewId(const char* prefix);
int64_t UnixNow();
// A model object of /v1/models; max_model_len (vLLM's field, which clients size requests by)
// when known (> 0).
nlohmann::json ModelObject(const std::string& name, int64_t created = 0,
                           int64_t max_model_len = 0);
// {"prompt_tokens", "completion_tokens", "total_tokens"}.
nlohmann::json Usage(const gemma::v1::GenerateFinal& final);
// A response ("text_completion", "chat.completion") or stream chunk around `choices`.
nlohmann::json Envelope(ApiKind kind, bool chunk, const std::string& id, int64_t created,
                        const std::string& model, nlohmann::json choices);
// Choice 0: the text (a completion), the message (a chat response) or the delta (a chat chunk;
// `first` adds the role).
nlohmann::json Choice(ApiKind kind, bool chunk, const std::string& text,
                      const nlohmann::json& finish_reason, bool first);
// A whole (not streamed) response body: text, finish reason and usage.
nlohmann::json ResponseBody(ApiKind kind, const std::string& id, int64_t created,
                            const std::string& model, const std::string& text,
                            const gemma::v1::GenerateFinal& final);

// One line of an OpenAI batch output file: {"id", "custom_id", "response": {"status_code",
// "request_id", "body"}, "error": null}; the body is the chat or completion response for a
// result, the "error" object for an item that failed. An item given as a GenerateRequest gets
// {"text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens"} as its body.
nlohmann::json BatchOutputLine(const gemma::v1::BatchResult& result, const std::string& batch_id,
                               const std::string& model_name, int64_t created);

// Whether a batch status is final (completed, failed, expired, cancelled).
bool BatchFinal(const std::string& status);

// OpenAI's batch object for `batch` (output_file_id "<id>-output" once a finished batch has
// results, error_file_id "<id>-errors" once it has failures).
nlohmann::json BatchObject(const gemma::v1::Batch& batch);

}  // namespace gemma::coordinator
