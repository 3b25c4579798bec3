// UTF-8 repair and whitespace classes, checked against Python's behaviour.
#include "common/tokenizer/unicode.h"

#include "gtest/gtest.h"

namespace gemma::tokenizer {
namespace {

TEST(RepairUtf8Test, ReplacesMaximalIllFormedSubpartsLikePython) {
  // Expected values from Python: bytes.decode("utf-8", "replace").
  EXPECT_EQ(RepairUtf8("plain"), "plain");
  EXPECT_EQ(RepairUtf8("\xff\xfe"), "\uFFFD\uFFFD");
  EXPECT_EQ(RepairUtf8("\xe2\x82 x"), "\uFFFD x");          // truncated 3-byte: one U+FFFD
  EXPECT_EQ(RepairUtf8("\xed\xa0\x80"), "\uFFFD\uFFFD\uFFFD");  // surrogate
  EXPECT_EQ(RepairUtf8("\xc0\xaf"), "\uFFFD\uFFFD");         // overlong
  EXPECT_EQ(RepairUtf8("\xf0\x9f\x98"), "\uFFFD");
  EXPECT_EQ(RepairUtf8("\xf4\x90\x80\x80"), "\uFFFD\uFFFD\uFFFD\uFFFD");
  EXPECT_EQ(RepairUtf8("a\xc3(b"), "a\uFFFD(b");
  EXPECT_EQ(RepairUtf8("\xf0\x9f\x98\x80"), "\xf0\x9f\x98\x80");
}

TEST(IsValidUtf8Test, AcceptsWellFormedAndRejectsIllFormed) {
  EXPECT_TRUE(IsValidUtf8("h\xc3\xa9llo \xe2\x82\xac \xf0\x9f\x98\x80"));
  EXPECT_FALSE(IsValidUtf8("\xe2\x82"));
  EXPECT_FALSE(IsValidUtf8("\xed\xa0\x80"));
}

TEST(StripPythonSpaceTest, StripsUnicodeAndPythonOnlySpaces) {
  EXPECT_EQ(StripPythonSpace(" \t\n hi there \r\n"), "hi there");
  EXPECT_EQ(StripPythonSpace("\u3000\u00a0x\u2028\x1f"), "x");
  EXPECT_EQ(StripPythonSpace("\u200bx\u200b"), "\u200bx\u200b");  // ZWSP is not a space
  EXPECT_EQ(StripPythonSpace("   "), "");
}

}  // namespace
}  // namespace gemma::tokenizer
