// Tests for ParseModelConfig / LoadModelConfig: both config.json layouts, Gemma4TextConfig
// defaults, the real 31B and 26B-A4B settings, and one refusal per invalid or unsupported key.
#include "common/model_config.h"

#include <stdlib.h>

#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace gemma {
namespace {

using Json = nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// The message as std::string, so that matcher failures print text (Abseil's own string_view
// prints as a character list).
std::string Msg(const absl::Status& status) { return std::string(status.message()); }

Json RopeParameters() {
  return {{"sliding_attention", {{"rope_type", "default"}, {"rope_theta", 10000.0}}},
          {"full_attention",
           {{"rope_type", "proportional"}, {"partial_rotary_factor", 0.25}, {"rope_theta", 1e6}}}};
}

// (5 x sliding + 1 x full) x `repeats`, as the converter writes it.
Json LayerTypes(int repeats) {
  Json types = Json::array();
  for (int r = 0; r < repeats; ++r) {
    for (int i = 0; i < 5; ++i) types.push_back("sliding_attention");
    types.push_back("full_attention");
  }
  return types;
}

// The text_config of google/gemma-4-31B-it (gemma4-architecture.md section 1).
Json TextConfig31B() {
  return {{"model_type", "gemma4_text"},
          {"hidden_size", 5376},
          {"num_hidden_layers", 60},
          {"intermediate_size", 21504},
          {"num_attention_heads", 32},
          {"num_key_value_heads", 16},
          {"num_global_key_value_heads", 4},
          {"head_dim", 256},
          {"global_head_dim", 512},
          {"attention_k_eq_v", true},
          {"enable_moe_block", false},
          {"num_experts", nullptr},
          {"top_k_experts", nullptr},
          {"moe_intermediate_size", nullptr},
          {"vocab_size", 262144},
          {"sliding_window", 1024},
          {"layer_types", LayerTypes(10)},
          {"rope_parameters", RopeParameters()},
          {"rms_norm_eps", 1e-6},
          {"final_logit_softcapping", 30.0},
          {"hidden_activation", "gelu_pytorch_tanh"},
          {"tie_word_embeddings", true},
          {"max_position_embeddings", 262144},
          {"hidden_size_per_layer_input", 0},
          {"num_kv_shared_layers", 0},
          {"use_double_wide_mlp", false},
          {"use_bidirectional_attention", "vision"},
          {"attention_bias", false},
          {"pad_token_id", 0},
          {"eos_token_id", 1},
          {"bos_token_id", 2},
          {"dtype", "bfloat16"}};
}

Json TextConfig26B() {
  Json text = TextConfig31B();
  text["hidden_size"] = 2816;
  text["num_hidden_layers"] = 30;
  text["intermediate_size"] = 2112;
  text["num_attention_heads"] = 16;
  text["num_key_value_heads"] = 8;
  text["num_global_key_value_heads"] = 2;
  text["enable_moe_block"] = true;
  text["num_experts"] = 128;
  text["top_k_experts"] = 8;
  text["moe_intermediate_size"] = 704;
  text["layer_types"] = LayerTypes(5);
  return text;
}

// A Gemma4ForConditionalGeneration config.json around `text_config`.
Json Conditional(Json text_config) {
  return {{"architectures", {"Gemma4ForConditionalGeneration"}},
          {"model_type", "gemma4"},
          {"eos_token_id", {1, 106}},
          {"text_config", std::move(text_config)},
          {"vision_config", {{"model_type", "gemma4_vision"}}}};
}

absl::StatusOr<ModelConfig> Parse(const Json& json) {
  return ParseModelConfig(json.dump(), "my_config.json");
}

std::vector<int> FullLayers(const ModelConfig& config) {
  std::vector<int> full;
  for (int i = 0; i < static_cast<int>(config.layer_types.size()); ++i) {
    if (config.IsFull(i)) full.push_back(i);
  }
  return full;
}

TEST(ModelConfigTest, Parses31BConditionalGenerationConfig) {
  absl::StatusOr<ModelConfig> config = Parse(Conditional(TextConfig31B()));
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->architecture, "Gemma4ForConditionalGeneration");
  EXPECT_EQ(config->tensor_prefix, "model.language_model.");
  EXPECT_EQ(config->hidden_size, 5376);
  EXPECT_EQ(config->num_hidden_layers, 60);
  EXPECT_EQ(config->intermediate_size, 21504);
  EXPECT_EQ(config->vocab_size, 262144);
  EXPECT_FALSE(config->enable_moe_block);
  EXPECT_TRUE(config->attention_k_eq_v);
  EXPECT_EQ(config->sliding_window, 1024);
  EXPECT_EQ(config->max_position_embeddings, 262144);
  EXPECT_DOUBLE_EQ(config->final_logit_softcapping, 30.0);
  EXPECT_DOUBLE_EQ(config->rms_norm_eps, 1e-6);
  EXPECT_EQ(config->hidden_size_per_layer_input, 0);
  ASSERT_EQ(config->layer_types.size(), 60u);
  EXPECT_THAT(FullLayers(*config), ElementsAre(5, 11, 17, 23, 29, 35, 41, 47, 53, 59));
  // Sliding layer 0: 16 KV heads of 256; full layer 5: 4 KV heads of 512, V from K.
  EXPECT_EQ(config->LayerHeadDim(0), 256);
  EXPECT_EQ(config->LayerKvHeads(0), 16);
  EXPECT_FALSE(config->LayerKEqV(0));
  EXPECT_EQ(config->LayerHeadDim(5), 512);
  EXPECT_EQ(config->LayerKvHeads(5), 4);
  EXPECT_TRUE(config->LayerKEqV(5));
  EXPECT_EQ(config->LayerRope(0).rope_type, "default");
  EXPECT_DOUBLE_EQ(config->LayerRope(0).rope_theta, 10000.0);
  EXPECT_EQ(config->LayerRope(59).rope_type, "proportional");
  EXPECT_DOUBLE_EQ(config->LayerRope(59).rope_theta, 1e6);
  EXPECT_DOUBLE_EQ(config->LayerRope(59).partial_rotary_factor, 0.25);
  EXPECT_DOUBLE_EQ(config->LayerRope(59).factor, 1.0);
  // The top-level [1, 106] wins over text_config's 1.
  EXPECT_THAT(config->eos_token_ids, ElementsAre(1, 106));
  EXPECT_EQ(config->bos_token_id, 2);
  EXPECT_EQ(config->pad_token_id, 0);
  EXPECT_TRUE(config->tie_word_embeddings);
}

