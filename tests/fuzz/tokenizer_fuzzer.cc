// libFuzzer entry point: arbitrary bytes as a tokenizer.json, optionally followed by a NUL byte
// and a text to encode with it (without one, a fixed text with special tokens and bytes that
// are not UTF-8). Tokenizer::FromJson must give a Status or a tokenizer whose every encoding
// holds ids of its vocabulary and decodes (whole and streamed alike) to valid UTF-8.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/tokenizer/stream_decoder.h"
#include "common/tokenizer/tokenizer.h"
#include "common/tokenizer/unicode.h"
#include "glog/logging.h"

namespace {

namespace tok = gemma::tokenizer;

constexpr std::string_view kDefaultText =
    "<bos>Hello,  world!\n<|turn>user\tcaf\xc3\xa9 \xe2\x96\x81x \xff\xc3 <eos> 12345";

void CheckIds(const tok::Tokenizer& tokenizer, const std::vector<int32_t>& ids) {
  for (int32_t id : ids) {
    CHECK(id >= 0 && id < tokenizer.vocab_size()) << "id " << id << " outside the vocabulary of "
                                                  << tokenizer.vocab_size();
  }
  for (bool skip : {false, true}) {
    const std::string text = tokenizer.Decode(ids, {.skip_special_tokens = skip});
    CHECK(tok::IsValidUtf8(text)) << "Decode gave bytes that are not UTF-8";
    tok::StreamDecoder stream(&tokenizer, {.skip_special_tokens = skip});
    std::string streamed;
    for (int32_t id : ids) streamed += stream.Push(id);
    streamed += stream.Finish();
    CHECK_EQ(streamed, text) << "streamed decoding differs from Decode";
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t nul = input.find('\0');
  const std::string_view json_text = input.substr(0, nul);
  const std::string_view text = nul == std::string_view::npos ? kDefaultText : input.substr(nul + 1);

  auto tokenizer = tok::Tokenizer::FromJson(json_text);
  if (!tokenizer.ok()) return 0;
  const tok::Tokenizer& t = **tokenizer;
  CHECK_GE(t.vocab_size(), 0);
  for (const tok::EncodeOptions& options :
       {tok::EncodeOptions{}, tok::EncodeOptions{.add_special_tokens = true},
        tok::EncodeOptions{.split_special_tokens = true}}) {
    CheckIds(t, t.Encode(text, options));
  }
  CheckIds(t, t.EncodePrompt(text));
  // Every id of the vocabulary (up to a bound) and a few outside it decode.
  std::vector<int32_t> ids = {-1, t.vocab_size(), INT32_MAX};
  for (int32_t id = 0; id < t.vocab_size() && id < 4096; ++id) ids.push_back(id);
  for (int32_t id : ids) {
    const std::string* token = t.IdToToken(id);
    if (token != nullptr) CHECK_EQ(t.TokenToId(*token) >= 0, true);
    (void)t.DecoderPiece(id);
    (void)t.IsSpecial(id);
  }
  CHECK(tok::IsValidUtf8(t.Decode(ids)));
  return 0;
}
