#include "coordinator/openai_format.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <functional>
#include <random>
#include <set>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_format.h"

namespace gemma::coordinator {

using nlohmann::json;

ApiError InvalidRequestError(std::string param, std::string message) {
  ApiError e;
  e.param = std::move(param);
  e.message = std::move(message);
  return e;
}

namespace {

using nlohmann::json;

using nlohmann::json;



ApiError Unsupported(const std::string& param, const std::string& what) {
  ApiError e = InvalidRequestError(param, absl::StrCat(what, " is not supported by this server"));
  e.code = "unsupported_parameter";
  return e;
}

bool Present(const json& body, const char* key) {
  auto it = body.find(key);
  return it != body.end() && !it->is_null();
}

// Fields accepted when they ask for nothing this server does not do.
struct Harmless {
  const char* key;
  std::function<bool(const json&)> harmless;
};

const std::vector<Harmless>& HarmlessFields() {
  static const auto* fields = new std::vector<Harmless>{
      {"user", [](const json&) { return true; }},
      {"presence_penalty", [](const json& v) { return v.is_number() && v.get<double>() == 0; }},
      {"frequency_penalty", [](const json& v) { return v.is_number() && v.get<double>() == 0; }},
      {"logprobs", [](const json& v) { return v.is_boolean() ? !v.get<bool>() : false; }},
      {"logit_bias", [](const json& v) { return v.is_object() && v.empty(); }},
      {"echo", [](const json& v) { return v.is_boolean() && !v.get<bool>(); }},
      {"best_of", [](const json& v) { return v.is_number_integer() && v.get<int64_t>() == 1; }},
      {"response_format",
       [](const json& v) { return v.is_object() && v.contains("type") && v["type"] == "text"; }},
      {"parallel_tool_calls", [](const json&) { return true; }},
      {"store", [](const json& v) { return v.is_boolean() && !v.get<bool>(); }},
      {"metadata", [](const json&) { return true; }},
  };
  return *fields;
}

// Reads an optional number field in [lo, hi]; false with *error set when it is out of range.
bool ReadNumber(const json& body, const char* key, double lo, double hi, double* out,
                ApiError* error) {
  if (!Present(body, key)) return true;
  const json& v = body.at(key);
  if (!v.is_number()) {
    *error = InvalidRequestError(key, absl::StrCat(key, " must be a number"));
    return false;
  }
  const double x = v.get<double>();
  if (!(x >= lo && x <= hi)) {
    *error = InvalidRequestError(key, absl::StrFormat("%s must be in [%g, %g], got %g", key, lo, hi, x));
    return false;
  }
  *out = x;
  return true;
}

bool ReadInt(const json& body, const char* key, int64_t lo, int64_t* out, ApiError* error) {
  if (!Present(body, key)) return true;
  const json& v = body.at(key);
  if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
    *error = InvalidRequestError(key, absl::StrCat(key, " is too large: at most ", INT64_MAX));
    return false;
  }
  if (v.is_number_float() && std::isfinite(v.get<double>()) &&
      v.get<double>() == std::trunc(v.get<double>()) && std::abs(v.get<double>()) < 9.2e18) {
    // A whole number written as a float (100.0): its integer, as pydantic's lax mode takes it.
    const int64_t x = static_cast<int64_t>(v.get<double>());
    if (x < lo) {
      *error = InvalidRequestError(key, absl::StrCat(key, " must be at least ", lo, ", got ", x));
      return false;
    }
    *out = x;
    return true;
  }
  if (v.is_number_float()) {
    const double d = v.get<double>();
    *error = InvalidRequestError(
        key, std::isfinite(d) && std::abs(d) >= 9.2e18
                 ? absl::StrCat(key, " is too large: at most ", INT64_MAX)
                 : absl::StrCat(key, " must be an integer, got ", v.dump()));
    return false;
  }
  if (!v.is_number_integer()) {
    *error = InvalidRequestError(key, absl::StrCat(key, " must be an integer, got a JSON ",
                                                   v.type_name()));
    return false;
  }
  const int64_t x = v.get<int64_t>();
  if (x < lo) {
    *error = InvalidRequestError(key, absl::StrCat(key, " must be at least ", lo, ", got ", x));
    return false;
  }
  *out = x;
  return true;
}

// A client's JSON value for an error message, cut to 64 characters: messages are stored with
// batches and echoed back, so one must not carry a megabyte the client sent.
std::string Excerpt(std::string text) {
  if (text.size() > 64) text = text.substr(0, 61) + "...";
  return text;
}
std::string Excerpt(const json& value) {
  return Excerpt(value.dump(-1, ' ', false, json::error_handler_t::replace));
}

// A chat message's content: a string, or text parts.
bool ReadContent(const json& content, size_t index, std::string* out, ApiError* error) {
  const std::string param = absl::StrCat("messages[", index, "].content");
  if (content.is_string()) {
    *out = content.get<std::string>();
    return true;
  }
  if (!content.is_array()) {
    *error = InvalidRequestError(param, absl::StrCat(param, " must be a string or a list of text parts"));
    return false;
  }
  for (const json& part : content) {
    if (!part.is_object() || !part.contains("type") || part["type"] != "text" ||
        !part.contains("text") ||
        !part["text"].is_string()) {
      *error = Unsupported(param, "a content part other than {\"type\": \"text\", \"text\": ...}");
      return false;
    }
    *out += part["text"].get<std::string>();
  }
  return true;
}

bool ReadPrompt(const json& body, gemma::v1::GenerateRequest* request, ApiError* error) {
  if (!Present(body, "prompt")) {
    *error = InvalidRequestError("prompt", "prompt is required");
    return false;
  }
  json prompt = body.at("prompt");
  // A list of one prompt is that prompt.
  if (prompt.is_array() && prompt.size() == 1 && (prompt[0].is_string() || prompt[0].is_array())) {
    prompt = json(prompt[0]);
  }
  if (prompt.is_string()) {
    if (prompt.get<std::string>().empty()) {
      *error = InvalidRequestError("prompt", "prompt is empty; give some text or token ids");
      return false;
    }
    request->set_text(prompt.get<std::string>());
    return true;
  }
  if (prompt.is_array() && !prompt.empty()) {
    auto* ids = request->mutable_token_ids();
    const bool prompts = std::all_of(prompt.begin(), prompt.end(), [](const json& p) {
      return p.is_string() || p.is_array();
    });
    if (prompts) {
      *error = Unsupported("prompt", "more than one prompt per request");
      return false;
    }
    size_t index = 0;
    for (const json& id : prompt) {
      if (!id.is_number_integer()) {
        *error = InvalidRequestError(
            "prompt", absl::StrCat("prompt[", index, "] must be a token id (a whole number), got ",
                                   Excerpt(id), "; a prompt is a string or a list of token ids"));
        return false;
      }
      ++index;
      const int64_t v = id.get<int64_t>();
      if (v < 0 || v > INT32_MAX) {
        *error = InvalidRequestError("prompt", absl::StrCat("token id ", v, " is not a valid id"));
        return false;
      }
      ids->add_ids(static_cast<int32_t>(v));
    }
    return true;
  }
  *error = InvalidRequestError("prompt", "prompt must be a string or a list of token ids");
  return false;
}

bool ReadMessages(const json& body, gemma::v1::GenerateRequest* request, ApiError* error) {
  if (!Present(body, "messages") || !body.at("messages").is_array() ||
      body.at("messages").empty()) {
    *error = InvalidRequestError("messages", "messages must be a non-empty list");
    return false;
  }
  auto* chat = request->mutable_chat();
  size_t index = 0;
  for (const json& message : body.at("messages")) {
    const std::string param = absl::StrCat("messages[", index, "]");
    if (!message.is_object() || !message.contains("role") || !message["role"].is_string()) {
      *error = InvalidRequestError(param, absl::StrCat(param, " must be an object with a role"));
      return false;
    }
    std::string role = message["role"].get<std::string>();
    if (role == "developer") role = "system";
    if (role == "tool" || role == "function") {
      *error = Unsupported(param + ".role", absl::StrCat("the role ", Excerpt(json(role))));
      return false;
    }
    if (role != "system" && role != "user" && role != "assistant") {
      *error = InvalidRequestError(param + ".role",
                       absl::StrCat("unknown role ", Excerpt(json(role)),
                                    "; use system, developer, user or assistant"));
      return false;
    }
    for (const char* key : {"tool_calls", "function_call", "audio"}) {
      if (Present(message, key)) {
        *error = Unsupported(param + "." + key, absl::StrCat(key, " in a message"));
        return false;
      }
    }
    std::string content;
    if (!Present(message, "content") && role != "assistant") {
      *error = InvalidRequestError(
          param + ".content",
          absl::StrCat(param, ".content is required for a ", role, " message (a string or a "
                              "list of text parts)"));
      return false;
    }
    if (Present(message, "content") && !ReadContent(message["content"], index, &content, error)) {
      return false;
    }
    if (Present(message, "name") && !message["name"].is_string()) {
      *error = InvalidRequestError(param + ".name", absl::StrCat(param, ".name must be a string"));
      return false;
    }
    auto* m = chat->add_messages();
    m->set_role(role);
    m->set_content(content);
    ++index;
  }
  return true;
}

}  // namespace

