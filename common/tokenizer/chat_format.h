// The Gemma 4 chat prompt format (the large models' template): system/developer, user and
// model turns, the generation prompt with thinking on or off, and the stripping of earlier
// thoughts. Produces the same string as the checkpoint's chat_template.jinja; no tokenizer.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "nlohmann/json.hpp"

namespace gemma::tokenizer {

struct ChatMessage {
  std::string role;  // "system", "developer", "user", "assistant" or "model".
  std::string content;
};

struct ChatOptions {
  bool add_generation_prompt = true;
  // On: "<|think|>" opens the system turn and the model turn is left open for thoughts.
  // Off: the generation prompt carries the pre-closed empty thought channel.
  bool enable_thinking = false;
  std::string bos_token = "<bos>";
};

// The roles a chat message may have: system, developer, user, assistant, model.
bool IsKnownChatRole(std::string_view role);

// Renders the prompt. Starts with exactly one bos_token; encode the result without adding
// special tokens. A leading system or developer message becomes the system turn; later
// messages keep their role ("assistant" becomes "model"). Model turns lose any
// "<|channel>...<channel|>" thoughts. `content_ranges`, when given, receives the byte range of
// each message's content in the prompt (for EncodeOptions::plain_ranges). Errors: a role that
// is not one of the known roles.
absl::StatusOr<std::string> RenderGemma4Chat(
    absl::Span<const ChatMessage> messages, const ChatOptions& options = {},
    std::vector<std::pair<size_t, size_t>>* content_ranges = nullptr);

// Model-turn content with thought channels removed and surrounding whitespace trimmed.
std::string StripThinking(std::string_view content);

// Parses {"messages": [{"role": ..., "content": ...}], "add_generation_prompt": bool,
// "enable_thinking": bool} (or a bare array of messages) into messages and options.
absl::Status ParseChatRequest(const nlohmann::json& request, std::vector<ChatMessage>* messages,
                              ChatOptions* options);

}  // namespace gemma::tokenizer
