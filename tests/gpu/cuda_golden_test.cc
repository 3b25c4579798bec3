// The golden fixtures (transformers on tiny Gemma 4 checkpoints) on the CUDA backend: prompt
// logits, the same through decode steps and chunked prefill over the paged cache, chosen
// experts, and greedy continuations, all held to the CPU engine's bound. The backend keeps
// activations in f32 in every product here (CudaBackendOptions::f32_products) and its KV cache
// in f32 (kv_dtype), so the bf16 checkpoint is computed as its fp32 reference is. The serving
// path, whose prefill products round activations to bf16 for the tensor cores and whose KV
// cache is bf16 (the defaults), is held against transformers' own bf16 computation: no further
// from the fp32 reference than twice that run (or kCudaRelTol), and the same top-1 token
// wherever that run has it.
// Skipped, saying so, where no CUDA device is present.
#include <algorithm>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/npy.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/compare.h"
#include "tests/testing/decode_together.h"
#include "tests/testing/tolerances.h"
#include "worker/backend/cuda/cuda_backend.h"
#include "worker/engine/generate.h"
#include "worker/model/gemma4/kv_cache.h"
#include "worker/model/gemma4/model.h"

namespace gemma {
namespace {

using testing::GoldenPath;

std::vector<int32_t> Tokens(const nlohmann::json& j) { return j.get<std::vector<int32_t>>(); }

class CudaGoldenTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (CudaBackend::DeviceCount() == 0) {
      GTEST_SKIP() << "no CUDA device present: GPU golden test skipped";
    }
    std::ifstream in(GoldenPath(absl::StrCat("reference/", GetParam(), "/manifest.json")));
    ASSERT_TRUE(in.good()) << "missing fixture for " << GetParam();
    manifest_ = nlohmann::json::parse(in);
    ASSERT_NO_FATAL_FAILURE(LoadOnCuda(/*f32_products=*/true, backend_, model_, cache_));
  }
  // The fixture's model on a fresh CUDA backend (1 GiB arena) with a paged cache of 4-token
  // pages; f32_products as CudaBackendOptions has it. With f32 products the KV cache is f32 too
  // (the 1e-4 bound and exact expert choices are the fp32 reference's, and bf16 rounding of
  // every cached key and value costs a few 1e-3); without, it keeps the backend's default
  // (bf16), so the serving path checked is the one served. `fast_paths` turns on the kernels
  // that are off by default until a device has passed with them (tensor-core prefill attention,
  // device-scheduled expert products).
  void LoadOnCuda(bool f32_products, std::unique_ptr<CudaBackend>& backend,
                  std::unique_ptr<gemma4::Model>& model, std::unique_ptr<KvCache>& cache,
                  bool fast_paths = false) {
    CudaBackendOptions options;
    options.arena_bytes = size_t{1} << 30;
    options.f32_products = f32_products;
    options.tensor_core_attention = fast_paths;
    options.device_scheduled_experts = fast_paths;
    if (f32_products) options.kv_dtype = DType::kF32;
    auto b = CudaBackend::Create(options);
    ASSERT_TRUE(b.ok()) << b.status();
    backend = *std::move(b);
    auto m = gemma4::Model::Load(GoldenPath(manifest_["model"].get<std::string>()), *backend);
    ASSERT_TRUE(m.ok()) << m.status();
    model = *std::move(m);
    KvCacheOptions cache_options;
    cache_options.page_size = 4;
    cache_options.default_tokens = 1024;
    auto c = KvCache::Create(model->config(), *backend, cache_options);
    ASSERT_TRUE(c.ok()) << c.status();
    cache = *std::move(c);
  }
  void TearDown() override {
    cache_.reset();
    model_.reset();
    backend_.reset();
  }
  std::vector<float> Fixture(const std::string& file) {
    auto array = ReadNpy(GoldenPath(absl::StrCat("reference/", GetParam(), "/", file)));
    EXPECT_TRUE(array.ok()) << array.status();
    return array.ok() ? array->AsFloat() : std::vector<float>{};
  }

  nlohmann::json manifest_;
  std::unique_ptr<CudaBackend> backend_;
  std::unique_ptr<gemma4::Model> model_;
  std::unique_ptr<KvCache> cache_;
  const double tol_ = testing::kLogitRelTol;
};