// JSON text of `value`; bytes that are not UTF-8 (a token's text may end inside a character)
// become U+FFFD rather than an exception.

std::string Dump(const json& value) {
  return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

bool ParseJsonObject(const std::string& text, const std::string& what, json* out,
                     std::string* error) {
  try {
    *out = json::parse(text);
  } catch (const json::parse_error& e) {
    // "[json.exception.parse_error.101] parse error at line 1, column 2: <reason>": keep the
    // position and the reason, without the library's prefix.
    std::string message = e.what();
    const size_t at = message.find("parse error");
    if (at != std::string::npos) message = message.substr(at);
    *error = absl::StrCat(what, " is not valid JSON: ", message);
    return false;
  } catch (const json::exception& e) {
    // A number past the range of a double ("1e999"): the library's out_of_range.406.
    std::string message = e.what();
    const size_t at = message.find("] ");
    if (at != std::string::npos) message = message.substr(at + 2);
    *error = absl::StrCat(what, " cannot be read: ", message,
                          " (numbers must fit a 64-bit float)");
    return false;
  }
  if (!out->is_object()) {
    *error = absl::StrCat(what, " is a JSON ", out->type_name(), ", not an object");
    return false;
  }
  return true;
}

std::string NewId(const char* prefix) {
  thread_local std::mt19937_64 rng(std::random_device{}());
  return absl::StrFormat("%s%016x%08x", prefix, rng(), static_cast<uint32_t>(rng()));
}

json ModelObject(const std::string& name, int64_t created, int64_t max_model_len) {
  json model = {{"id", name},
                {"object", "model"},
                {"created", created},
                {"owned_by", "gemma-cluster"},
                {"root", name}};
  if (max_model_len > 0) model["max_model_len"] = max_model_len;
  return model;
}

int64_t UnixNow() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

json Usage(const gemma::v1::GenerateFinal& final) {
  return {{"prompt_tokens", final.prompt_tokens()},
          {"completion_tokens", final.generated_tokens()},
          {"total_tokens", final.prompt_tokens() + final.generated_tokens()}};
}

// One OpenAI response or chunk around `choice`.
json Envelope(ApiKind kind, bool chunk, const std::string& id, int64_t created,
              const std::string& model, json choices) {
  const char* object = kind == ApiKind::kChat
                           ? (chunk ? "chat.completion.chunk" : "chat.completion")
                           : "text_completion";
  return {{"id", id}, {"object", object}, {"created", created}, {"model", model},
          {"choices", std::move(choices)}};
}

json Choice(ApiKind kind, bool chunk, const std::string& text, const json& finish_reason,
            bool first) {
  json choice = {{"index", 0}, {"logprobs", nullptr}, {"finish_reason", finish_reason}};
  if (kind == ApiKind::kCompletion) {
    choice["text"] = text;
  } else if (chunk) {
    json delta = json::object();
    if (first) delta["role"] = "assistant";
    if (!text.empty() || first) delta["content"] = text;
    choice["delta"] = delta;
  } else {
    choice["message"] = {{"role", "assistant"}, {"content", text}};
  }
  return choice;
}

json ResponseBody(ApiKind kind, const std::string& id, int64_t created, const std::string& model,
                  const std::string& text, const gemma::v1::GenerateFinal& final) {
  json out = Envelope(kind, false, id, created, model,
                      json::array({Choice(kind, false, text,
                                          OpenAiFinishReason(final.finish_reason()), false)}));
  out["usage"] = Usage(final);
  return out;
}

json ApiError::ToJson() const {
  return {{"message", message},
          {"type", type},
          {"param", param.empty() ? json(nullptr) : json(param)},
          {"code", code.empty() ? json(nullptr) : json(code)}};
}

ParseResult ParseOpenAiRequest(const json& body, ApiKind kind, const OpenAiOptions& options) {
  ParseResult result;
  ApiError& error = result.error;
  gemma::v1::GenerateRequest& request = result.parsed.request;

  static const std::set<std::string> kCompletionFields = {
      "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n",
      "stream", "stream_options", "suffix", "skip_special_tokens", "ignore_eos"};
  static const std::set<std::string> kChatFields = {
      "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
      "top_k", "seed", "stop", "n", "stream", "stream_options", "tools", "tool_choice",
      "functions", "function_call", "top_logprobs", "modalities", "audio", "reasoning_effort",
      "skip_special_tokens", "ignore_eos"};
  const auto& known = kind == ApiKind::kChat ? kChatFields : kCompletionFields;
  if (Present(body, "user") && !body["user"].is_string()) {
    error = InvalidRequestError("user", "user must be a string");
    return result;
  }
  if (Present(body, "metadata")) {
    const json& metadata = body["metadata"];
    const bool strings = metadata.is_object() &&
                         std::all_of(metadata.begin(), metadata.end(),
                                     [](const json& v) { return v.is_string(); });
    if (!strings) {
      error = InvalidRequestError("metadata", "metadata must be an object of string values");
      return result;
    }
  }
  for (const auto& [key, value] : body.items()) {
    if (known.count(key)) continue;
    bool harmless_field = false;
    for (const Harmless& h : HarmlessFields()) {
      if (key != h.key) continue;
      harmless_field = true;
      if (!value.is_null() && !h.harmless(value)) {
        error = Unsupported(key, absl::StrCat(key, " = ", Excerpt(value)));
        return result;
      }
    }
    if (!harmless_field) {
      error = InvalidRequestError(Excerpt(key), absl::StrCat("Unrecognized request argument supplied: ",
                                                           Excerpt(key)));
      return result;
    }
  }
  for (const char* key : {"tools", "tool_choice", "functions", "function_call", "top_logprobs",
                          "audio", "suffix", "reasoning_effort"}) {
    if (Present(body, key)) {
      error = Unsupported(key, key);
      return result;
    }
  }
  if (Present(body, "modalities") && body["modalities"] != json::array({"text"})) {
    error = Unsupported("modalities", "an output other than text");
    return result;
  }

  if (!Present(body, "model")) {
    error = InvalidRequestError("model", "model is required (GET /v1/models lists the models served)");
    return result;
  }
  if (!body["model"].is_string()) {
    error = InvalidRequestError("model", absl::StrCat("model must be a string (a name GET "
                                                      "/v1/models lists), got a JSON ",
                                                      body["model"].type_name()));
    return result;
  }
  const std::string model = body["model"].get<std::string>();
  const std::vector<std::string> served =
      options.served_models ? options.served_models() : std::vector<std::string>{options.model_name};
  if (std::find(served.begin(), served.end(), model) == served.end()) {
    error = InvalidRequestError("model", absl::StrCat("The model `", Excerpt(model), "` does not exist; this server "
                                          "serves `", absl::StrJoin(served, "`, `"), "`"));
    error.http_status = 404;
    error.code = "model_not_found";
    return result;
  }
  request.set_model(model);
  if (kind == ApiKind::kChat ? !ReadMessages(body, &request, &error)
                             : !ReadPrompt(body, &request, &error)) {
    return result;
  }

  int64_t n = 1;
  if (!ReadInt(body, "n", 1, &n, &error)) return result;
  if (n != 1) {
    error = Unsupported("n", "n other than 1");
    return result;
  }
  int64_t max_tokens = kind == ApiKind::kChat ? options.default_chat_max_tokens : 16;
  if (!ReadInt(body, "max_tokens", 1, &max_tokens, &error)) return result;
  if (kind == ApiKind::kChat && !ReadInt(body, "max_completion_tokens", 1, &max_tokens, &error)) {
    return result;
  }
  request.set_max_tokens(max_tokens);
  // A default the client never sent gives way to a long input instead of refusing it.
  if (!Present(body, "max_tokens") &&
      !(kind == ApiKind::kChat && Present(body, "max_completion_tokens"))) {
    request.set_max_tokens_up_to_context(true);
  }

  auto* sampling = request.mutable_sampling();
  double temperature = 1.0, top_p = 1.0;  // OpenAI's defaults
  if (!ReadNumber(body, "temperature", 0, 2, &temperature, &error)) return result;
  if (!ReadNumber(body, "top_p", -HUGE_VAL, HUGE_VAL, &top_p, &error)) return result;
  if (!(top_p > 0 && top_p <= 1)) {
    error = InvalidRequestError("top_p", absl::StrFormat("top_p must be in (0, 1]: above 0, at "
                                                         "most 1, got %g", top_p));
    return result;
  }
  sampling->set_temperature(static_cast<float>(temperature));
  if (top_p < 1) sampling->set_top_p(static_cast<float>(top_p));
  // An extension (vLLM's), true by default as there: special tokens stay out of the text.
  bool skip_special = true;
  if (Present(body, "skip_special_tokens")) {
    if (!body["skip_special_tokens"].is_boolean()) {
      error = InvalidRequestError("skip_special_tokens", "skip_special_tokens must be true or false");
      return result;
    }
    skip_special = body["skip_special_tokens"].get<bool>();
  }
  request.set_skip_special_tokens(skip_special);
  // An extension (vLLM's): do not stop at the model's end ids (benchmarks ask for it).
  if (Present(body, "ignore_eos")) {
    if (!body["ignore_eos"].is_boolean()) {
      error = InvalidRequestError("ignore_eos", "ignore_eos must be true or false");
      return result;
    }
    request.set_ignore_eos(body["ignore_eos"].get<bool>());
  }
  if (Present(body, "top_k")) {  // an extension (vLLM's): -1 or 0 keeps every token
    int64_t top_k = 0;
    if (!ReadInt(body, "top_k", -1, &top_k, &error)) return result;
    if (top_k > INT32_MAX) {
      error = InvalidRequestError("top_k", "top_k is too large");
      return result;
    }
    sampling->set_top_k(top_k < 0 ? 0 : static_cast<int32_t>(top_k));
  }
  if (Present(body, "seed")) {
    // A 64-bit signed integer, as vLLM takes it (each value its own stream: negative seeds map
    // above 2^63, where no non-negative one goes).
    json seed = body["seed"];
    // A whole number written as a float (7.0) is that integer, as for the other integer fields.
    if (seed.is_number_float() && std::isfinite(seed.get<double>()) &&
        seed.get<double>() == std::trunc(seed.get<double>()) &&
        std::abs(seed.get<double>()) < 9.2e18) {
      seed = static_cast<int64_t>(seed.get<double>());
    }
    const bool integer = seed.is_number_integer() &&
                         !(seed.is_number_unsigned() &&
                           seed.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX));
    if (!integer) {
      error = InvalidRequestError(
          "seed", absl::StrCat("seed must be an integer in [", INT64_MIN, ", ", INT64_MAX,
                               "], got ", Excerpt(seed)));
      return result;
    }
    sampling->set_seed(static_cast<uint64_t>(seed.get<int64_t>()));
  }
  if (Present(body, "stop")) {
    const json& stop = body["stop"];
    if (stop.is_string()) {
      request.add_stop_strings(stop.get<std::string>());
    } else if (stop.is_array()) {
      for (const json& s : stop) {
        if (!s.is_string()) {
          error = InvalidRequestError("stop", "stop must be a string or a list of strings");
          return result;
        }
        request.add_stop_strings(s.get<std::string>());
      }
    } else {
      error = InvalidRequestError("stop", "stop must be a string or a list of strings");
      return result;
    }
  }
  if (Present(body, "stream")) {
    if (!body["stream"].is_boolean()) {
      error = InvalidRequestError("stream", "stream must be true or false");
      return result;
    }
    result.parsed.stream = body["stream"].get<bool>();
  }
  if (Present(body, "stream_options")) {
    const json& so = body["stream_options"];
    if (!result.parsed.stream) {
      error = InvalidRequestError("stream_options", "stream_options is only allowed with stream: true");
      return result;
    }
    if (!so.is_object()) {
      error = InvalidRequestError("stream_options", "stream_options must be an object");
      return result;
    }
    for (const auto& [key, value] : so.items()) {
      if (key == "include_usage" && value.is_boolean()) {
        result.parsed.include_usage = value.get<bool>();
      } else if (key != "include_obfuscation") {
        error = Unsupported("stream_options." + key, key);
        return result;
      }
    }
  }
  result.ok = true;
  return result;
}

