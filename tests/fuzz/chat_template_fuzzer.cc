// libFuzzer entry point: arbitrary bytes as a chat request ({"messages": [{"role", "content"}],
// "add_generation_prompt", "enable_thinking"} or a bare list of messages, as gemma-tokenize
// reads it). ParseChatRequest and RenderGemma4Chat must give a Status or a prompt that starts
// with <bos> and whose content ranges lie in order inside it; the prompt is then encoded as
// the replica encodes a chat (worker/service/replica_service.cc: message contents are plain
// text), with a small Gemma tokenizer (tests/golden/data/tiny-dense/tokenizer.json). A message
// must not be able to open a turn: the <|turn> ids are exactly the template's.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "common/tokenizer/chat_format.h"
#include "common/tokenizer/tokenizer.h"
#include "glog/logging.h"
#include "nlohmann/json.hpp"

namespace {

namespace tok = gemma::tokenizer;

#ifndef GEMMA_FUZZ_TOKENIZER_JSON
#error "GEMMA_FUZZ_TOKENIZER_JSON: the tokenizer.json the prompts are encoded with"
#endif

const tok::Tokenizer& Tokenizer() {
  static const tok::Tokenizer* tokenizer = [] {
    auto loaded = tok::Tokenizer::FromFile(GEMMA_FUZZ_TOKENIZER_JSON);
    CHECK(loaded.ok()) << loaded.status();
    return loaded->release();
  }();
  return *tokenizer;
}

// "<|turn>" in `prompt` that starts outside every range (the template's turns).
int TemplateTurns(std::string_view prompt, const std::vector<std::pair<size_t, size_t>>& ranges) {
  int turns = 0;
  for (size_t pos = prompt.find("<|turn>"); pos != std::string_view::npos;
       pos = prompt.find("<|turn>", pos + 1)) {
    bool inside = false;
    for (const auto& [begin, end] : ranges) inside = inside || (pos >= begin && pos < end);
    turns += inside ? 0 : 1;
  }
  return turns;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  (void)Tokenizer();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  nlohmann::json request = nlohmann::json::parse(data, data + size, nullptr,
                                                 /*allow_exceptions=*/false);
  if (request.is_discarded()) return 0;
  std::vector<tok::ChatMessage> messages;
  tok::ChatOptions options;
  if (!tok::ParseChatRequest(request, &messages, &options).ok()) return 0;

  tok::EncodeOptions encode;
  absl::StatusOr<std::string> prompt =
      tok::RenderGemma4Chat(messages, options, &encode.plain_ranges);
  if (!prompt.ok()) {
    CHECK_EQ(prompt.status().code(), absl::StatusCode::kInvalidArgument) << prompt.status();
    return 0;
  }
  CHECK(prompt->starts_with(options.bos_token));
  size_t last_end = options.bos_token.size();
  for (const auto& [begin, end] : encode.plain_ranges) {
    CHECK(last_end <= begin && begin < end && end <= prompt->size())
        << "content range [" << begin << ", " << end << ") after " << last_end << " in a prompt of "
        << prompt->size() << " bytes";
    last_end = end;
  }
  // Without ranges (control tokens in content): the same prompt.
  absl::StatusOr<std::string> again = tok::RenderGemma4Chat(messages, options);
  CHECK(again.ok() && *again == *prompt);
  (void)tok::StripThinking(*prompt);

  const tok::Tokenizer& tokenizer = Tokenizer();
  const std::vector<int32_t> ids = tokenizer.Encode(*prompt, encode);
  CHECK(!ids.empty());
  CHECK_EQ(ids[0], tokenizer.TokenToId(options.bos_token));
  const int32_t turn = tokenizer.TokenToId("<|turn>");
  int turn_ids = 0;
  for (int32_t id : ids) turn_ids += id == turn ? 1 : 0;
  CHECK_EQ(turn_ids, TemplateTurns(*prompt, encode.plain_ranges))
      << "a message's content opened a turn";
  return 0;
}
