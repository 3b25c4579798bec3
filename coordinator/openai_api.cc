#include "coordinator/openai_api.h"

#include <chrono>
#include <exception>
#include <memory>
#include <regex>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "coordinator/auth.h"
#include "coordinator/http_connection.h"
#include "glog/logging.h"

namespace gemma::coordinator {
namespace {

using nlohmann::json;

// A streaming call in progress: its context and reader outlive the handler, which returns
// before the chunked content provider writes the events.
struct StreamState {
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReader<gemma::v1::GenerateResponse>> reader;
  gemma::v1::GenerateResponse first;
  bool finished = false;
};

void SendError(httplib::Response& response, const ApiError& error) {
  response.status = error.http_status;
  // A full cluster or no replica: worth trying again shortly (the OpenAI clients retry 429 and
  // 503 after Retry-After).
  if (error.http_status == 429 || error.http_status == 503) {
    response.set_header("Retry-After", "1");
  }
  response.set_content(Dump(json{{"error", error.ToJson()}}), "application/json");
}

void Handle(const httplib::Request& http_request, httplib::Response& response, ApiKind kind,
            gemma::v1::Inference::Stub* stub, const OpenAiOptions& options,
            const std::string& internal_token) {
  if (http_request.body.size() > options.max_body_bytes) {
    ApiError e = InvalidRequestError("", absl::StrCat("the request body is ", http_request.body.size(),
                                          " bytes, more than the limit of ",
                                          options.max_body_bytes));
    e.http_status = 413;
    SendError(response, e);
    return;
  }
  json body;
  std::string parse_error;
  if (!ParseJsonObject(http_request.body, "the request body", &body, &parse_error)) {
    SendError(response, InvalidRequestError("", parse_error));
    return;
  }
  ParseResult parsed = ParseOpenAiRequest(body, kind, options);
  if (!parsed.ok) {
    SendError(response, parsed.error);
    return;
  }
  const std::string id = NewId(kind == ApiKind::kChat ? "chatcmpl-" : "cmpl-");
  const int64_t created = UnixNow();
  parsed.parsed.request.set_request_id(id);

  auto state = std::make_shared<StreamState>();
  AddBearer(state->context, internal_token);
  state->reader = stub->Generate(&state->context, parsed.parsed.request);
  // The first response (or the error) before any byte is sent, so a refused request gets its
  // HTTP status.
  if (!state->reader->Read(&state->first)) {
    grpc::Status status = state->reader->Finish();
    SendError(response, ApiErrorFromGrpc(
                            status.ok() ? grpc::Status(grpc::StatusCode::INTERNAL,
                                                       "the stream ended without a response")
                                        : status));
    return;
  }
  const std::string model = parsed.parsed.request.model().empty() ? options.model_name
                                                                 : parsed.parsed.request.model();
  if (!parsed.parsed.stream) {
    std::string text = state->first.text();
    gemma::v1::GenerateFinal final = state->first.final();
    bool has_final = state->first.has_final();
    gemma::v1::GenerateResponse next;
    // A client that hangs up (a timeout, a retry) cancels the generation instead of leaving
    // it to run to max_tokens for nobody; looked at between tokens, at most every 50 ms.
    const HttpConnectionWatch client(http_request);
    auto next_look = std::chrono::steady_clock::now();
    while (!has_final && state->reader->Read(&next)) {
      text += next.text();
      if (next.has_final()) {
        final = next.final();
        has_final = true;
      } else if (const auto now = std::chrono::steady_clock::now(); now >= next_look) {
        next_look = now + std::chrono::milliseconds(50);
        if (client.ClientGone()) {
          state->context.TryCancel();
          break;
        }
      }
    }
    while (state->reader->Read(&next)) {
    }
    grpc::Status status = state->reader->Finish();
    if (!status.ok() || !has_final) {
      SendError(response, ApiErrorFromGrpc(status.ok() ? grpc::Status(grpc::StatusCode::INTERNAL,
                                                                      "the stream ended early")
                                                       : status));
      return;
    }
    json out = ResponseBody(kind, id, created, model, text, final);
    response.set_content(Dump(out), "application/json");
    return;
  }
  const bool include_usage = parsed.parsed.include_usage;
  response.set_header("Cache-Control", "no-cache");
  response.set_chunked_content_provider(
      "text/event-stream",
      [state, kind, id, created, model, include_usage](size_t, httplib::DataSink& sink) {
        auto send = [&](const json& event) {
          const std::string line = absl::StrCat("data: ", Dump(event), "\n\n");
          return sink.write(line.data(), line.size());
        };
        auto with_usage = [&](json event) {
          if (include_usage) event["usage"] = nullptr;
          return event;
        };
        gemma::v1::GenerateResponse r = std::move(state->first);
        bool first = true;
        bool has_final = false;
        gemma::v1::GenerateFinal final;
        while (true) {
          if (!r.text().empty() || first) {
            json chunk = Envelope(kind, true, id, created, model,
                                  json::array({Choice(kind, true, r.text(), nullptr, first)}));
            if (!send(with_usage(std::move(chunk)))) {
              state->context.TryCancel();  // the client left
              break;
            }
            first = false;
          }
          if (r.has_final()) {
            final = r.final();
            has_final = true;
            break;
          }
          if (!state->reader->Read(&r)) break;
        }
        gemma::v1::GenerateResponse rest;
        while (state->reader->Read(&rest)) {
        }
        grpc::Status status = state->reader->Finish();
        state->finished = true;
        if (!status.ok() || !has_final) {
          // Headers are sent: the error travels as an event, as OpenAI's streams do.
          ApiError e = ApiErrorFromGrpc(status.ok() ? grpc::Status(grpc::StatusCode::INTERNAL,
                                                                   "the stream ended early")
                                                    : status);
          send(json{{"error", e.ToJson()}});
        } else {
          send(with_usage(Envelope(
              kind, true, id, created, model,
              json::array({Choice(kind, true, "", OpenAiFinishReason(final.finish_reason()),
                                  false)}))));
          if (include_usage) {
            json usage = Envelope(kind, true, id, created, model, json::array());
            usage["usage"] = Usage(final);
            send(usage);
          }
          const std::string done = "data: [DONE]\n\n";
          sink.write(done.data(), done.size());
        }
        sink.done();
        return true;
      },
      [state](bool) {
        if (!state->finished) state->context.TryCancel();
      });
}

// The methods a /v1/ path takes (", "-separated), or "" for a path the API does not have.
std::string AllowedMethods(const std::string& path) {
  static const std::vector<std::pair<std::regex, std::string>> kRoutes = [] {
    std::vector<std::pair<std::regex, std::string>> routes;
    for (const auto& [pattern, methods] : std::vector<std::pair<const char*, const char*>>{
             {"/v1/models", "GET"},
             {"/v1/models/[^/]+", "GET"},
             {"/v1/completions", "POST"},
             {"/v1/chat/completions", "POST"},
             {"/v1/files", "GET, POST"},
             {"/v1/files/[^/]+", "GET, DELETE"},
             {"/v1/files/[^/]+/content", "GET"},
             {"/v1/batches", "GET, POST"},
             {"/v1/batches/[^/]+", "GET"},
             {"/v1/batches/[^/]+/cancel", "POST"}}) {
      routes.emplace_back(std::regex(pattern), methods);
    }
    return routes;
  }();
  for (const auto& [route, methods] : kRoutes) {
    if (std::regex_match(path, route)) return methods;
  }
  return "";
}

}  // namespace

void ReadMissingBodyAsEmpty(const httplib::Request& request) {
  if (request.has_header("Content-Length") || request.has_header("Transfer-Encoding")) return;
  // httplib's request object is not const where it lives (Server::process_request's local);
  // the handler's signature is.
  const_cast<httplib::Request&>(request).headers.emplace("Content-Length", "0");
}

void AddOpenAiErrorBodies(httplib::Server& http, bool batches) {
  // A handler that throws is a defect: log what and where, and answer 500 (the error handler
  // below writes its body, which points at this log).
  http.set_exception_handler([](const httplib::Request& request, httplib::Response& response,
                                std::exception_ptr error) {
    std::string what = "an exception that is not a std::exception";
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    LOG(ERROR) << "HTTP " << request.method << " " << request.path << " failed: " << what;
    response.status = 500;
  });
  http.set_error_handler(httplib::Server::HandlerWithResponse([batches](
                                                                  const httplib::Request& request,
                                                                  httplib::Response& response) {
    if (!response.body.empty() || request.path.rfind("/v1/", 0) != 0) {
      return httplib::Server::HandlerResponse::Unhandled;
    }
    ApiError e;
    e.http_status = response.status;
    const std::string asked = absl::StrCat(request.method, " ", request.path);
    const bool batch_path = absl::StartsWith(request.path, "/v1/files") ||
                            absl::StartsWith(request.path, "/v1/batches");
    if (response.status == 404 && batch_path && !batches) {
      e.message = absl::StrCat(asked, ": this coordinator keeps no files or batches; start it "
                                      "with --data-dir DIR for the Files and Batches API");
      e.code = "unknown_url";
    } else if (response.status == 404) {
      const std::string allowed = AllowedMethods(request.path);
      if (allowed.empty()) {
        e.message = absl::StrCat("no such endpoint: ", asked,
                                 "; this server has the OpenAI API's /v1/models, /v1/completions, "
                                 "/v1/chat/completions, /v1/files and /v1/batches");
        e.code = "unknown_url";
      } else {
        e.http_status = 405;
        e.message = absl::StrCat(request.path, " takes ", allowed, ", not ", request.method);
        e.code = "method_not_allowed";
        response.set_header("Allow", allowed);
      }
    } else if (response.status == 413) {
      e.message = absl::StrCat("the request ", asked, " is larger than this server takes");
    } else if (response.status >= 500) {
      e.type = "server_error";
      e.message = absl::StrCat("the server failed on ", asked, " (status ", response.status,
                               "); see the coordinator's log");
    } else {
      e.message = absl::StrCat("the request ", asked, " could not be read as HTTP (status ",
                               response.status, ")");
    }
    response.status = e.http_status;
    SendError(response, e);
    return httplib::Server::HandlerResponse::Handled;
  }));
}

void AddOpenAiRoutes(httplib::Server& http, std::shared_ptr<grpc::Channel> channel,
                     const std::string& internal_token, const OpenAiOptions& options) {
  auto stub = std::shared_ptr<gemma::v1::Inference::Stub>(gemma::v1::Inference::NewStub(channel));
  const OpenAiOptions* opts = &options;
  auto served = [opts] {
    return opts->served_models ? opts->served_models()
                               : std::vector<std::string>{opts->model_name};
  };
  auto model_object = [opts](const std::string& name) {
    return ModelObject(name, opts->created, opts->max_model_len ? opts->max_model_len(name) : 0);
  };
  http.Get("/v1/models", [served, model_object](const httplib::Request&,
                                                httplib::Response& response) {
    json data = json::array();
    for (const std::string& name : served()) data.push_back(model_object(name));
    response.set_content(Dump(json{{"object", "list"}, {"data", data}}), "application/json");
  });
  http.Get(R"(/v1/models/([^/]+))", [served, model_object](const httplib::Request& request,
                                                            httplib::Response& response) {
    const std::vector<std::string> names = served();
    if (std::find(names.begin(), names.end(), std::string(request.matches[1])) == names.end()) {
      ApiError e = InvalidRequestError("model", absl::StrCat("The model `", std::string(request.matches[1]),
                                                 "` does not exist"));
      e.http_status = 404;
      e.code = "model_not_found";
      SendError(response, e);
      return;
    }
    response.set_content(Dump(model_object(std::string(request.matches[1]))), "application/json");
  });
  http.Post("/v1/completions", [stub, opts, internal_token](const httplib::Request& request,
                                                             httplib::Response& response) {
    Handle(request, response, ApiKind::kCompletion, stub.get(), *opts, internal_token);
  });
  http.Post("/v1/chat/completions", [stub, opts, internal_token](
                                        const httplib::Request& request,
                                        httplib::Response& response) {
    Handle(request, response, ApiKind::kChat, stub.get(), *opts, internal_token);
  });
}

}  // namespace gemma::coordinator