std::string OpenAiFinishReason(const std::string& ours) {
  if (ours == "end_id" || ours == "stop_token" || ours == "stop_string") return "stop";
  if (ours == "max_tokens" || ours == "length" || ours == "context_length") return "length";
  return ours;
}

ApiError ApiErrorFromGrpc(const grpc::Status& status) {
  ApiError e;
  e.message = status.error_message();
  switch (status.error_code()) {
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::OUT_OF_RANGE:
    case grpc::StatusCode::FAILED_PRECONDITION:
      e.http_status = 400;
      break;
    case grpc::StatusCode::NOT_FOUND:
      e.http_status = 404;
      e.code = absl::StartsWith(e.message, "The model `") ? "model_not_found" : "not_found";
      break;
    case grpc::StatusCode::UNAUTHENTICATED:
      e.http_status = 401;
      e.type = "authentication_error";
      break;
    case grpc::StatusCode::PERMISSION_DENIED:
      e.http_status = 403;
      e.type = "permission_error";
      break;
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      e.http_status = 429;
      e.type = "rate_limit_error";
      break;
    case grpc::StatusCode::UNAVAILABLE:
      e.http_status = 503;
      e.type = "service_unavailable";
      break;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      e.http_status = 504;
      e.type = "timeout";
      break;
    default:
      e.http_status = 500;
      e.type = "server_error";
  }
  return e;
}

