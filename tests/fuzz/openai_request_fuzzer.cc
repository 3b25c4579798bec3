// libFuzzer entry point: arbitrary bytes as the body of POST /v1/completions and
// /v1/chat/completions. The body is read as the HTTP API reads it (coordinator/openai_api.cc:
// JSON without exceptions, an object), then ParseOpenAiRequest turns it into a GenerateRequest
// or an ApiError, for both endpoints, with one served model and with several. It must never
// throw, and what it accepts must be what it promises.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "coordinator/openai_format.h"
#include "glog/logging.h"
#include "nlohmann/json.hpp"

namespace {

using gemma::coordinator::ApiKind;
using gemma::coordinator::OpenAiOptions;
using gemma::coordinator::ParseResult;
using gemma::v1::GenerateRequest;

const std::vector<OpenAiOptions>& Options() {
  static const auto* options = [] {
    auto* all = new std::vector<OpenAiOptions>(2);
    (*all)[1].served_models = [] { return std::vector<std::string>{"gemma-4", "gemma-4-moe"}; };
    (*all)[1].default_chat_max_tokens = 7;
    return all;
  }();
  return *options;
}

void Check(const ParseResult& result, ApiKind kind, const OpenAiOptions& options) {
  if (!result.ok) {
    CHECK(!result.error.message.empty());
    CHECK(result.error.http_status == 400 || result.error.http_status == 404)
        << result.error.http_status;
    // What the API sends back.
    (void)gemma::coordinator::Dump(nlohmann::json{{"error", result.error.ToJson()}});
    return;
  }
  const GenerateRequest& request = result.parsed.request;
  const std::vector<std::string> served =
      options.served_models ? options.served_models()
                            : std::vector<std::string>{options.model_name};
  CHECK(std::find(served.begin(), served.end(), request.model()) != served.end())
      << request.model();
  if (kind == ApiKind::kChat) {
    CHECK_EQ(request.input_case(), GenerateRequest::kChat);
    CHECK_GT(request.chat().messages_size(), 0);
  } else {
    CHECK(request.input_case() == GenerateRequest::kText ||
          request.input_case() == GenerateRequest::kTokenIds);
    for (int32_t id : request.token_ids().ids()) CHECK_GE(id, 0);
  }
  CHECK_GE(request.max_tokens(), 1);
  CHECK(request.sampling().temperature() >= 0 && request.sampling().temperature() <= 2);
  CHECK(!request.sampling().has_top_p() ||
        (request.sampling().top_p() > 0 && request.sampling().top_p() < 1));
  CHECK_GE(request.sampling().top_k(), 0);
  CHECK(!result.parsed.include_usage || result.parsed.stream);
  std::string wire;
  CHECK(request.SerializeToString(&wire));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  nlohmann::json body = nlohmann::json::parse(data, data + size, nullptr,
                                              /*allow_exceptions=*/false);
  if (body.is_discarded() || !body.is_object()) return 0;
  for (const OpenAiOptions& options : Options()) {
    for (ApiKind kind : {ApiKind::kCompletion, ApiKind::kChat}) {
      Check(gemma::coordinator::ParseOpenAiRequest(body, kind, options), kind, options);
    }
  }
  return 0;
}
