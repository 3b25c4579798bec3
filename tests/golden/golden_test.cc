// Golden tests: our CPU engine against Hugging Face transformers on tiny random Gemma 4
// checkpoints (fixtures from scripts/make_golden.py). Logits of whole prompts, the same through
// decode steps and chunked prefill over the paged cache, per-layer hidden states, chosen
// experts, greedy continuations, and bf16 weights.
#include <algorithm>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/npy.h"
#include "glog/logging.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/compare.h"
#include "tests/testing/tolerances.h"
#include "worker/backend/cpu/cpu_backend.h"
#include "worker/engine/generate.h"
#include "worker/model/gemma4/kv_cache.h"
#include "worker/model/gemma4/model.h"

namespace gemma {
namespace {

using testing::Compare;
using testing::GoldenPath;

nlohmann::json ReadManifest(const std::string& model) {
  std::ifstream in(GoldenPath(absl::StrCat("reference/", model, "/manifest.json")));
  EXPECT_TRUE(in.good()) << "missing fixture for " << model << "; run scripts/make_golden.sh";
  return nlohmann::json::parse(in);
}

NpyArray ReadFixture(const std::string& model, const std::string& file) {
  auto array = ReadNpy(GoldenPath(absl::StrCat("reference/", model, "/", file)));
  EXPECT_TRUE(array.ok()) << array.status();
  return array.ok() ? *std::move(array) : NpyArray{};
}

// One model loaded on the CPU backend with a roomy cache.
struct Loaded {
  std::unique_ptr<CpuBackend> backend;
  std::unique_ptr<gemma4::Model> model;
  std::unique_ptr<KvCache> cache;
};

Loaded Load(const std::string& model_dir, int64_t page_size = 4) {
  Loaded l;
  l.backend = std::make_unique<CpuBackend>();
  auto model = gemma4::Model::Load(GoldenPath(model_dir), *l.backend);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return l;
  l.model = *std::move(model);
  KvCacheOptions options;
  options.page_size = page_size;
  options.default_tokens = 1024;
  auto cache = KvCache::Create(l.model->config(), *l.backend, options);
  EXPECT_TRUE(cache.ok()) << cache.status();
  l.cache = *std::move(cache);
  return l;
}

std::vector<int32_t> Tokens(const nlohmann::json& j) { return j.get<std::vector<int32_t>>(); }

class GoldenTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    manifest_ = ReadManifest(GetParam());
    loaded_ = Load(manifest_["model"].get<std::string>());
    ASSERT_NE(loaded_.model, nullptr);
    vocab_ = loaded_.model->config().vocab_size;
  }
  nlohmann::json manifest_;
  Loaded loaded_;
  int64_t vocab_ = 0;
};

TEST_P(GoldenTest, PromptLogitsMatchReferenceAndMarginsHold) {
  for (const auto& prompt : manifest_["prompts"]) {
    std::vector<int32_t> tokens = Tokens(prompt["tokens"]);
    NpyArray ref = ReadFixture(GetParam(), prompt["logits"]);
    auto ours = PromptLogits(*loaded_.model, *loaded_.cache, tokens);
    ASSERT_TRUE(ours.ok()) << ours.status();
    auto cmp = Compare(*ours, ref.AsFloat());
    LOG(INFO) << GetParam() << " prompt " << prompt["name"] << " (" << tokens.size()
              << " tokens): " << cmp.ToString() << "; reference min top-1 margin "
              << prompt["min_top1_margin"].get<double>();
    EXPECT_FALSE(cmp.nan_mismatch);
    EXPECT_LE(cmp.Relative(), testing::kLogitRelTol)
        << "prompt " << prompt["name"] << " (" << tokens.size() << " tokens): " << cmp.ToString();
    // The reference's top-1 margin dwarfs our error, so greedy choices are meaningful.
    double margin = prompt["min_top1_margin"].get<double>();
    auto ours_argmax = testing::RowArgmax(*ours, vocab_);
    auto ref_argmax = testing::RowArgmax(ref.AsFloat(), vocab_);
    if (margin > testing::kMarginFactor * cmp.max_abs_err) {
      EXPECT_EQ(ours_argmax, ref_argmax) << "prompt " << prompt["name"];
    }
    auto ref_margins = testing::RowTop1Margin(ref.AsFloat(), vocab_);
    EXPECT_NEAR(*std::min_element(ref_margins.begin(), ref_margins.end()), margin, 1e-4)
        << "recorded margin disagrees with the fixture's logits";
  }
}