json BatchOutputLine(const gemma::v1::BatchResult& result, const std::string& batch_id,
                     const std::string& model_name, int64_t created) {
  const std::string request_id = absl::StrCat(batch_id, "-", result.offset());
  json response;
  if (result.error_code() != 0) {
    const ApiError e = ApiErrorFromGrpc(grpc::Status(
        static_cast<grpc::StatusCode>(result.error_code()), result.error_message()));
    response = {{"status_code", e.http_status},
                {"request_id", request_id},
                {"body", {{"error", e.ToJson()}}}};
  } else {
    const gemma::v1::GenerateResponse& r = result.response();
    json body;
    if (result.endpoint().empty()) {
      body = {{"text", r.text()},
              {"token_ids", std::vector<int32_t>(r.token_ids().begin(), r.token_ids().end())},
              {"finish_reason", r.final().finish_reason()},
              {"prompt_tokens", r.final().prompt_tokens()},
              {"completion_tokens", r.final().generated_tokens()}};
    } else {
      const ApiKind kind =
          result.endpoint() == "/v1/chat/completions" ? ApiKind::kChat : ApiKind::kCompletion;
      body = ResponseBody(kind, absl::StrCat(kind == ApiKind::kChat ? "chatcmpl-" : "cmpl-",
                                             request_id),
                          created, result.model().empty() ? model_name : result.model(), r.text(),
                          r.final());
    }
    response = {{"status_code", 200}, {"request_id", request_id}, {"body", body}};
  }
  return {{"id", absl::StrCat("batch_req_", request_id)},
          {"custom_id", result.custom_id()},
          {"response", response},
          {"error", nullptr}};
}