TEST(ModelConfigTest, Parses26BA4BConditionalGenerationConfig) {
  absl::StatusOr<ModelConfig> config = Parse(Conditional(TextConfig26B()));
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->hidden_size, 2816);
  EXPECT_EQ(config->num_hidden_layers, 30);
  EXPECT_EQ(config->intermediate_size, 2112);
  EXPECT_EQ(config->num_attention_heads, 16);
  EXPECT_TRUE(config->enable_moe_block);
  EXPECT_EQ(config->num_experts, 128);
  EXPECT_EQ(config->top_k_experts, 8);
  EXPECT_EQ(config->moe_intermediate_size, 704);
  EXPECT_THAT(FullLayers(*config), ElementsAre(5, 11, 17, 23, 29));
  EXPECT_EQ(config->LayerKvHeads(4), 8);
  EXPECT_EQ(config->LayerKvHeads(29), 2);
  EXPECT_EQ(config->LayerHeadDim(29), 512);
  EXPECT_EQ(config->rope_full.rope_type, "proportional");
  EXPECT_THAT(config->eos_token_ids, ElementsAre(1, 106));
}

TEST(ModelConfigTest, ParsesCausalLmLayoutAtTopLevel) {
  Json json = TextConfig26B();
  json["architectures"] = {"Gemma4ForCausalLM"};
  json["eos_token_id"] = {1, 106, 50};
  absl::StatusOr<ModelConfig> config = Parse(json);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->architecture, "Gemma4ForCausalLM");
  EXPECT_EQ(config->tensor_prefix, "model.");
  EXPECT_EQ(config->num_experts, 128);
  EXPECT_THAT(config->eos_token_ids, ElementsAre(1, 106, 50));
}

TEST(ModelConfigTest, TextConfigEosUsedWhenTopLevelHasNone) {
  Json json = Conditional(TextConfig31B());
  json.erase("eos_token_id");
  json["text_config"]["eos_token_id"] = {1, 7};
  absl::StatusOr<ModelConfig> config = Parse(json);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_THAT(config->eos_token_ids, ElementsAre(1, 7));
}