TEST_P(CudaGoldenTest, PromptLogitsMatchReferenceInOneStepAndInChunks) {
  for (const auto& prompt : manifest_["prompts"]) {
    std::vector<int32_t> tokens = Tokens(prompt["tokens"]);
    std::vector<float> ref = Fixture(prompt["logits"]);
    for (int64_t chunk : {0, 1, 3}) {
      auto ours = PromptLogits(*model_, *cache_, tokens, chunk);
      ASSERT_TRUE(ours.ok()) << ours.status();
      auto cmp = testing::Compare(*ours, ref);
      EXPECT_FALSE(cmp.nan_mismatch);
      EXPECT_LE(cmp.Relative(), tol_)
          << "prompt " << prompt["name"] << " in steps of " << chunk << ": " << cmp.ToString();
    }
  }
}

TEST_P(CudaGoldenTest, GreedyContinuationsIdentical) {
  for (const auto& g : manifest_["greedy"]) {
    std::vector<int32_t> prompt = Tokens(g["prompt"]);
    GenerateOptions options;
    options.max_new_tokens = g["max_new_tokens"].get<int64_t>();
    auto ours = Generate(*model_, *cache_, prompt, options);
    ASSERT_TRUE(ours.ok()) << ours.status();
    EXPECT_EQ(*ours, Tokens(g["output"])) << "prompt of " << prompt.size() << " tokens";
  }
}

TEST_P(CudaGoldenTest, ChosenExpertsMatch) {
  const auto& config = model_->config();
  if (!config.enable_moe_block) GTEST_SKIP() << "dense model: no experts";
  for (const auto& prompt : manifest_["prompts"]) {
    std::vector<int32_t> tokens = Tokens(prompt["tokens"]);
    auto array = ReadNpy(GoldenPath(absl::StrCat("reference/", GetParam(), "/",
                                                 prompt["experts"].get<std::string>())));
    ASSERT_TRUE(array.ok()) << array.status();
    std::vector<int64_t> ref = array->AsInt64();
    const int64_t t = static_cast<int64_t>(tokens.size());
    const int64_t k = config.top_k_experts;
    std::vector<int64_t> ours(ref.size(), -1);
    model_->set_observer([&](std::string_view name, const Buffer& buffer,
                             const std::vector<int64_t>&) {
      if (name.find(".router_ids") == std::string_view::npos) return;
      int layer = std::stoi(std::string(name.substr(7)));
      std::vector<int32_t> ids(t * k);
      ASSERT_TRUE(backend_->Read(buffer, ids.data(), ids.size() * sizeof(int32_t)).ok());
      std::copy(ids.begin(), ids.end(), ours.begin() + layer * t * k);
    });
    ASSERT_TRUE(PromptLogits(*model_, *cache_, tokens).ok());
    model_->set_observer(nullptr);
    EXPECT_EQ(ours, ref) << "prompt " << prompt["name"];
  }
}

TEST_P(CudaGoldenTest, StepGraphsMatchEagerSteps) {
  const auto& greedy = manifest_["greedy"][0];
  std::vector<int32_t> prompt = Tokens(greedy["prompt"]);
  GenerateOptions options;
  options.max_new_tokens = greedy["max_new_tokens"].get<int64_t>();
  // Three sequences of different lengths decoding together (page tables of different widths).
  std::vector<std::vector<int32_t>> prompts = {prompt, {2, 7, 9}, {}};
  for (int i = 0; i < 37; ++i) prompts[2].push_back(static_cast<int32_t>(2 + (i * 31) % 400));

  model_->set_use_graphs(false);
  auto eager_logits = PromptLogits(*model_, *cache_, prompt, /*prefill_chunk=*/1);
  ASSERT_TRUE(eager_logits.ok()) << eager_logits.status();
  auto eager_tokens = Generate(*model_, *cache_, prompt, options);
  ASSERT_TRUE(eager_tokens.ok()) << eager_tokens.status();
  auto eager_batch = testing::DecodeTogether(*model_, *cache_, prompts, 9);
  ASSERT_TRUE(eager_batch.ok()) << eager_batch.status();
  EXPECT_EQ(model_->graph_captures(), 0);

  model_->set_use_graphs(true);
  auto graph_logits = PromptLogits(*model_, *cache_, prompt, /*prefill_chunk=*/1);
  ASSERT_TRUE(graph_logits.ok()) << graph_logits.status();
  auto graph_tokens = Generate(*model_, *cache_, prompt, options);
  ASSERT_TRUE(graph_tokens.ok()) << graph_tokens.status();
  auto graph_batch = testing::DecodeTogether(*model_, *cache_, prompts, 9);
  ASSERT_TRUE(graph_batch.ok()) << graph_batch.status();
  EXPECT_GT(model_->graph_captures(), 0);
  EXPECT_GT(model_->graph_replays(), 2 * model_->graph_captures());  // most steps replay

  auto cmp = testing::Compare(*graph_logits, *eager_logits);
  EXPECT_FALSE(cmp.nan_mismatch);
  EXPECT_LE(cmp.Relative(), 1e-6) << "single sequence, one token a step: " << cmp.ToString();
  EXPECT_EQ(*graph_tokens, *eager_tokens);
  EXPECT_EQ(*graph_tokens, Tokens(greedy["output"]));
  auto batch_cmp = testing::Compare(*graph_batch, *eager_batch);
  EXPECT_FALSE(batch_cmp.nan_mismatch);
  EXPECT_LE(batch_cmp.Relative(), 1e-6) << "three sequences together: " << batch_cmp.ToString();
}

