// The Split pre-tokenizer against what HF `tokenizers` 0.23.3 gives for the same pattern,
// behaviour and invert flag (pre_tokenizers.Split(" ", behavior, invert).pre_tokenize_str),
// and its parsing from tokenizer.json, including the refusals.
#include "common/tokenizer/split_pre_tokenizer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "common/tokenizer/tokenizer.h"

namespace gemma::tokenizer {
namespace {

using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

std::vector<std::string> Pieces(const SplitRule& rule, std::string_view text) {
  std::vector<std::string_view> views;
  ApplySplit(rule, text, &views);
  return {views.begin(), views.end()};
}

struct Expected {
  const char* behavior;
  bool invert;
  // Pieces of "a b  c ", "  lead", "no-match", "x  ", as the library gives them.
  std::vector<std::vector<std::string>> pieces;
};

TEST(SplitPreTokenizerTest, EveryBehaviourAndInvertMatchTheLibrary) {
  const std::vector<std::string> inputs{"a b  c ", "  lead", "no-match", "x  "};
  const std::vector<Expected> cases{
      {"Removed", false, {{"a", "b", "c"}, {"lead"}, {"no-match"}, {"x"}}},
      {"Removed", true, {{" ", " ", " ", " "}, {" ", " "}, {}, {" ", " "}}},
      {"Isolated", false, {{"a", " ", "b", " ", " ", "c", " "}, {" ", " ", "lead"}, {"no-match"},
                           {"x", " ", " "}}},
      {"Isolated", true, {{"a", " ", "b", " ", " ", "c", " "}, {" ", " ", "lead"}, {"no-match"},
                          {"x", " ", " "}}},
      {"MergedWithPrevious", false, {{"a ", "b ", " ", "c "}, {" ", " ", "lead"}, {"no-match"},
                                     {"x ", " "}}},
      {"MergedWithPrevious", true, {{"a", " b", " ", " c", " "}, {" ", " lead"}, {"no-match"},
                                    {"x", " ", " "}}},
      {"MergedWithNext", false, {{"a", " b", " ", " c", " "}, {" ", " lead"}, {"no-match"},
                                 {"x", " ", " "}}},
      {"MergedWithNext", true, {{"a ", "b ", " ", "c "}, {" ", " ", "lead"}, {"no-match"},
                                {"x ", " "}}},
      {"Contiguous", false, {{"a", " ", "b", "  ", "c", " "}, {"  ", "lead"}, {"no-match"},
                             {"x", "  "}}},
      {"Contiguous", true, {{"a", " ", "b", "  ", "c", " "}, {"  ", "lead"}, {"no-match"},
                            {"x", "  "}}},
  };
  for (const Expected& c : cases) {
    SplitRule rule{" ", *ParseSplitBehavior(c.behavior), c.invert};
    for (size_t i = 0; i < inputs.size(); ++i) {
      SCOPED_TRACE(std::string(c.behavior) + (c.invert ? " inverted on \"" : " on \"") +
                   inputs[i] + "\"");
      EXPECT_THAT(Pieces(rule, inputs[i]), ElementsAreArray(c.pieces[i]));
    }
    EXPECT_TRUE(Pieces(rule, "").empty());
  }
  // A longer pattern, back to back: the library gives x | ab | ab | y | ab.
  EXPECT_THAT(Pieces({"ab", SplitBehavior::kIsolated, false}, "xababyab"),
              ElementsAreArray({"x", "ab", "ab", "y", "ab"}));
  EXPECT_FALSE(ParseSplitBehavior("merged_with_previous").has_value());
}

// A minimal tokenizer.json around a pre-tokenizer: a byte-level vocabulary of the letters and
// the space, no normalizer, so that the split decides the pieces the model sees.
std::string WithPreTokenizer(const std::string& pre_tokenizer) {
  return R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, " ": 2, "a ": 3, " b": 4},
             "merges": [["a", " "], [" ", "b"]]},
             "pre_tokenizer": )" +
         pre_tokenizer + "}";
}

TEST(SplitPreTokenizerTest, TokenizerAppliesItBeforeTheModel) {
  // Without a pre-tokenizer "a b" merges "a" + " " first (the earlier merge): a_ | b.
  auto none = Tokenizer::FromJson(WithPreTokenizer("null"));
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_THAT((*none)->Encode("a b"), ElementsAreArray({3, 1}));
  // MergedWithNext keeps the space with "b": a | _b.
  auto next = Tokenizer::FromJson(WithPreTokenizer(
      R"({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithNext",
          "invert": false})"));
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_THAT((*next)->Encode("a b"), ElementsAreArray({0, 4}));
  // A Sequence applies its rules in order: Removed drops the spaces.
  auto seq = Tokenizer::FromJson(WithPreTokenizer(
      R"({"type": "Sequence", "pretokenizers": [
          {"type": "Split", "pattern": {"String": "b"}, "behavior": "Isolated"},
          {"type": "Split", "pattern": {"String": " "}, "behavior": "Removed"}]})"));
  ASSERT_TRUE(seq.ok()) << seq.status();
  EXPECT_THAT((*seq)->Encode("a b"), ElementsAreArray({0, 1}));
}

TEST(SplitPreTokenizerTest, WhatItCannotDoIsRefusedByName) {
  auto regex = Tokenizer::FromJson(WithPreTokenizer(
      R"({"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Isolated"})"));
  ASSERT_FALSE(regex.ok());
  EXPECT_EQ(regex.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(regex.status().message(), HasSubstr("Regex"));
  auto behaviour = Tokenizer::FromJson(WithPreTokenizer(
      R"({"type": "Split", "pattern": {"String": " "}, "behavior": "Sideways"})"));
  ASSERT_FALSE(behaviour.ok());
  EXPECT_THAT(behaviour.status().message(), HasSubstr("Sideways"));
  auto other = Tokenizer::FromJson(WithPreTokenizer(R"({"type": "Metaspace"})"));
  ASSERT_FALSE(other.ok());
  EXPECT_THAT(other.status().message(), HasSubstr("Metaspace"));
}

}  // namespace
}  // namespace gemma::tokenizer