TEST(ModelConfigTest, MissingKeysTakeGemma4TextConfigDefaults) {
  absl::StatusOr<ModelConfig> config =
      Parse({{"model_type", "gemma4_text"}, {"hidden_size_per_layer_input", 0}});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->architecture, "Gemma4ForCausalLM");
  EXPECT_EQ(config->vocab_size, 262144);
  EXPECT_EQ(config->hidden_size, 2304);
  EXPECT_EQ(config->intermediate_size, 9216);
  EXPECT_EQ(config->num_hidden_layers, 30);
  EXPECT_EQ(config->num_attention_heads, 8);
  EXPECT_EQ(config->num_key_value_heads, 4);
  EXPECT_EQ(config->head_dim, 256);
  EXPECT_EQ(config->global_head_dim, 512);
  EXPECT_EQ(config->sliding_window, 512);
  EXPECT_EQ(config->max_position_embeddings, 131072);
  EXPECT_DOUBLE_EQ(config->final_logit_softcapping, 0.0);
  EXPECT_FALSE(config->attention_k_eq_v);
  EXPECT_FALSE(config->enable_moe_block);
  EXPECT_THAT(FullLayers(*config), ElementsAre(5, 11, 17, 23, 29));
  EXPECT_EQ(config->rope_sliding.rope_type, "default");
  EXPECT_DOUBLE_EQ(config->rope_sliding.rope_theta, 10000.0);
  EXPECT_EQ(config->rope_full.rope_type, "proportional");
  EXPECT_DOUBLE_EQ(config->rope_full.rope_theta, 1e6);
  EXPECT_DOUBLE_EQ(config->rope_full.partial_rotary_factor, 0.25);
  EXPECT_THAT(config->eos_token_ids, ElementsAre(1));
}

TEST(ModelConfigTest, MissingHiddenSizePerLayerInputMeansPleAndIsRefused) {
  // Gemma4TextConfig's default is 256 (per-layer embeddings), which this engine lacks.
  absl::StatusOr<ModelConfig> config = Parse({{"model_type", "gemma4_text"}});
  ASSERT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(config.status()), HasSubstr("hidden_size_per_layer_input"));
  EXPECT_THAT(Msg(config.status()), HasSubstr("256"));
  EXPECT_THAT(Msg(config.status()), HasSubstr("to 0"));
  EXPECT_THAT(Msg(config.status()), HasSubstr("my_config.json"));
}

TEST(ModelConfigTest, DerivedLayerTypesForceTheLastLayerFull) {
  Json json = TextConfig31B();
  json.erase("layer_types");
  json["num_hidden_layers"] = 8;
  absl::StatusOr<ModelConfig> config = Parse(json);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_THAT(FullLayers(*config), ElementsAre(5, 7));
}

TEST(ModelConfigTest, GivenLayerTypesForceTheLastLayerFull) {
  Json json = TextConfig31B();
  json["num_hidden_layers"] = 3;
  json["layer_types"] = {"full_attention", "sliding_attention", "sliding_attention"};
  absl::StatusOr<ModelConfig> config = Parse(json);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_THAT(FullLayers(*config), ElementsAre(0, 2));
}

TEST(ModelConfigTest, GlobalKvHeadsApplyOnlyWithKEqV) {
  // HF uses num_global_key_value_heads only on full layers that take V from K.
  Json json = TextConfig31B();
  json["attention_k_eq_v"] = false;
  absl::StatusOr<ModelConfig> config = Parse(json);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->LayerKvHeads(5), 16);
  EXPECT_FALSE(config->LayerKEqV(5));
}

TEST(ModelConfigTest, PerLayerConfigSetsGlobalHeadDimAndKvHeads) {
  // The form transformers 5.2x saves instead of global_head_dim / num_global_key_value_heads.
  Json json = TextConfig26B();
  json.erase("global_head_dim");
  json.erase("num_global_key_value_heads");
  Json per_layer;
  for (const char* layer : {"05", "11", "17", "23", "29"}) {
    per_layer[layer] = {{"head_dim", 384}, {"num_key_value_heads", 2}};
  }
  json["per_layer_config"] = per_layer;
  absl::StatusOr<ModelConfig> config = Parse(json);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->LayerHeadDim(11), 384);
  EXPECT_EQ(config->LayerKvHeads(11), 2);
  EXPECT_EQ(config->LayerKvHeads(10), 8);

  per_layer["04"] = {{"head_dim", 384}};
  json["per_layer_config"] = per_layer;
  config = Parse(json);
  ASSERT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(config.status()), HasSubstr("per_layer_config.04"));
}

