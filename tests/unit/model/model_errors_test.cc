// Bad checkpoints and bad inputs reach the model as Statuses naming what was wrong.
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/compare.h"
#include "worker/backend/cpu/cpu_backend.h"
#include "worker/engine/generate.h"
#include "worker/model/gemma4/model.h"

namespace gemma {
namespace {

namespace fs = std::filesystem;

// A copy of the tiny dense fixture whose config.json is edited by `edit`.
std::string CopyWithConfig(const std::string& name,
                           const std::function<void(nlohmann::json&)>& edit) {
  fs::path dir = fs::path(::testing::TempDir()) / name;
  fs::remove_all(dir);
  fs::copy(testing::GoldenPath("tiny-dense"), dir, fs::copy_options::recursive);
  std::ifstream in(dir / "config.json");
  nlohmann::json config = nlohmann::json::parse(in);
  in.close();
  edit(config);
  std::ofstream(dir / "config.json") << config.dump(2);
  return dir.string();
}

TEST(ModelErrorsTest, ShapeDisagreeingWithConfigNamesTheTensor) {
  std::string dir = CopyWithConfig("wrong_inter", [](nlohmann::json& c) {
    c["text_config"]["intermediate_size"] = c["text_config"]["intermediate_size"].get<int>() * 2;
  });
  CpuBackend backend;
  auto model = gemma4::Model::Load(dir, backend);
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(model.status().message().find("mlp.gate_proj.weight"), std::string::npos)
      << model.status();
}

TEST(ModelErrorsTest, MissingTensorIsNamed) {
  // A config asking for MoE blocks the dense checkpoint does not have.
  std::string dir = CopyWithConfig("moe_missing", [](nlohmann::json& c) {
    c["text_config"]["enable_moe_block"] = true;
    c["text_config"]["num_experts"] = 4;
    c["text_config"]["top_k_experts"] = 2;
    c["text_config"]["moe_intermediate_size"] = 8;
  });
  CpuBackend backend;
  auto model = gemma4::Model::Load(dir, backend);
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(model.status().message().find("router.proj.weight"), std::string::npos)
      << model.status();
}

TEST(ModelErrorsTest, TokenOutsideTheVocabularyIsRejected) {
  CpuBackend backend;
  auto model = gemma4::Model::Load(testing::GoldenPath("tiny-dense"), backend);
  ASSERT_TRUE(model.ok()) << model.status();
  auto cache = KvCache::Create((*model)->config(), backend, KvCacheOptions{});
  ASSERT_TRUE(cache.ok());
  const int32_t vocab = static_cast<int32_t>((*model)->config().vocab_size);
  for (int32_t bad : {vocab, vocab + 100, -1}) {
    std::vector<int32_t> tokens = {2, 17, bad};
    auto logits = PromptLogits(**model, **cache, tokens);
    ASSERT_FALSE(logits.ok());
    EXPECT_EQ(logits.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(logits.status().message().find(std::to_string(bad)), std::string::npos)
        << logits.status();
    EXPECT_NE(logits.status().message().find("outside the vocabulary"), std::string::npos);
  }
  // Nothing leaked from the failed calls.
  EXPECT_EQ((*cache)->pool(kSlidingPool).num_used(), 0);
  EXPECT_EQ((*cache)->pool(kFullPool).num_used(), 0);
  std::vector<int32_t> empty;
  EXPECT_EQ(PromptLogits(**model, **cache, empty).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ModelErrorsTest, MissingDirectoryIsNotFound) {
  CpuBackend backend;
  auto model = gemma4::Model::Load("/nonexistent/gemma-model", backend);
  ASSERT_FALSE(model.ok());
  EXPECT_NE(model.status().message().find("/nonexistent/gemma-model"), std::string::npos)
      << model.status();
}

}  // namespace
}  // namespace gemma
