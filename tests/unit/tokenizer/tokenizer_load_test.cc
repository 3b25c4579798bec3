// Loading tokenizer.json: malformed files and unsupported components are refused with a
// message naming the problem; a tiny hand-written BPE tokenizer encodes by merge priority.
#include <string>

#include "common/tokenizer/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace gemma::tokenizer {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using nlohmann::json;

json TinyTokenizer() {
  json vocab = {{"<unk>", 0}, {"<bos>", 1}, {"a", 2}, {"b", 3}, {"c", 4}, {"\u2581", 5},
                {"ab", 6}, {"bc", 7}, {"abc", 8}, {"\u2581a", 9}, {"<0x41>", 10}};
  return {
      {"added_tokens", json::array({{{"id", 1}, {"content", "<bos>"}, {"special", true},
                                     {"normalized", false}, {"lstrip", false},
                                     {"rstrip", false}, {"single_word", false}}})},
      {"normalizer", {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\u2581"}}},
      {"pre_tokenizer", nullptr},
      {"post_processor", nullptr},
      {"decoder",
       {{"type", "Sequence"},
        {"decoders", json::array({{{"type", "Replace"}, {"pattern", {{"String", "\u2581"}}},
                                   {"content", " "}},
                                  {{"type", "ByteFallback"}},
                                  {{"type", "Fuse"}}})}}},
      {"model",
       {{"type", "BPE"}, {"unk_token", "<unk>"}, {"fuse_unk", true}, {"byte_fallback", true},
        {"dropout", nullptr}, {"vocab", vocab},
        {"merges", json::array({json::array({"b", "c"}), "a b", json::array({"a", "bc"}),
                                json::array({"\u2581", "a"})})}}}};
}

absl::Status Load(const json& doc) { return Tokenizer::FromJson(doc.dump()).status(); }

TEST(TokenizerLoadTest, TinyTokenizerAppliesMergesByRank) {
  auto tokenizer = Tokenizer::FromJson(TinyTokenizer().dump());
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  // "bc" (rank 0) beats "ab" (rank 1), then "a"+"bc" gives "abc".
  EXPECT_THAT((*tokenizer)->Encode("abc"), ElementsAre(8));
  EXPECT_THAT((*tokenizer)->Encode("ab ab"), ElementsAre(6, 5, 6));
  // "A" falls back to its byte token; "Z" has no byte token and becomes one fused <unk>.
  EXPECT_THAT((*tokenizer)->Encode("AZZa"), ElementsAre(10, 0, 2));
  EXPECT_THAT((*tokenizer)->Encode("<bos>a"), ElementsAre(1, 2));
  EXPECT_EQ((*tokenizer)->Decode({1, 6, 9, 10}), "<bos>ab aA");
  EXPECT_EQ((*tokenizer)->Decode({1, 6}, {.skip_special_tokens = true}), "ab");
}

TEST(TokenizerLoadTest, RefusesBadJson) {
  auto status = Tokenizer::FromJson("{\"model\": ").status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("not valid JSON"));
}

TEST(TokenizerLoadTest, RefusesMissingModel) {
  json doc = TinyTokenizer();
  doc.erase("model");
  EXPECT_THAT(Load(doc).message(), HasSubstr("\"model\" is missing"));
}

TEST(TokenizerLoadTest, RefusesMergeNamingUnknownToken) {
  json doc = TinyTokenizer();
  doc["model"]["merges"].push_back(json::array({"a", "zz"}));
  const absl::Status status = Load(doc);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("merge 4 (\"a\", \"zz\") names a token"));
}

TEST(TokenizerLoadTest, RefusesDuplicateVocabIds) {
  json doc = TinyTokenizer();
  doc["model"]["vocab"]["dup"] = 3;
  EXPECT_THAT(Load(doc).message(), HasSubstr("duplicate id 3"));
}

TEST(TokenizerLoadTest, RefusesDuplicateAddedTokenIds) {
  json doc = TinyTokenizer();
  doc["added_tokens"].push_back(doc["added_tokens"][0]);
  EXPECT_THAT(Load(doc).message(), HasSubstr("duplicate added token id 1"));
}

TEST(TokenizerLoadTest, RefusesAddedTokenWhoseIdDisagreesWithVocab) {
  json doc = TinyTokenizer();
  doc["added_tokens"][0]["id"] = 4;
  EXPECT_THAT(Load(doc).message(), HasSubstr("\"<bos>\" has id 4 but the vocab gives it 1"));
}

TEST(TokenizerLoadTest, RefusesUnsupportedComponentsByName) {
  struct Case {
    const char* key;
    json value;
    const char* message;
  };
  const Case cases[] = {
      {"normalizer", {{"type", "NFKC"}}, "normalizer \"NFKC\" is not supported"},
      {"pre_tokenizer", {{"type", "ByteLevel"}}, "pre_tokenizer \"ByteLevel\""},
      {"post_processor", {{"type", "RobertaProcessing"}}, "post_processor \"RobertaProcessing\""},
      {"decoder", {{"type", "WordPiece"}}, "decoder \"WordPiece\""},
  };
  for (const Case& c : cases) {
    json doc = TinyTokenizer();
    doc[c.key] = c.value;
    const absl::Status status = Load(doc);
    EXPECT_EQ(status.code(), absl::StatusCode::kUnimplemented) << c.key;
    EXPECT_THAT(status.message(), HasSubstr(c.message));
  }
  json unigram = TinyTokenizer();
  unigram["model"]["type"] = "Unigram";
  EXPECT_THAT(Load(unigram).message(), HasSubstr("model type Unigram is not supported"));
  json dropout = TinyTokenizer();
  dropout["model"]["dropout"] = 0.1;
  EXPECT_THAT(Load(dropout).message(), HasSubstr("dropout"));
  json single_word = TinyTokenizer();
  single_word["added_tokens"][0]["single_word"] = true;
  EXPECT_THAT(Load(single_word).message(), HasSubstr("single_word"));
}

TEST(TokenizerLoadTest, MissingFileIsNotFound) {
  EXPECT_EQ(Tokenizer::FromFile("/nonexistent/tokenizer.json").status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace gemma::tokenizer
