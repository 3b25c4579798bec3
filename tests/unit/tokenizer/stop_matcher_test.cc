// Stop strings over streamed text, including ones split across tokens and ones that begin
// inside a character spelled by byte-fallback tokens.
#include "common/tokenizer/stop_matcher.h"

#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "common/tokenizer/stream_decoder.h"
#include "common/tokenizer/tokenizer.h"
#include "glog/logging.h"
#include "gtest/gtest.h"

namespace gemma::tokenizer {
namespace {

TEST(StopStringMatcherTest, FindsStopSplitAcrossThreePiecesAndWithholdsPrefix) {
  StopStringMatcher matcher({"STOP here"});
  auto r1 = matcher.Push("text ST");
  EXPECT_EQ(r1.release, "text ");
  EXPECT_EQ(r1.held_bytes, 2u);
  EXPECT_FALSE(r1.stopped);
  auto r2 = matcher.Push("OP he");
  EXPECT_EQ(r2.release, "");
  EXPECT_EQ(r2.held_bytes, 7u);
  auto r3 = matcher.Push("re and more");
  EXPECT_TRUE(r3.stopped);
  EXPECT_EQ(r3.stop_index, 0);
  EXPECT_EQ(r3.release, "");
  EXPECT_TRUE(matcher.stopped());
  EXPECT_EQ(matcher.Push("ignored").release, "");
}

TEST(StopStringMatcherTest, ReleasesHeldTextWhenThePrefixBreaks) {
  StopStringMatcher matcher({"<end>"});
  EXPECT_EQ(matcher.Push("a <en").release, "a ");
  auto r = matcher.Push("gine");
  EXPECT_EQ(r.release, "<engine");
  EXPECT_EQ(r.held_bytes, 0u);
  EXPECT_EQ(matcher.Push("x<").release, "x");
  EXPECT_EQ(matcher.Flush(), "<");
}

TEST(StopStringMatcherTest, EarliestStopWinsAndReportsItsIndex) {
  StopStringMatcher matcher({"world", "lo w", ""});
  auto r = matcher.Push("hello world");
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(r.stop_index, 1);
  EXPECT_EQ(r.release, "hel");
}

const Tokenizer& TestTokenizer() {
  static const Tokenizer* tokenizer = [] {
    auto loaded = Tokenizer::FromFile(GEMMA_SOURCE_DIR
                                      "/tests/golden/data/tokenizer/gemma4_test_tokenizer.json");
    CHECK(loaded.ok()) << loaded.status();
    return loaded->release();
  }();
  return *tokenizer;
}

// Streams `ids` through a StreamDecoder and a matcher; returns the released text.
std::string Generate(const std::vector<int32_t>& ids, StopStringMatcher* matcher) {
  StreamDecoder stream(&TestTokenizer());
  std::string shown;
  for (int32_t id : ids) {
    auto result = matcher->Push(stream.Push(id));
    shown += result.release;
    if (result.stopped) return shown;
  }
  shown += matcher->Push(stream.Finish()).release;
  if (!matcher->stopped()) shown += matcher->Flush();
  return shown;
}

TEST(StopStringMatcherTest, StopSpanningThreeTokensFromTheTokenizer) {
  const Tokenizer& tokenizer = TestTokenizer();
  // Each word is its own token here, so the stop string spans three tokens.
  std::vector<int32_t> ids = tokenizer.Encode("And God said");
  const std::vector<int32_t> tail = {tokenizer.TokenToId("\u2581E"), tokenizer.TokenToId("N"),
                                     tokenizer.TokenToId("D"), tokenizer.TokenToId("!")};
  for (int32_t id : tail) ASSERT_GE(id, 0);
  ids.insert(ids.end(), tail.begin(), tail.end());
  StopStringMatcher matcher({" END"});
  EXPECT_EQ(Generate(ids, &matcher), "And God said");
  EXPECT_TRUE(matcher.stopped());
}

TEST(StopStringMatcherTest, StopBeginningInsideAByteFallbackCharacter) {
  const Tokenizer& tokenizer = TestTokenizer();
  auto byte = [&](int b) { return tokenizer.TokenToId(absl::StrFormat("<0x%02X>", b)); };
  // "x" then U+20AC (euro sign) as three byte tokens, then "5": the stop string "€5" starts
  // in the middle of the byte tokens' character.
  std::vector<int32_t> ids = tokenizer.Encode("price x");
  ids.insert(ids.end(), {byte(0xE2), byte(0x82), byte(0xAC)});
  ids.push_back(tokenizer.TokenToId("5"));
  ids.push_back(tokenizer.TokenToId("0"));
  StopStringMatcher matcher({"\u20AC5"});
  EXPECT_EQ(Generate(ids, &matcher), "price x");
  EXPECT_TRUE(matcher.stopped());

  // Fed raw bytes one at a time, the matcher still withholds the partial character.
  StopStringMatcher bytewise({"\u20AC5"});
  EXPECT_EQ(bytewise.Push("x\xE2").release, "x");
  EXPECT_EQ(bytewise.Push("\x82").held_bytes, 2u);
  EXPECT_EQ(bytewise.Push("\xAC").held_bytes, 3u);
  EXPECT_TRUE(bytewise.Push("5").stopped);
}

TEST(StopStringMatcherTest, NoStopReleasesEverything) {
  const Tokenizer& tokenizer = TestTokenizer();
  const std::string text = "In the beginning \u20AC\u20AC was the word";
  StopStringMatcher matcher({"\u20AC5", "never"});
  EXPECT_EQ(Generate(tokenizer.Encode(text), &matcher), text);
  EXPECT_FALSE(matcher.stopped());
}

}  // namespace
}  // namespace gemma::tokenizer
