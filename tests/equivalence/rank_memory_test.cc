// A rank loads only its share: a subprocess loading a ~250 MB checkpoint as rank r of 4 grows
// its resident set by about a quarter of what one rank holding everything grows by.
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/child_process.h"

namespace gemma {
namespace {

namespace fs = std::filesystem;

// A dense Gemma 4-shaped checkpoint of random bf16 weights, written straight to safetensors.
std::string WriteBigCheckpoint() {
  fs::path dir = fs::path(::testing::TempDir()) / "big_dense";
  if (fs::exists(dir / "model.safetensors")) return dir.string();
  fs::create_directories(dir);
  const int64_t h = 1024, inter = 4096, vocab = 32768, layers = 6, heads = 8, d = 128, kv = 4,
                gd = 256, gkv = 2;
  const std::vector<std::string> types = {"sliding_attention", "sliding_attention",
                                          "full_attention",    "sliding_attention",
                                          "sliding_attention", "full_attention"};
  nlohmann::json text = {
      {"vocab_size", vocab}, {"hidden_size", h}, {"intermediate_size", inter},
      {"num_hidden_layers", layers}, {"layer_types", types}, {"num_attention_heads", heads},
      {"num_key_value_heads", kv}, {"head_dim", d}, {"num_global_key_value_heads", gkv},
      {"global_head_dim", gd}, {"attention_k_eq_v", true}, {"sliding_window", 128},
      {"enable_moe_block", false}, {"hidden_size_per_layer_input", 0},
      {"final_logit_softcapping", 30.0}, {"max_position_embeddings", 4096}};
  nlohmann::json config = {{"architectures", {"Gemma4ForConditionalGeneration"}},
                           {"model_type", "gemma4"}, {"text_config", text}};
  std::ofstream(dir / "config.json") << config.dump(2);

  std::vector<std::pair<std::string, std::vector<int64_t>>> tensors;
  const std::string p = "model.language_model.";
  tensors.push_back({p + "embed_tokens.weight", {vocab, h}});
  tensors.push_back({p + "norm.weight", {h}});
  for (int l = 0; l < layers; ++l) {
    const bool full = types[l] == "full_attention";
    const int64_t hd = full ? gd : d, kvh = full ? gkv : kv;
    const std::string q = absl::StrCat(p, "layers.", l, ".");
    for (const char* n : {"input_layernorm.weight", "post_attention_layernorm.weight",
                          "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"}) {
      tensors.push_back({q + n, {h}});
    }
    tensors.push_back({q + "layer_scalar", {1}});
    tensors.push_back({q + "self_attn.q_proj.weight", {heads * hd, h}});
    tensors.push_back({q + "self_attn.k_proj.weight", {kvh * hd, h}});
    if (!full) tensors.push_back({q + "self_attn.v_proj.weight", {kvh * hd, h}});
    tensors.push_back({q + "self_attn.o_proj.weight", {h, heads * hd}});
    tensors.push_back({q + "self_attn.q_norm.weight", {hd}});
    tensors.push_back({q + "self_attn.k_norm.weight", {hd}});
    tensors.push_back({q + "mlp.gate_proj.weight", {inter, h}});
    tensors.push_back({q + "mlp.up_proj.weight", {inter, h}});
    tensors.push_back({q + "mlp.down_proj.weight", {h, inter}});
  }
  nlohmann::json header = nlohmann::json::object();
  int64_t offset = 0;
  for (const auto& [name, shape] : tensors) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    header[name] = {{"dtype", "BF16"}, {"shape", shape}, {"data_offsets", {offset, offset + 2 * n}}};
    offset += 2 * n;
  }
  std::string json = header.dump();
  // Written under a temporary name and renamed, so an interrupted run leaves no half file.
  const fs::path partial = dir / absl::StrCat("model.safetensors.", getpid());
  std::ofstream out(partial, std::ios::binary);
  uint64_t len = json.size();
  out.write(reinterpret_cast<const char*>(&len), 8);
  out << json;
  std::mt19937 rng(1);
  std::vector<uint16_t> chunk(1 << 20);
  for (int64_t written = 0; written < offset; written += 2 * static_cast<int64_t>(chunk.size())) {
    for (auto& v : chunk) v = static_cast<uint16_t>(0x3c00 + (rng() & 0x3ff));  // ~[0.0078, 0.0156)
    int64_t bytes = std::min<int64_t>(2 * chunk.size(), offset - written);
    out.write(reinterpret_cast<const char*>(chunk.data()), bytes);
  }
  out.close();
  fs::rename(partial, dir / "model.safetensors");
  return dir.string();
}

// Anonymous memory (our copies of the weights) grown by loading as rank r of w, in KiB.
int64_t LoadGrowthKb(const std::string& dir, int w, int r) {
  const std::string log = absl::StrCat(::testing::TempDir(), "/load_rank_", getpid(), ".log");
  testing::ChildProcess p({absl::StrCat(GEMMA_BINARY_DIR, "/bin/load_rank"), dir,
                           std::to_string(w), std::to_string(r)},
                          log);
  EXPECT_EQ(p.WaitForExitCode(std::chrono::seconds(120)), 0) << testing::ReadFileToString(log);
  std::istringstream in(testing::ReadFileToString(log));
  int64_t rss_before, rss_after, anon_before, anon_after;
  in >> rss_before >> rss_after >> anon_before >> anon_after;
  return anon_after - anon_before;
}

TEST(RankMemoryTest, RankHoldsAboutItsShareOfTheWeights) {
  const std::string dir = WriteBigCheckpoint();
  const auto file_bytes = fs::file_size(fs::path(dir) / "model.safetensors");
  ASSERT_GE(file_bytes, 200u << 20) << "the checkpoint must be at least 200 MB";
  const int64_t whole = LoadGrowthKb(dir, 1, 0);
  const int64_t quarter = LoadGrowthKb(dir, 4, 1);
  // One rank holds everything: its growth is about the file (bf16 kept as bf16).
  EXPECT_GT(whole, static_cast<int64_t>(file_bytes / 1024) * 9 / 10);
  // A quarter rank: the split weights / 4 plus the replicated norms (tiny) and slack.
  EXPECT_LT(quarter, whole * 30 / 100) << "whole " << whole << " KiB, rank 1 of 4 " << quarter;
  EXPECT_GT(quarter, whole * 20 / 100) << "whole " << whole << " KiB, rank 1 of 4 " << quarter;
}

}  // namespace
}  // namespace gemma
