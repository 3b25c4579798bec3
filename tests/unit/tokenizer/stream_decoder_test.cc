// Streaming decode: each emitted piece is valid UTF-8, byte-fallback characters are held
// until complete, and the pieces concatenate to the full decode.
#include "common/tokenizer/stream_decoder.h"

#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "common/tokenizer/unicode.h"
#include "glog/logging.h"
#include "gtest/gtest.h"

namespace gemma::tokenizer {
namespace {

const Tokenizer& TestTokenizer() {
  static const Tokenizer* tokenizer = [] {
    auto loaded = Tokenizer::FromFile(GEMMA_SOURCE_DIR
                                      "/tests/golden/data/tokenizer/gemma4_test_tokenizer.json");
    CHECK(loaded.ok()) << loaded.status();
    return loaded->release();
  }();
  return *tokenizer;
}

int32_t ByteId(int byte) { return TestTokenizer().TokenToId(absl::StrFormat("<0x%02X>", byte)); }

TEST(StreamDecoderTest, HoldsSplitCharacterUntilComplete) {
  const Tokenizer& tokenizer = TestTokenizer();
  StreamDecoder stream(&tokenizer);
  const std::vector<int32_t> hello = tokenizer.Encode("Hi");
  EXPECT_EQ(stream.Push(hello[0]), tokenizer.Decode({hello[0]}));
  // U+1F600 as four byte-fallback tokens.
  EXPECT_EQ(stream.Push(ByteId(0xF0)), "");
  EXPECT_EQ(stream.Push(ByteId(0x9F)), "");
  EXPECT_EQ(stream.Push(ByteId(0x98)), "");
  EXPECT_EQ(stream.Push(ByteId(0x80)), "");
  EXPECT_EQ(stream.held_bytes(), 4u);
  EXPECT_EQ(stream.Push(tokenizer.TokenToId("\n")), "\xF0\x9F\x98\x80\n");
  EXPECT_EQ(stream.held_bytes(), 0u);
}

TEST(StreamDecoderTest, InvalidByteRunBecomesReplacementCharsLikeFullDecode) {
  const Tokenizer& tokenizer = TestTokenizer();
  const std::vector<int32_t> ids = {ByteId(0xE2), ByteId(0x82), ByteId(0xFF),
                                    tokenizer.TokenToId("a")};
  StreamDecoder stream(&tokenizer);
  std::string streamed;
  for (int32_t id : ids) streamed += stream.Push(id);
  streamed += stream.Finish();
  EXPECT_EQ(streamed, "\uFFFD\uFFFD\uFFFDa");
  EXPECT_EQ(streamed, tokenizer.Decode(ids));
}

TEST(StreamDecoderTest, EveryPieceIsValidUtf8AndPiecesConcatenateToDecode) {
  const Tokenizer& tokenizer = TestTokenizer();
  const std::string text =
      "Mixed: 日本語 ✨ 👨‍👩‍👧 ₹ Ωmega <|turn>model\nok<turn|>\n\ttabs  and \xF0\x9F\xAA\xBF end";
  const std::vector<int32_t> ids = tokenizer.Encode(text);
  for (bool skip : {false, true}) {
    StreamDecoder stream(&tokenizer, {.skip_special_tokens = skip});
    std::string streamed;
    for (int32_t id : ids) {
      const std::string piece = stream.Push(id);
      EXPECT_TRUE(IsValidUtf8(piece)) << "after id " << id;
      streamed += piece;
    }
    streamed += stream.Finish();
    EXPECT_EQ(streamed, tokenizer.Decode(ids, {.skip_special_tokens = skip}));
  }
}

TEST(StreamDecoderTest, FinishReleasesTrailingBytesAndResets) {
  const Tokenizer& tokenizer = TestTokenizer();
  StreamDecoder stream(&tokenizer);
  EXPECT_EQ(stream.Push(ByteId(0xC3)), "");
  EXPECT_EQ(stream.Finish(), "\uFFFD");
  EXPECT_EQ(stream.Push(ByteId(0xC3)), "");
  EXPECT_EQ(stream.Push(ByteId(0xA9)), "");
  EXPECT_EQ(stream.Finish(), "\u00E9");
  EXPECT_EQ(stream.Finish(), "");
}

}  // namespace
}  // namespace gemma::tokenizer