TEST(ModelConfigTest, RopeParametersFactorIsRead) {
  Json json = TextConfig31B();
  json["rope_parameters"]["full_attention"]["factor"] = 8.0;
  absl::StatusOr<ModelConfig> config = Parse(json);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_DOUBLE_EQ(config->rope_full.factor, 8.0);
  EXPECT_DOUBLE_EQ(config->rope_sliding.factor, 1.0);
}

TEST(ModelConfigTest, BadJsonReportsThePosition) {
  absl::StatusOr<ModelConfig> config = ParseModelConfig("{\"hidden_size\": 12,, }", "x.json");
  ASSERT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(config.status()), HasSubstr("x.json"));
  EXPECT_THAT(Msg(config.status()), HasSubstr("at byte 20"));
}

TEST(ModelConfigTest, TopLevelMustBeAnObject) {
  absl::StatusOr<ModelConfig> config = ParseModelConfig("[1, 2]", "x.json");
  ASSERT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(config.status()), HasSubstr("object"));
}

// One invalid or unsupported setting applied to the real 31B text_config (or the 26B one).
struct BadConfigCase {
  std::string name;
  std::function<void(Json&)> mutate;  // applied to the text_config
  std::vector<std::string> expected;  // substrings of the message
  bool moe = false;
};

class BadConfigTest : public ::testing::TestWithParam<BadConfigCase> {};

TEST_P(BadConfigTest, IsInvalidArgumentNamingTheKey) {
  const BadConfigCase& test_case = GetParam();
  Json text = test_case.moe ? TextConfig26B() : TextConfig31B();
  test_case.mutate(text);
  absl::StatusOr<ModelConfig> config = Parse(Conditional(text));
  ASSERT_FALSE(config.ok()) << "accepted: " << test_case.name;
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument) << config.status();
  EXPECT_THAT(Msg(config.status()), HasSubstr("my_config.json"));
  for (const std::string& part : test_case.expected) {
    EXPECT_THAT(Msg(config.status()), HasSubstr(part));
  }
}

std::function<void(Json&)> Set(const std::string& key, Json value) {
  return [key, value](Json& text) { text[key] = value; };
}

