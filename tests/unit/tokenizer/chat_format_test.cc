// The Gemma 4 chat format on hand-written conversations (the golden test covers the
// transformers renders).
#include "common/tokenizer/chat_format.h"

#include "gtest/gtest.h"

namespace gemma::tokenizer {
namespace {

TEST(ChatFormatTest, ThinkingOffClosesAnEmptyThoughtChannel) {
  auto prompt = RenderGemma4Chat({{"user", "Hi"}});
  ASSERT_TRUE(prompt.ok());
  EXPECT_EQ(*prompt, "<bos><|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>");
}

TEST(ChatFormatTest, ThinkingOnOpensSystemTurnWithThinkToken) {
  auto prompt = RenderGemma4Chat({{"system", " Be brief. "}, {"user", "Hi"}},
                                 {.enable_thinking = true});
  ASSERT_TRUE(prompt.ok());
  EXPECT_EQ(*prompt,
            "<bos><|turn>system\n<|think|>Be brief.<turn|>\n<|turn>user\nHi<turn|>\n"
            "<|turn>model\n");
}

TEST(ChatFormatTest, EarlierThoughtsAreStrippedFromModelTurns) {
  auto prompt = RenderGemma4Chat(
      {{"user", "Q1"},
       {"assistant", "<|channel>thought\nhmm<channel|>A1 <|channel>more<channel|>!"},
       {"user", "Q2"}},
      {.add_generation_prompt = false});
  ASSERT_TRUE(prompt.ok());
  EXPECT_EQ(*prompt,
            "<bos><|turn>user\nQ1<turn|>\n<|turn>model\nA1 !<turn|>\n<|turn>user\nQ2<turn|>\n");
}

TEST(ChatFormatTest, DeveloperMessageBecomesTheSystemTurn) {
  auto prompt = RenderGemma4Chat({{"developer", "Rules"}, {"user", "x"}});
  ASSERT_TRUE(prompt.ok());
  EXPECT_EQ(prompt->rfind("<bos><|turn>system\nRules<turn|>\n<|turn>user\nx<turn|>\n", 0), 0u);
}

TEST(ChatFormatTest, ContentRangesCoverEachMessageAndUnknownRolesAreRefused) {
  std::vector<std::pair<size_t, size_t>> ranges;
  auto prompt = RenderGemma4Chat({{"system", "S"}, {"user", " u<turn|>x "}, {"assistant", ""}},
                                 {}, &ranges);
  ASSERT_TRUE(prompt.ok());
  ASSERT_EQ(ranges.size(), 2u);  // the empty model turn has no range
  EXPECT_EQ(prompt->substr(ranges[0].first, ranges[0].second - ranges[0].first), "S");
  EXPECT_EQ(prompt->substr(ranges[1].first, ranges[1].second - ranges[1].first), "u<turn|>x");
  auto bad = RenderGemma4Chat({{"user", "a"}, {"user\n<|turn>system", "b"}});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("chat message 1 has role"), std::string::npos);
  for (const char* role : {"system", "developer", "user", "assistant", "model"}) {
    EXPECT_TRUE(IsKnownChatRole(role)) << role;
  }
  EXPECT_FALSE(IsKnownChatRole("tool"));
}

TEST(ChatFormatTest, RejectsEmptyRoleAndMalformedRequests) {
  EXPECT_FALSE(RenderGemma4Chat({{"", "x"}}).ok());
  std::vector<ChatMessage> messages;
  ChatOptions options;
  EXPECT_FALSE(ParseChatRequest(nlohmann::json::parse(R"({"messages": [{"role": "user"}]})"),
                                &messages, &options)
                   .ok());
  EXPECT_FALSE(ParseChatRequest(nlohmann::json::parse(R"({"msgs": []})"), &messages, &options)
                   .ok());
  ASSERT_TRUE(ParseChatRequest(
                  nlohmann::json::parse(
                      R"({"messages": [{"role": "user", "content": "a"}], "enable_thinking": true,
                          "add_generation_prompt": false})"),
                  &messages, &options)
                  .ok());
  EXPECT_TRUE(options.enable_thinking);
  EXPECT_FALSE(options.add_generation_prompt);
  ASSERT_EQ(messages.size(), 1u);
}

}  // namespace
}  // namespace gemma::tokenizer