bool BatchFinal(const std::string& status) {
  return status == "completed" || status == "failed" || status == "expired" ||
         status == "cancelled";
}

json BatchObject(const gemma::v1::Batch& batch) {
  auto stamp = [](int64_t t) { return t > 0 ? json(t) : json(nullptr); };
  json errors = nullptr;
  if (batch.errors_size() > 0) {
    json data = json::array();
    for (const auto& e : batch.errors()) {
      data.push_back({{"code", e.code()},
                      {"message", e.message()},
                      {"param", nullptr},
                      {"line", e.line() > 0 ? json(e.line()) : json(nullptr)}});
    }
    if (batch.refused() > batch.errors_size()) {
      data.push_back(
          {{"code", "more_errors"},
           {"message", absl::StrCat(batch.refused() - batch.errors_size(),
                                    " more lines were refused; every refused line's error is in "
                                    "the batch's error file")},
           {"param", nullptr},
           {"line", nullptr}});
    }
    errors = {{"object", "list"}, {"data", data}};
  }
  const bool final = BatchFinal(batch.status());
  json metadata = json::object();
  for (const auto& [k, v] : batch.metadata()) metadata[k] = v;
  return {{"id", batch.id()},
          {"object", "batch"},
          {"endpoint", batch.endpoint()},
          {"errors", errors},
          {"input_file_id", batch.input_file_id()},
          {"completion_window", "24h"},
          {"status", batch.status()},
          {"output_file_id", final && batch.counts().completed() > 0
                                 ? json(batch.id() + "-output")
                                 : json(nullptr)},
          {"error_file_id", batch.counts().failed() > 0 && final ? json(batch.id() + "-errors")
                                                                   : json(nullptr)},
          {"created_at", batch.created_at()},
          {"in_progress_at", stamp(batch.in_progress_at())},
          {"expires_at", stamp(batch.expires_at())},
          {"finalizing_at", stamp(batch.finalizing_at())},
          {"completed_at", stamp(batch.completed_at())},
          {"failed_at", stamp(batch.failed_at())},
          {"expired_at", stamp(batch.expired_at())},
          {"cancelling_at", stamp(batch.cancelling_at())},
          {"cancelled_at", stamp(batch.cancelled_at())},
          {"request_counts",
           {{"total", batch.counts().total()},
            {"completed", batch.counts().completed()},
            {"failed", batch.counts().failed()}}},
          {"usage",
           {{"input_tokens", batch.prompt_tokens()},
            {"output_tokens", batch.completion_tokens()},
            {"total_tokens", batch.prompt_tokens() + batch.completion_tokens()}}},
          {"metadata", metadata}};
}

}  // namespace gemma::coordinator