INSTANTIATE_TEST_SUITE_P(
    ModelConfigTest, BadConfigTest,
    ::testing::Values(
        BadConfigCase{
            "ZeroHiddenSize", Set("hidden_size", 0), {"text_config.hidden_size = 0", "positive"}},
        BadConfigCase{
            "NegativeLayers", Set("num_hidden_layers", -1), {"text_config.num_hidden_layers = -1"}},
        BadConfigCase{"ZeroVocab", Set("vocab_size", 0), {"text_config.vocab_size = 0"}},
        BadConfigCase{
            "ZeroIntermediate", Set("intermediate_size", 0), {"text_config.intermediate_size = 0"}},
        BadConfigCase{
            "ZeroHeads", Set("num_attention_heads", 0), {"text_config.num_attention_heads = 0"}},
        BadConfigCase{
            "ZeroKvHeads", Set("num_key_value_heads", 0), {"text_config.num_key_value_heads = 0"}},
        BadConfigCase{"ZeroHeadDim", Set("head_dim", 0), {"text_config.head_dim = 0"}},
        BadConfigCase{
            "ZeroGlobalHeadDim", Set("global_head_dim", 0), {"text_config.global_head_dim = 0"}},
        BadConfigCase{"KvHeadsNotDividing",
                      Set("num_key_value_heads", 12),
                      {"num_key_value_heads = 12", "divisor of num_attention_heads = 32"}},
        BadConfigCase{"GlobalKvHeadsNotDividing",
                      Set("num_global_key_value_heads", 3),
                      {"num_global_key_value_heads = 3", "divisor of num_attention_heads = 32"}},
        BadConfigCase{"LayerTypesTooShort",
                      Set("layer_types", LayerTypes(9)),
                      {"text_config.layer_types", "num_hidden_layers = 60", "has 54"}},
        BadConfigCase{"UnknownLayerType",
                      [](Json& text) { text["layer_types"][3] = "chunked_attention"; },
                      {"layer_types[3]", "chunked_attention", "sliding_attention"}},
        BadConfigCase{
            "UnknownRopeType",
            [](Json& text) { text["rope_parameters"]["full_attention"]["rope_type"] = "yarn"; },
            {"rope_parameters.full_attention.rope_type", "yarn", "proportional"}},
        BadConfigCase{"RopeParametersWithoutFullAttention",
                      [](Json& text) { text["rope_parameters"].erase("full_attention"); },
                      {"rope_parameters", "full_attention"}},
        BadConfigCase{"MoeWithoutExperts",
                      Set("enable_moe_block", true),
                      {"text_config.num_experts", "positive"}},
        BadConfigCase{"MoeWithoutTopK",
                      Set("top_k_experts", nullptr),
                      {"text_config.top_k_experts"},
                      /*moe=*/true},
        BadConfigCase{"MoeWithoutExpertSize",
                      Set("moe_intermediate_size", 0),
                      {"text_config.moe_intermediate_size = 0"},
                      /*moe=*/true},
        BadConfigCase{"TopKAboveExperts",
                      Set("top_k_experts", 129),
                      {"text_config.top_k_experts = 129", "at most num_experts = 128"},
                      /*moe=*/true},
        BadConfigCase{"PerLayerEmbeddings",
                      Set("hidden_size_per_layer_input", 256),
                      {"hidden_size_per_layer_input = 256", "not implemented"}},
        BadConfigCase{"KvSharedLayers",
                      Set("num_kv_shared_layers", 4),
                      {"num_kv_shared_layers = 4", "not implemented"}},
        BadConfigCase{"DoubleWideMlp",
                      Set("use_double_wide_mlp", true),
                      {"use_double_wide_mlp = true", "not implemented"}},
        BadConfigCase{"AttentionBias",
                      Set("attention_bias", true),
                      {"attention_bias = true", "not implemented"}},
        BadConfigCase{"OtherActivation",
                      Set("hidden_activation", "silu"),
                      {"hidden_activation = \"silu\"", "gelu_pytorch_tanh"}},
        BadConfigCase{
            "ZeroSlidingWindow", Set("sliding_window", 0), {"text_config.sliding_window = 0"}},
        BadConfigCase{"ZeroRmsNormEps", Set("rms_norm_eps", 0.0), {"text_config.rms_norm_eps"}},
        BadConfigCase{
            "NegativeRmsNormEps", Set("rms_norm_eps", -1e-6), {"text_config.rms_norm_eps"}},
        BadConfigCase{"StringHiddenSize",
                      Set("hidden_size", "5376"),
                      {"text_config.hidden_size = \"5376\"", "integer"}},
        BadConfigCase{"FloatLayers",
                      Set("num_hidden_layers", 60.5),
                      {"text_config.num_hidden_layers", "integer"}},
        BadConfigCase{"StringMoeFlag",
                      Set("enable_moe_block", "yes"),
                      {"text_config.enable_moe_block", "true or false"}},
        BadConfigCase{"BadEos", Set("eos_token_id", "eos"), {"text_config.eos_token_id"}},
        BadConfigCase{"BidirectionalText",
                      Set("use_bidirectional_attention", "all"),
                      {"use_bidirectional_attention"}},
        BadConfigCase{"WrongModelType",
                      Set("model_type", "gemma3_text"),
                      {"text_config.model_type", "gemma3_text"}}),
    [](const ::testing::TestParamInfo<BadConfigCase>& info) { return info.param.name; });

class LoadModelConfigTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "/model_config_test_XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  std::string dir_;
};

TEST_F(LoadModelConfigTest, MissingFileIsNotFoundNamingThePath) {
  absl::StatusOr<ModelConfig> config = LoadModelConfig(dir_);
  ASSERT_EQ(config.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Msg(config.status()), HasSubstr(dir_ + "/config.json"));
}

TEST_F(LoadModelConfigTest, ReadsConfigJsonAndNamesItInErrors) {
  {
    std::ofstream out(dir_ + "/config.json");
    out << Conditional(TextConfig26B()).dump(2);
  }
  absl::StatusOr<ModelConfig> config = LoadModelConfig(dir_);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->num_experts, 128);

  {
    std::ofstream out(dir_ + "/config.json");
    Json text = TextConfig26B();
    text["sliding_window"] = -4;
    out << Conditional(text).dump(2);
  }
  config = LoadModelConfig(dir_);
  ASSERT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(config.status()), HasSubstr(dir_ + "/config.json"));
  EXPECT_THAT(Msg(config.status()), HasSubstr("sliding_window = -4"));
}

}  // namespace
}  // namespace gemma
