#include "coordinator/request_checks.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/tokenizer/chat_format.h"

namespace gemma::coordinator {

using gemma::v1::GenerateRequest;

absl::Status ValidateGenerateRequest(const GenerateRequest& request, const ModelLimits& limits) {
  const int64_t max_tokens = request.max_tokens() > 0 ? request.max_tokens() : kDefaultMaxTokens;
  if (request.priority() < kMinPriority || request.priority() > 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "priority must be in [", kMinPriority, ", 0] (0: interactive), got ", request.priority()));
  }
  if (request.max_tokens() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens must be >= 0 (0: the default), got ", request.max_tokens()));
  }
  switch (request.input_case()) {
    case GenerateRequest::kText:
      if (request.text().empty()) return absl::InvalidArgumentError("text is empty");
      if (request.text().size() > kMaxInputBytes) {
        return absl::InvalidArgumentError(absl::StrCat(
            "text of ", request.text().size(), " bytes is over the limit of ", kMaxInputBytes,
            " bytes; split the work into several requests"));
      }
      break;
    case GenerateRequest::kTokenIds: {
      const auto& ids = request.token_ids().ids();
      if (ids.empty()) {
        return absl::InvalidArgumentError("token_ids is empty; give at least one id");
      }
      for (int i = 0; i < ids.size(); ++i) {
        if (ids[i] < 0) {
          return absl::InvalidArgumentError(
              absl::StrCat("token id ", ids[i], " at position ", i, " is negative"));
        }
        if (limits.vocab_size > 0 && ids[i] >= limits.vocab_size) {
          return absl::InvalidArgumentError(
              absl::StrCat("token id ", ids[i], " at position ", i,
                           " is outside the vocabulary: the model has ", limits.vocab_size,
                           " ids"));
        }
      }
      if (limits.max_context > 0 && ids.size() >= limits.max_context) {
        return absl::InvalidArgumentError(absl::StrCat(
            "input of ", ids.size(), " tokens leaves no room to generate: this cluster serves at "
            "most ", limits.max_context, " positions; shorten the input to under ",
            limits.max_context, " tokens"));
      }
      // Compared without forming the sum: max_tokens may be near INT64_MAX.
      if (limits.max_context > 0 && !request.max_tokens_up_to_context() &&
          max_tokens > limits.max_context - ids.size()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "input of ", ids.size(), " tokens plus max_tokens ", max_tokens,
            " does not fit the context: this cluster serves at most ", limits.max_context,
            " positions; shorten the input or lower max_tokens (at most ",
            std::max<int64_t>(0, limits.max_context - ids.size()), " here)"));
      }
      break;
    }
    case GenerateRequest::kChat: {
      const auto& messages = request.chat().messages();
      if (messages.empty()) {
        return absl::InvalidArgumentError("chat has no messages; give at least one user turn");
      }
      if (messages.size() > kMaxChatMessages) {
        return absl::InvalidArgumentError(absl::StrCat("chat has ", messages.size(),
                                                       " messages, over the limit of ",
                                                       kMaxChatMessages));
      }
      size_t content_bytes = 0;
      for (int i = 0; i < messages.size(); ++i) {
        if (messages[i].role().empty()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "chat message ", i, " has no role; use system, developer, user, assistant or "
              "model"));
        }
        if (!tokenizer::IsKnownChatRole(messages[i].role())) {
          return absl::InvalidArgumentError(absl::StrCat(
              "chat message ", i, " has role \"", messages[i].role(),
              "\"; use system, developer, user, assistant or model"));
        }
        content_bytes += messages[i].content().size();
      }
      if (content_bytes > kMaxInputBytes) {
        return absl::InvalidArgumentError(absl::StrCat(
            "chat contents of ", content_bytes, " bytes are over the limit of ", kMaxInputBytes,
            " bytes; shorten the conversation"));
      }
      break;
    }
    default:
      return absl::InvalidArgumentError(
          "the request has no input; set text, token_ids or chat");
  }
  if (request.input_case() != GenerateRequest::kTokenIds && limits.max_context > 0 &&
      !request.max_tokens_up_to_context() && max_tokens >= limits.max_context) {
    // At least one input token besides the generated ones.
    return absl::InvalidArgumentError(absl::StrCat(
        "max_tokens ", max_tokens, " leaves no room for the input: this cluster serves at most ",
        limits.max_context, " positions; lower max_tokens"));
  }
  const gemma::v1::SamplingParams& sampling = request.sampling();
  if (!std::isfinite(sampling.temperature()) || sampling.temperature() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be >= 0 (0 is greedy), got ", sampling.temperature()));
  }
  if (sampling.top_k() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_k must be >= 0 (0 keeps every token), got ", sampling.top_k()));
  }
  if (sampling.has_top_p() && !(sampling.top_p() > 0 && sampling.top_p() <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_p must be in (0, 1], got ", sampling.top_p()));
  }
  if (request.stop_token_ids_size() > kMaxStopTokenIds) {
    return absl::InvalidArgumentError(absl::StrCat(request.stop_token_ids_size(),
                                                   " stop ids, over the limit of ",
                                                   kMaxStopTokenIds));
  }
  if (request.stop_strings_size() > kMaxStopStrings) {
    return absl::InvalidArgumentError(absl::StrCat(request.stop_strings_size(),
                                                   " stop strings, over the limit of ",
                                                   kMaxStopStrings));
  }
  for (int32_t id : request.stop_token_ids()) {
    if (id < 0 || (limits.vocab_size > 0 && id >= limits.vocab_size)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "unknown stop id ", id, ": ",
          limits.vocab_size > 0
              ? absl::StrCat("the model's vocabulary has ", limits.vocab_size, " ids")
              : std::string("ids are never negative")));
    }
  }
  for (const std::string& stop : request.stop_strings()) {
    if (stop.empty()) return absl::InvalidArgumentError("a stop string is empty");
    if (stop.size() > kMaxStopStringBytes) {
      return absl::InvalidArgumentError(absl::StrCat("a stop string of ", stop.size(),
                                                     " bytes is over the limit of ",
                                                     kMaxStopStringBytes, " bytes"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckDeadline(std::chrono::system_clock::time_point deadline,
                           std::chrono::system_clock::time_point now) {
  if (deadline > now) return absl::OkStatus();
  return absl::DeadlineExceededError(absl::StrCat(
      "the request's deadline had passed when the coordinator received it (",
      std::chrono::duration_cast<std::chrono::milliseconds>(now - deadline).count(),
      " ms before); give the call a later deadline"));
}

void PrepareForReplicas(GenerateRequest* request, uint64_t random_seed) {
  if (request->max_tokens() == 0) request->set_max_tokens(kDefaultMaxTokens);
  gemma::v1::SamplingParams* sampling = request->mutable_sampling();
  if (sampling->temperature() > 0 && !sampling->has_seed()) sampling->set_seed(random_seed);
}

}  // namespace gemma::coordinator
