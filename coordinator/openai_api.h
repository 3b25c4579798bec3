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
#include "coordinator/openai_format.h"

namespace gemma::coordinator {

// Errors that httplib answers itself under /v1/ (no route for the path, or not for the
// method: 405 with Allow; a request it cannot parse) get an OpenAI error body saying what was
// asked instead of an empty one. Errors the handlers send keep theirs. Without `batches` (no
// --data-dir), the Files and Batches paths say what they need instead of a 405.
// A request without Content-Length or Transfer-Encoding has no body (RFC 9112, 6.3), but
// httplib 0.11 reads a POST's body to the end of the connection, failing after its read
// timeout: curl -X POST without -d (OpenAI's own cancel example) got a 400 five seconds later.
// Called from the pre-routing handler, which runs before the body is read, this gives such a
// request "Content-Length: 0", so it is routed with an empty body.
void ReadMissingBodyAsEmpty(const httplib::Request& request);

void AddOpenAiErrorBodies(httplib::Server& http, bool batches);

// Adds the routes to `http`. `channel` reaches the coordinator's Inference service; it and
// `options` must outlive the server's handlers.
// `internal_token` authenticates its in-process calls (Authenticator::internal_token; empty
// when the coordinator is open). Who may call the HTTP API is checked before routing (see
// coordinator_main.cc).
void AddOpenAiRoutes(httplib::Server& http, std::shared_ptr<grpc::Channel> channel,
                     const std::string& internal_token,
                     const OpenAiOptions& options);

}  // namespace gemma::coordinator