// The serving path (bf16 activations into the tensor-core products, the bf16 KV cache) on the
// bf16 checkpoint, against transformers' bf16 run of the same prompts (recorded beside the fp32
// reference; its cache is bf16 as well).
TEST_P(CudaGoldenTest, ServingPathWithinTransformersBf16) {
  if (manifest_.value("weights_dtype", "") != "bfloat16") {
    GTEST_SKIP() << "f32 checkpoint: its products never round activations";
  }
  // Also with the fast paths that are off by default, which must hold the same bound.
  for (const bool fast_paths : {false, true}) {
    SCOPED_TRACE(fast_paths ? "tensor-core attention and device-scheduled experts" : "defaults");
    // Declared in this order so that the cache and model go before their backend.
    std::unique_ptr<CudaBackend> backend;
    std::unique_ptr<gemma4::Model> model;
    std::unique_ptr<KvCache> cache;
    ASSERT_NO_FATAL_FAILURE(
        LoadOnCuda(/*f32_products=*/false, backend, model, cache, fast_paths));
    ASSERT_EQ(cache->dtype(), DType::kBF16) << "the serving path's KV cache is bf16";
    int64_t longest = 0;
    const int64_t vocab = model->config().vocab_size;
    auto top1 = [vocab](const std::vector<float>& logits, int64_t pos) {
      auto first = logits.begin() + pos * vocab;
      return std::max_element(first, first + vocab) - first;
    };
    int64_t positions = 0, hf_agree = 0, our_agree = 0;
    for (const auto& prompt : manifest_["prompts"]) {
      if (!prompt.contains("bf16_logits")) continue;
      std::vector<int32_t> tokens = Tokens(prompt["tokens"]);
      longest = std::max<int64_t>(longest, static_cast<int64_t>(tokens.size()));
      std::vector<float> ref = Fixture(prompt["logits"]);
      std::vector<float> hf_bf16 = Fixture(prompt["bf16_logits"]);
      auto ours = PromptLogits(*model, *cache, tokens);
      ASSERT_TRUE(ours.ok()) << ours.status();
      ASSERT_EQ(ours->size(), ref.size());
      const double hf_err = testing::Compare(hf_bf16, ref).Relative();
      auto cmp = testing::Compare(*ours, ref);
      EXPECT_FALSE(cmp.nan_mismatch);
      EXPECT_LE(cmp.Relative(), std::max(testing::kCudaRelTol, 2 * hf_err))
          << "prompt " << prompt["name"] << ": " << cmp.ToString()
          << "; transformers bf16 against the same reference: relative " << hf_err;
      const int64_t n = static_cast<int64_t>(tokens.size());
      for (int64_t pos = 0; pos < n; ++pos) {
        const auto want = top1(ref, pos);
        ++positions;
        if (top1(hf_bf16, pos) == want) ++hf_agree;
        if (top1(*ours, pos) == want) ++our_agree;
      }
    }
    ASSERT_GT(positions, 0) << "the bf16 fixture records no transformers bf16 logits";
    EXPECT_GE(our_agree, hf_agree) << "top-1 agreement with the fp32 reference over " << positions
                                   << " positions: ours " << our_agree << ", transformers bf16 "
                                   << hf_agree;
    if (fast_paths && model->config().enable_moe_block && longest > 16) {
      EXPECT_GT(backend->moe_paths().scheduled, 0) << "the device-scheduled experts never ran";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Models, CudaGoldenTest,
                         ::testing::Values("tiny-dense", "tiny-moe", "tiny-moe-bf16"));

}  // namespace
}  // namespace gemma
