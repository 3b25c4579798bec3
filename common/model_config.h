// Gemma 4 text-decoder configuration, parsed from a Hugging Face config.json in either layout
// (Gemma4ForConditionalGeneration with `text_config`, or Gemma4ForCausalLM at the top level).
// Field names are the config.json keys. CUDA-free and gRPC-free.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace gemma {

enum class LayerType : uint8_t { kSliding, kFull };

struct RopeParams {
  std::string rope_type = "default";  // "default" or "proportional"
  double rope_theta = 10000.0;
  double partial_rotary_factor = 1.0;  // proportional only
  double factor = 1.0;                 // inv_freq is divided by this
};

struct ModelConfig {
  // Architecture as written in config.json ("Gemma4ForConditionalGeneration", ...).
  std::string architecture;
  // Tensor name prefix of the text decoder: "model.language_model." or "model.".
  std::string tensor_prefix;

  int64_t vocab_size = 262144;
  int64_t hidden_size = 2304;
  int64_t intermediate_size = 9216;
  int64_t num_hidden_layers = 30;
  int64_t num_attention_heads = 8;
  int64_t num_key_value_heads = 4;
  // KV heads of full layers. As in HF, the config key counts only with attention_k_eq_v (the
  // parser stores 0 otherwise); a per_layer_config override always counts.
  // 0 -> same as num_key_value_heads.
  int64_t num_global_key_value_heads = 0;
  int64_t head_dim = 256;
  int64_t global_head_dim = 512;
  bool attention_k_eq_v = false;
  bool enable_moe_block = false;
  int64_t num_experts = 0;
  int64_t top_k_experts = 0;
  int64_t moe_intermediate_size = 0;
  int64_t sliding_window = 512;
  std::vector<LayerType> layer_types;  // one per layer; the last is always kFull
  // rope_parameters.sliding_attention / .full_attention; defaults are Gemma4TextConfig's.
  RopeParams rope_sliding;
  RopeParams rope_full = {"proportional", 1000000.0, 0.25, 1.0};
  double rms_norm_eps = 1e-6;
  double final_logit_softcapping = 0.0;  // 0 = none
  std::string hidden_activation = "gelu_pytorch_tanh";
  bool tie_word_embeddings = true;
  int64_t max_position_embeddings = 131072;
  // Per-layer embeddings (PLE) width. The class default is 256 but this engine implements no
  // PLE, so a config must set it to 0 (as the 31B and 26B-A4B checkpoints do).
  int64_t hidden_size_per_layer_input = 256;
  int64_t num_kv_shared_layers = 0;
  bool use_double_wide_mlp = false;
  bool attention_bias = false;
  int64_t pad_token_id = 0;
  int64_t bos_token_id = 2;
  std::vector<int64_t> eos_token_ids = {1};  // top-level eos_token_id wins over text_config's

  // Derived helpers.
  bool IsFull(int layer_idx) const { return layer_types[layer_idx] == LayerType::kFull; }
  int64_t LayerHeadDim(int layer_idx) const {
    return IsFull(layer_idx) ? global_head_dim : head_dim;
  }
  int64_t LayerKvHeads(int layer_idx) const {
    return IsFull(layer_idx) && num_global_key_value_heads > 0 ? num_global_key_value_heads
                                                               : num_key_value_heads;
  }
  // True when layer `layer_idx` derives V from the K projection (no v_proj).
  bool LayerKEqV(int layer_idx) const { return attention_k_eq_v && IsFull(layer_idx); }
  const RopeParams& LayerRope(int layer_idx) const {
    return IsFull(layer_idx) ? rope_full : rope_sliding;
  }
};

// Parses config.json text. `source` names the file in error messages. Missing keys take the
// Gemma4TextConfig defaults; nonsensical values (non-positive sizes, heads not dividing,
// unknown layer types or RoPE kinds, features this engine does not implement such as
// per-layer embeddings) are INVALID_ARGUMENT naming the key and the value.
absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text,
                                             std::string_view source = "config.json");

// Reads and parses `<dir>/config.json`.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);

}  // namespace gemma
