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

// A run that no later byte can mend is not held: its bytes come out as U+FFFD as soon as that
// is certain (a stray continuation byte at once; a lead followed by a non-continuation at the
// second byte), and so does every further byte of the run, while the whole still equals
// Decode(). A valid run after a non-byte token is held again.
TEST(StreamDecoderTest, ARunBeyondRepairStreamsReplacementCharsAtOnce) {
  const Tokenizer& tokenizer = TestTokenizer();
  const int32_t a = tokenizer.TokenToId("a");
  StreamDecoder stream(&tokenizer);
  std::vector<int32_t> ids;
  auto push = [&](int32_t id) {
    ids.push_back(id);
    return stream.Push(id);
  };
  EXPECT_EQ(push(ByteId(0xB1)), "\uFFFD");  // a continuation byte cannot start a character
  for (int i = 0; i < 5; ++i) EXPECT_EQ(push(ByteId(0xB1)), "\uFFFD") << i;
  EXPECT_EQ(push(ByteId(0xC3)), "\uFFFD");  // would be valid alone, but the run is lost
  EXPECT_EQ(stream.held_bytes(), 0u);
  EXPECT_EQ(push(a), "a");
  EXPECT_EQ(push(ByteId(0xE2)), "");  // a new run: E2 82 could still become U+20AC
  EXPECT_EQ(push(ByteId(0x82)), "");
  EXPECT_EQ(push(ByteId(0x41)), "\uFFFD\uFFFD\uFFFD");  // 'A' cannot continue it
  EXPECT_EQ(push(ByteId(0xF0)), "\uFFFD");
  EXPECT_EQ(push(a), "a");
  EXPECT_EQ(push(ByteId(0xED)), "");  // ED A0 would be a surrogate: lost at the second byte
  EXPECT_EQ(push(ByteId(0xA0)), "\uFFFD\uFFFD");
  std::string tail = stream.Finish();
  EXPECT_EQ(tail, "");
  std::string streamed;
  StreamDecoder again(&tokenizer);
  for (int32_t id : ids) streamed += again.Push(id);
  streamed += again.Finish();
  EXPECT_EQ(streamed, tokenizer.Decode(ids));
}

TEST(StreamDecoderTest, IsUtf8PrefixTellsMendableFromLost) {
  EXPECT_TRUE(IsUtf8Prefix(""));
  EXPECT_TRUE(IsUtf8Prefix("ab\xC3"));
  EXPECT_TRUE(IsUtf8Prefix("\xF0\x9F\x98"));
  EXPECT_TRUE(IsUtf8Prefix("\xE2\x82\xAC"));
  EXPECT_FALSE(IsUtf8Prefix("\x80"));
  EXPECT_FALSE(IsUtf8Prefix("\xC0"));      // overlong lead
  EXPECT_FALSE(IsUtf8Prefix("\xE0\x80"));  // overlong second byte
  EXPECT_FALSE(IsUtf8Prefix("\xF4\x90"));  // past U+10FFFF
  EXPECT_FALSE(IsUtf8Prefix("\xC3" "a"));
  EXPECT_FALSE(IsUtf8Prefix("\xFF"));
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