TEST_P(GoldenTest, DecodeAndChunkedPrefillThroughPagedCacheMatchPrefill) {
  for (const auto& prompt : manifest_["prompts"]) {
    std::vector<int32_t> tokens = Tokens(prompt["tokens"]);
    NpyArray ref = ReadFixture(GetParam(), prompt["logits"]);
    for (int64_t chunk : {1, 3, 8}) {
      auto ours = PromptLogits(*loaded_.model, *loaded_.cache, tokens, chunk);
      ASSERT_TRUE(ours.ok()) << ours.status();
      auto cmp = Compare(*ours, ref.AsFloat());
      EXPECT_LE(cmp.Relative(), testing::kLogitRelTol)
          << "prompt " << prompt["name"] << " in steps of " << chunk << ": " << cmp.ToString();
    }
  }
  // Every page went back to its pool.
  EXPECT_EQ(loaded_.cache->pool(kSlidingPool).num_used(), 0);
  EXPECT_EQ(loaded_.cache->pool(kFullPool).num_used(), 0);
}

TEST_P(GoldenTest, HiddenStatesMatchLayerByLayer) {
  const auto& config = loaded_.model->config();
  for (const auto& prompt : manifest_["prompts"]) {
    std::vector<int32_t> tokens = Tokens(prompt["tokens"]);
    NpyArray ref = ReadFixture(GetParam(), prompt["hidden_states"]);
    const int64_t t = static_cast<int64_t>(tokens.size());
    const int64_t h = config.hidden_size;
    ASSERT_EQ(ref.shape, (std::vector<int64_t>{config.num_hidden_layers + 1, t, h}));
    std::vector<float> ref_all = ref.AsFloat();
    std::map<std::string, std::vector<float>> seen;
    loaded_.model->set_observer([&](std::string_view name, const Buffer& buffer,
                                    const std::vector<int64_t>& shape) {
      if (name != "embed" && name.find(".out") == std::string_view::npos) return;
      std::vector<float> host(shape[0] * shape[1]);
      ASSERT_TRUE(loaded_.backend->Read(buffer, host.data(), host.size() * sizeof(float)).ok());
      seen[std::string(name)] = std::move(host);
    });
    ASSERT_TRUE(PromptLogits(*loaded_.model, *loaded_.cache, tokens).ok());
    loaded_.model->set_observer(nullptr);
    for (int64_t l = 0; l <= config.num_hidden_layers; ++l) {
      std::string name = l == 0 ? "embed" : absl::StrCat("layers.", l - 1, ".out");
      ASSERT_TRUE(seen.count(name)) << name << " was not observed";
      auto cmp = testing::Compare(seen[name].data(), ref_all.data() + l * t * h, t * h);
      ASSERT_LE(cmp.Relative(), testing::kHiddenRelTol)
          << "first diverging hidden state: " << name << " of prompt " << prompt["name"] << ": "
          << cmp.ToString();
    }
  }
}

TEST_P(GoldenTest, ChosenExpertsMatch) {
  const auto& config = loaded_.model->config();
  if (!config.enable_moe_block) GTEST_SKIP() << "dense model: no experts";
  for (const auto& prompt : manifest_["prompts"]) {
    std::vector<int32_t> tokens = Tokens(prompt["tokens"]);
    NpyArray ref = ReadFixture(GetParam(), prompt["experts"]);
    const int64_t t = static_cast<int64_t>(tokens.size());
    const int64_t k = config.top_k_experts;
    ASSERT_EQ(ref.shape, (std::vector<int64_t>{config.num_hidden_layers, t, k}));
    std::vector<int64_t> ref_ids = ref.AsInt64();
    std::vector<int64_t> ours(ref_ids.size(), -1);
    loaded_.model->set_observer([&](std::string_view name, const Buffer& buffer,
                                    const std::vector<int64_t>&) {
      if (name.find(".router_ids") == std::string_view::npos) return;
      int layer = std::stoi(std::string(name.substr(7)));
      std::vector<int32_t> ids(t * k);
      ASSERT_TRUE(loaded_.backend->Read(buffer, ids.data(), ids.size() * sizeof(int32_t)).ok());
      std::copy(ids.begin(), ids.end(), ours.begin() + layer * t * k);
    });
    ASSERT_TRUE(PromptLogits(*loaded_.model, *loaded_.cache, tokens).ok());
    loaded_.model->set_observer(nullptr);
    for (int64_t i = 0; i < static_cast<int64_t>(ref_ids.size()); ++i) {
      ASSERT_EQ(ours[i], ref_ids[i]) << "prompt " << prompt["name"] << ": layer " << i / (t * k)
                                     << ", token " << (i / k) % t << ", choice " << i % k;
    }
    // The margin the fixture was chosen for (1e-3 unless its manifest says otherwise), a
    // hundredfold at least our router's error.
    EXPECT_GE(prompt["min_expert_margin"].get<double>(),
              manifest_.value("min_expert_margin_required", 1e-3));
  }
}

