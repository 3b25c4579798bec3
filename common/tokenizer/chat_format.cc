// Gemma 4 chat prompt rendering.
#include "common/tokenizer/chat_format.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/tokenizer/unicode.h"

namespace gemma::tokenizer {
namespace {

constexpr std::string_view kTurnStart = "<|turn>";
constexpr std::string_view kTurnEnd = "<turn|>\n";
constexpr std::string_view kThink = "<|think|>";
constexpr std::string_view kChannelOpen = "<|channel>";
constexpr std::string_view kChannelClose = "<channel|>";
constexpr std::string_view kEmptyThought = "<|channel>thought\n<channel|>";

}  // namespace

std::string StripThinking(std::string_view content) {
  // Each piece between "<channel|>" markers keeps only what precedes a "<|channel>".
  std::string kept;
  for (absl::string_view part : absl::StrSplit(AsAbsl(content), AsAbsl(kChannelClose))) {
    const size_t open = part.find(AsAbsl(kChannelOpen));
    const absl::string_view keep = open == absl::string_view::npos ? part : part.substr(0, open);
    kept.append(keep.data(), keep.size());
  }
  return std::string(StripPythonSpace(kept));
}

bool IsKnownChatRole(std::string_view role) {
  return role == "system" || role == "developer" || role == "user" || role == "assistant" ||
         role == "model";
}

absl::StatusOr<std::string> RenderGemma4Chat(absl::Span<const ChatMessage> messages,
                                             const ChatOptions& options,
                                             std::vector<std::pair<size_t, size_t>>* content_ranges) {
  for (size_t i = 0; i < messages.size(); ++i) {
    if (!IsKnownChatRole(messages[i].role)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "chat message ", i, " has role \"", AsAbsl(messages[i].role),
          "\"; use system, developer, user, assistant or model"));
    }
  }
  auto append_content = [&](std::string* prompt, std::string_view content) {
    const size_t begin = prompt->size();
    prompt->append(content);
    if (content_ranges != nullptr && prompt->size() > begin) {
      content_ranges->emplace_back(begin, prompt->size());
    }
  };
  std::string prompt = options.bos_token;
  size_t first = 0;
  const bool has_system =
      !messages.empty() && (messages[0].role == "system" || messages[0].role == "developer");
  if (options.enable_thinking || has_system) {
    absl::StrAppend(&prompt, AsAbsl(kTurnStart), "system\n");
    if (options.enable_thinking) prompt.append(kThink);
    if (has_system) {
      append_content(&prompt, StripPythonSpace(messages[0].content));
      first = 1;
    }
    prompt.append(kTurnEnd);
  }
  for (size_t i = first; i < messages.size(); ++i) {
    const ChatMessage& message = messages[i];
    const bool is_model = message.role == "assistant" || message.role == "model";
    absl::StrAppend(&prompt, AsAbsl(kTurnStart), is_model ? "model" : message.role, "\n");
    if (is_model) {
      append_content(&prompt, StripThinking(message.content));
    } else {
      append_content(&prompt, StripPythonSpace(message.content));
    }
    prompt.append(kTurnEnd);
  }
  if (options.add_generation_prompt) {
    absl::StrAppend(&prompt, AsAbsl(kTurnStart), "model\n");
    if (!options.enable_thinking) prompt.append(kEmptyThought);
  }
  return prompt;
}

absl::Status ParseChatRequest(const nlohmann::json& request, std::vector<ChatMessage>* messages,
                              ChatOptions* options) {
  const nlohmann::json* list = &request;
  if (request.is_object()) {
    auto it = request.find("messages");
    if (it == request.end()) return absl::InvalidArgumentError("chat request has no messages");
    list = &*it;
    for (const char* key : {"add_generation_prompt", "enable_thinking"}) {
      auto flag = request.find(key);
      if (flag == request.end()) continue;
      if (!flag->is_boolean()) {
        return absl::InvalidArgumentError(absl::StrCat("chat request: ", key, " is not bool"));
      }
      (std::string_view(key) == "enable_thinking" ? options->enable_thinking
                                                  : options->add_generation_prompt) =
          flag->get<bool>();
    }
  }
  if (!list->is_array()) return absl::InvalidArgumentError("chat messages are not an array");
  for (const nlohmann::json& entry : *list) {
    if (!entry.is_object() || !entry.contains("role") || !entry["role"].is_string() ||
        !entry.contains("content") || !entry["content"].is_string()) {
      return absl::InvalidArgumentError(
          "each chat message needs a string \"role\" and a string \"content\"");
    }
    messages->push_back({entry["role"].get<std::string>(), entry["content"].get<std::string>()});
  }
  return absl::OkStatus();
}

}  // namespace gemma::tokenizer
