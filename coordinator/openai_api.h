// The OpenAI-compatible HTTP API on the coordinator's HTTP port: GET /v1/models,
// POST /v1/completions and POST /v1/chat/completions (whole responses, or server-sent events
// ending with "data: [DONE]" when "stream" is true). Each request becomes a
// gemma.v1.GenerateRequest sent to the coordinator's own Inference service over an in-process
// channel, so it is checked, admitted, routed and moved on a replica failure exactly as a gRPC
// request. Fields this server does not support are refused with an OpenAI-shaped error (HTTP
// 400 and an "error" object naming the field), never silently ignored.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "gemma/v1/inference.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "httplib.h"
#include "nlohmann/json.hpp"

namespace gemma::coordinator {

struct OpenAiOptions {
  // The model id clients name in "model" and GET /v1/models lists.
  std::string model_name = "gemma-4";
  // Largest request body accepted (413 past it).
  size_t max_body_bytes = size_t{8} << 20;
  // max_tokens of a chat completion that names none (a completion's default is OpenAI's, 16).
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

// Adds the routes to `http`. `channel` reaches the coordinator's Inference service; it and
// `options` must outlive the server's handlers.
void AddOpenAiRoutes(httplib::Server& http, std::shared_ptr<grpc::Channel> channel,
                     const OpenAiOptions& options);

}  // namespace gemma::coordinator
