// gemma-tokenize: encodes, decodes and renders chat prompts with a tokenizer.json, for tests
// and for checking a tokenizer file by hand.
//
//   gemma-tokenize --tokenizer tokenizer.json --encode < text      ids, space-separated
//   gemma-tokenize --tokenizer tokenizer.json --encode "text"      the same (arguments joined
//                                                                  by spaces instead of stdin)
//   gemma-tokenize --tokenizer tokenizer.json --decode < ids       text (or ids as arguments)
//   gemma-tokenize --tokenizer tokenizer.json --chat chat.json     {"prompt": ..., "ids": ...}
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_join.h"
#include "common/flags.h"
#include "common/tokenizer/chat_format.h"
#include "common/tokenizer/tokenizer.h"
#include "glog/logging.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, tokenizer, "", "Path to tokenizer.json.");
ABSL_FLAG(bool, encode, false, "Encode standard input to ids.");
ABSL_FLAG(bool, decode, false, "Decode whitespace- or comma-separated ids from standard input.");
ABSL_FLAG(std::string, chat, "", "Render this chat JSON file to a prompt and its ids.");
ABSL_FLAG(bool, control_tokens_in_content, false,
          "With --chat: read text in a message that spells a control token (<|turn>, ...) as "
          "that token, as Hugging Face tokenizers do; by default it is plain text, as on a "
          "replica.");
ABSL_FLAG(bool, add_special_tokens, false, "With --encode: apply the post-processor (<bos>).");
ABSL_FLAG(bool, split_special_tokens, false,
          "With --encode: special tokens in the text are "
          "plain text.");
ABSL_FLAG(bool, skip_special_tokens, false, "With --decode: drop special tokens.");

namespace {

namespace tok = gemma::tokenizer;

int Fail(const std::string& message) {
  std::fprintf(stderr, "gemma-tokenize: %s\n", message.c_str());
  return 1;
}

std::string ReadAll(std::istream& in) {
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "encodes, decodes and renders chat prompts with a tokenizer.json\n"
      "  gemma-tokenize --tokenizer tokenizer.json --encode < text   (or --encode \"text\")\n"
      "  gemma-tokenize --tokenizer tokenizer.json --decode < ids    (or --decode 2 17 301)\n"
      "  gemma-tokenize --tokenizer tokenizer.json --chat chat.json");
  const std::vector<char*> positional = gemma::ParseFlags(argc, argv);
  google::InitGoogleLogging(argv[0]);
  // Text (or ids) given as arguments is the input instead of stdin, joined by spaces.
  std::vector<std::string> words(positional.begin() + 1, positional.end());
  auto input = [&] { return words.empty() ? ReadAll(std::cin) : absl::StrJoin(words, " "); };
  const std::string path = absl::GetFlag(FLAGS_tokenizer);
  const int modes = absl::GetFlag(FLAGS_encode) + absl::GetFlag(FLAGS_decode) +
                    !absl::GetFlag(FLAGS_chat).empty();
  if (path.empty() || modes != 1) {
    return Fail(
        "usage: --tokenizer FILE.json and exactly one of --encode, --decode, "
        "--chat FILE.json");
  }
  if (!words.empty() && !absl::GetFlag(FLAGS_chat).empty()) {
    return Fail("--chat reads its messages from the file it names; unexpected argument \"" +
                words[0] + "\"");
  }
  auto tokenizer = tok::Tokenizer::FromFile(path);
  if (!tokenizer.ok()) return Fail(std::string(tokenizer.status().ToString()));

  if (absl::GetFlag(FLAGS_encode)) {
    tok::EncodeOptions options;
    options.add_special_tokens = absl::GetFlag(FLAGS_add_special_tokens);
    options.split_special_tokens = absl::GetFlag(FLAGS_split_special_tokens);
    const std::vector<int32_t> ids = (*tokenizer)->Encode(input(), options);
    std::cout << absl::StrJoin(ids, " ") << "\n";
    return 0;
  }
  if (absl::GetFlag(FLAGS_decode)) {
    std::string text = input();
    for (char& c : text) {
      if (c == ',' || c == '[' || c == ']') c = ' ';
    }
    std::istringstream stream(text);
    std::vector<int32_t> ids;
    std::string word;
    while (stream >> word) {
      char* end = nullptr;
      const long value = std::strtol(word.c_str(), &end, 10);
      if (*end != '\0' || value < 0 || value > INT32_MAX) return Fail("bad id: " + word);
      ids.push_back(static_cast<int32_t>(value));
    }
    tok::DecodeOptions options;
    options.skip_special_tokens = absl::GetFlag(FLAGS_skip_special_tokens);
    std::cout << (*tokenizer)->Decode(ids, options);
    return 0;
  }
  std::ifstream chat_file(absl::GetFlag(FLAGS_chat), std::ios::binary);
  if (!chat_file) return Fail("cannot open " + absl::GetFlag(FLAGS_chat));
  const nlohmann::json request = nlohmann::json::parse(ReadAll(chat_file), nullptr, false);
  if (request.is_discarded()) return Fail(absl::GetFlag(FLAGS_chat) + ": not valid JSON");
  std::vector<tok::ChatMessage> messages;
  tok::ChatOptions options;
  if (absl::Status status = tok::ParseChatRequest(request, &messages, &options); !status.ok()) {
    return Fail(std::string(status.message()));
  }
  // As a replica encodes a chat request: message contents as plain text unless asked.
  tok::EncodeOptions encode;
  auto prompt = tok::RenderGemma4Chat(
      messages, options,
      absl::GetFlag(FLAGS_control_tokens_in_content) ? nullptr : &encode.plain_ranges);
  if (!prompt.ok()) return Fail(std::string(prompt.status().message()));
  nlohmann::json out;
  out["prompt"] = *prompt;
  out["ids"] = (*tokenizer)->Encode(*prompt, encode);
  std::cout << out.dump() << "\n";
  return 0;
}