// The expert-load counters equal the routing transformers recorded: per layer, each expert's
// count is the number of prompt tokens that chose it. Taking them zeroes them.
TEST_P(GoldenTest, ExpertCountsEqualTheReferenceRouting) {
  const auto& config = loaded_.model->config();
  if (!config.enable_moe_block) GTEST_SKIP() << "dense model: no experts";
  ASSERT_TRUE(loaded_.model->EnableExpertCounts().ok());
  const int64_t experts = config.num_experts;
  for (const auto& prompt : manifest_["prompts"]) {
    std::vector<int32_t> tokens = Tokens(prompt["tokens"]);
    NpyArray ref = ReadFixture(GetParam(), prompt["experts"]);
    const int64_t t = static_cast<int64_t>(tokens.size());
    const int64_t k = config.top_k_experts;
    std::vector<int64_t> want(config.num_hidden_layers * experts, 0);
    const std::vector<int64_t> ref_ids = ref.AsInt64();
    for (int64_t i = 0; i < static_cast<int64_t>(ref_ids.size()); ++i) {
      ++want[(i / (t * k)) * experts + ref_ids[i]];
    }
    ASSERT_TRUE(PromptLogits(*loaded_.model, *loaded_.cache, tokens).ok());
    auto counts = loaded_.model->TakeExpertCounts();
    ASSERT_TRUE(counts.ok()) << counts.status();
    EXPECT_EQ(*counts, want) << "prompt " << prompt["name"];
    auto again = loaded_.model->TakeExpertCounts();
    ASSERT_TRUE(again.ok());
    EXPECT_EQ(*again, std::vector<int64_t>(want.size(), 0));
  }
}

TEST_P(GoldenTest, GreedyContinuationsIdentical) {
  for (const auto& g : manifest_["greedy"]) {
    std::vector<int32_t> prompt = Tokens(g["prompt"]);
    GenerateOptions options;
    options.max_new_tokens = g["max_new_tokens"].get<int64_t>();
    auto ours = Generate(*loaded_.model, *loaded_.cache, prompt, options);
    ASSERT_TRUE(ours.ok()) << ours.status();
    EXPECT_EQ(*ours, Tokens(g["output"])) << "prompt of " << prompt.size() << " tokens";
  }
}

// kjv-moe is the demo model (models/kjv-moe, trained by scripts/train_demo_model.sh); its
// fixtures come from scripts/make_demo_golden.py on held-out text.
INSTANTIATE_TEST_SUITE_P(Models, GoldenTest,
                         ::testing::Values("tiny-dense", "tiny-moe", "tiny-moe-bf16", "kjv-moe"));

TEST(GoldenBf16Test, Top1AgreesWithTransformersBf16Run) {
  nlohmann::json manifest = ReadManifest("tiny-moe-bf16");
  Loaded loaded = Load(manifest["model"].get<std::string>());
  ASSERT_NE(loaded.model, nullptr);
  const int64_t vocab = loaded.model->config().vocab_size;
  int64_t agree = 0, total = 0;
  for (const auto& prompt : manifest["prompts"]) {
    auto ours = PromptLogits(*loaded.model, *loaded.cache, Tokens(prompt["tokens"]));
    ASSERT_TRUE(ours.ok()) << ours.status();
    NpyArray bf16 = ReadFixture("tiny-moe-bf16", prompt["bf16_logits"]);
    auto a = testing::RowArgmax(*ours, vocab);
    auto b = testing::RowArgmax(bf16.AsFloat(), vocab);
    for (size_t i = 0; i < a.size(); ++i) agree += a[i] == b[i];
    total += static_cast<int64_t>(a.size());
  }
  ASSERT_GT(total, 0);
  LOG(INFO) << "bf16 top-1 agreement with the transformers bf16 run: " << agree << " of " << total;
  EXPECT_GE(static_cast<double>(agree) / total, testing::kBf16Top1Agreement)
      << agree << " of " << total << " positions agree";
}

}  // namespace
}  // namespace gemma
