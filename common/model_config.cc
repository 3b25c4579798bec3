#include "common/model_config.h"

#include "common/json_util.h"

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/json_util.h"
#include "common/status_macros.h"
#include "glog/logging.h"
#include "nlohmann/json.hpp"

namespace gemma {
namespace {

using Json = nlohmann::json;

constexpr absl::string_view kSliding = "sliding_attention";
constexpr absl::string_view kFull = "full_attention";

// A short rendering of a JSON value for error messages.
std::string Show(const Json& value) {
  std::string text = value.dump();
  if (text.size() > 80) text = text.substr(0, 77) + "...";
  return text;
}

// Typed, optional reads of one JSON object's keys. Every error names the source file and the key
// with its path ("text_config.hidden_size"); a present key of the wrong type is an error, a
// missing or null one leaves the output untouched (the Gemma4TextConfig default).
class KeyReader {
 public:
  KeyReader(const Json& object, absl::string_view source, std::string prefix)
      : object_(object), source_(source), prefix_(std::move(prefix)) {}

  // The value of `key`, or nullptr when absent or null.
  const Json* Find(absl::string_view key) const {
    auto it = object_.find(std::string(key));
    if (it == object_.end() || it->is_null()) return nullptr;
    return &*it;
  }

  std::string Name(absl::string_view key) const { return absl::StrCat(prefix_, key); }

  absl::Status Error(absl::string_view key, const Json& value, absl::string_view expected) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": ", Name(key), " = ", Show(value),
                                                   " is invalid; expected ", expected));
  }

  absl::Status Int(absl::string_view key, int64_t* out) const {
    const Json* value = Find(key);
    if (value == nullptr) return absl::OkStatus();
    return ToInt(key, *value, out);
  }

  absl::Status ToInt(absl::string_view key, const Json& value, int64_t* out) const {
    if (value.is_number_unsigned()) {
      uint64_t v = value.get<uint64_t>();
      if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return Error(key, value, "an integer that fits in 64 bits");
      }
      *out = static_cast<int64_t>(v);
      return absl::OkStatus();
    }
    if (!value.is_number_integer()) return Error(key, value, "an integer");
    *out = value.get<int64_t>();
    return absl::OkStatus();
  }

  absl::Status Double(absl::string_view key, double* out) const {
    const Json* value = Find(key);
    if (value == nullptr) return absl::OkStatus();
    return ToDouble(key, *value, out);
  }

  absl::Status ToDouble(absl::string_view key, const Json& value, double* out) const {
    if (!value.is_number()) return Error(key, value, "a number");
    double v = value.get<double>();
    if (!std::isfinite(v)) return Error(key, value, "a finite number");
    *out = v;
    return absl::OkStatus();
  }

  absl::Status Bool(absl::string_view key, bool* out) const {
    const Json* value = Find(key);
    if (value == nullptr) return absl::OkStatus();
    if (!value->is_boolean()) return Error(key, *value, "true or false");
    *out = value->get<bool>();
    return absl::OkStatus();
  }

  absl::Status String(absl::string_view key, std::string* out) const {
    const Json* value = Find(key);
    if (value == nullptr) return absl::OkStatus();
    if (!value->is_string()) return Error(key, *value, "a string");
    *out = value->get<std::string>();
    return absl::OkStatus();
  }

  // An integer or a list of integers (eos_token_id). Returns whether the key was present.
  absl::StatusOr<bool> IntList(absl::string_view key, std::vector<int64_t>* out) const {
    const Json* value = Find(key);
    if (value == nullptr) return false;
    std::vector<int64_t> ids;
    if (value->is_array()) {
      for (const Json& item : *value) {
        int64_t id = 0;
        if (!item.is_number_integer())
          return Error(key, *value, "an integer or a list of integers");
        RETURN_IF_ERROR(ToInt(key, item, &id));
        ids.push_back(id);
      }
    } else {
      int64_t id = 0;
      if (!value->is_number_integer())
        return Error(key, *value, "an integer or a list of integers");
      RETURN_IF_ERROR(ToInt(key, *value, &id));
      ids.push_back(id);
    }
    *out = std::move(ids);
    return true;
  }

  const Json& object() const { return object_; }
  absl::string_view source() const { return source_; }

 private:
  const Json& object_;
  absl::string_view source_;
  std::string prefix_;
};

absl::Status RequirePositive(const KeyReader& keys, absl::string_view key, int64_t value) {
  if (value > 0) return absl::OkStatus();
  return keys.Error(key, Json(value), "a positive integer");
}

absl::Status ReadRope(const KeyReader& keys, const Json& rope, absl::string_view layer_type,
                      RopeParams* out) {
  std::string where = absl::StrCat("rope_parameters.", layer_type);
  if (!rope.is_object()) return keys.Error(where, rope, "an object");
  KeyReader sub(rope, keys.source(), keys.Name(absl::StrCat(where, ".")));
  RopeParams params;
  if (sub.Find("rope_type") == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(keys.source(), ": ", sub.Name("rope_type"),
                                                   " is missing; expected \"default\" or "
                                                   "\"proportional\""));
  }
  RETURN_IF_ERROR(sub.String("rope_type", &params.rope_type));
  if (params.rope_type != "default" && params.rope_type != "proportional") {
    return sub.Error("rope_type", Json(params.rope_type),
                     "\"default\" or \"proportional\" (other RoPE kinds are not implemented)");
  }
  if (params.rope_type == "proportional" && sub.Find("rope_theta") == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(keys.source(), ": ", sub.Name("rope_theta"),
                                                   " is missing; proportional RoPE needs it"));
  }
  RETURN_IF_ERROR(sub.Double("rope_theta", &params.rope_theta));
  RETURN_IF_ERROR(sub.Double("partial_rotary_factor", &params.partial_rotary_factor));
  RETURN_IF_ERROR(sub.Double("factor", &params.factor));
  if (params.rope_theta <= 0) {
    return sub.Error("rope_theta", Json(params.rope_theta), "a positive number");
  }
  if (params.partial_rotary_factor <= 0 || params.partial_rotary_factor > 1) {
    return sub.Error("partial_rotary_factor", Json(params.partial_rotary_factor),
                     "a number in (0, 1]");
  }
  if (params.factor <= 0) return sub.Error("factor", Json(params.factor), "a positive number");
  *out = std::move(params);
  return absl::OkStatus();
}

// The sparse per-layer overrides a config saved by transformers >= 5.2x carries instead of
// global_head_dim / num_global_key_value_heads: {"05": {"head_dim": 512, ...}, ...}. Only those
// two attributes on full-attention layers, equal on every such layer, are understood.
absl::Status ReadPerLayerConfig(const KeyReader& keys, ModelConfig* config) {
  const Json* per_layer = keys.Find("per_layer_config");
  if (per_layer == nullptr) return absl::OkStatus();
  if (!per_layer->is_object()) return keys.Error("per_layer_config", *per_layer, "an object");
  std::map<std::string, int64_t> seen;  // attribute -> value
  for (const auto& [layer_key, overrides] : per_layer->items()) {
    std::string where = absl::StrCat("per_layer_config.", layer_key);
    int64_t layer_idx = -1;
    bool numeric = !layer_key.empty() && layer_key.size() <= 9 &&
                   layer_key.find_first_not_of("0123456789") == std::string::npos;
    if (numeric) layer_idx = std::stoll(layer_key);
    if (!numeric || layer_idx >= config->num_hidden_layers) {
      return keys.Error(where, overrides,
                        absl::StrCat("a layer index below num_hidden_layers = ",
                                     config->num_hidden_layers, " as the key"));
    }
    if (config->layer_types[layer_idx] != LayerType::kFull) {
      return keys.Error(where, overrides,
                        "overrides on full_attention layers only (per-layer overrides of "
                        "sliding layers are not implemented)");
    }
    if (!overrides.is_object()) return keys.Error(where, overrides, "an object");
    KeyReader sub(overrides, keys.source(), keys.Name(absl::StrCat(where, ".")));
    for (const auto& [attribute, value] : overrides.items()) {
      if (attribute != "head_dim" && attribute != "num_key_value_heads") {
        return sub.Error(attribute, value,
                         "only head_dim or num_key_value_heads (other per-layer overrides are "
                         "not implemented)");
      }
      int64_t v = 0;
      RETURN_IF_ERROR(sub.ToInt(attribute, value, &v));
      RETURN_IF_ERROR(RequirePositive(sub, attribute, v));
      auto [it, inserted] = seen.emplace(attribute, v);
      if (!inserted && it->second != v) {
        return sub.Error(attribute, value,
                         absl::StrCat("the same value on every full_attention layer (another "
                                      "layer has ",
                                      it->second, ")"));
      }
    }
  }
  if (auto it = seen.find("head_dim"); it != seen.end()) config->global_head_dim = it->second;
  if (auto it = seen.find("num_key_value_heads"); it != seen.end()) {
    config->num_global_key_value_heads = it->second;
  }
  return absl::OkStatus();
}

absl::Status ReadTextConfig(const KeyReader& keys, ModelConfig* config) {
  ModelConfig& c = *config;
  std::string model_type;
  RETURN_IF_ERROR(keys.String("model_type", &model_type));
  if (!model_type.empty() && model_type != "gemma4_text") {
    return keys.Error("model_type", Json(model_type),
                      "\"gemma4_text\" (or a top-level \"text_config\" object)");
  }

  RETURN_IF_ERROR(keys.Int("vocab_size", &c.vocab_size));
  RETURN_IF_ERROR(keys.Int("hidden_size", &c.hidden_size));
  RETURN_IF_ERROR(keys.Int("intermediate_size", &c.intermediate_size));
  RETURN_IF_ERROR(keys.Int("num_hidden_layers", &c.num_hidden_layers));
  RETURN_IF_ERROR(keys.Int("num_attention_heads", &c.num_attention_heads));
  RETURN_IF_ERROR(keys.Int("num_key_value_heads", &c.num_key_value_heads));
  RETURN_IF_ERROR(keys.Int("num_global_key_value_heads", &c.num_global_key_value_heads));
  RETURN_IF_ERROR(keys.Int("head_dim", &c.head_dim));
  RETURN_IF_ERROR(keys.Int("global_head_dim", &c.global_head_dim));
  RETURN_IF_ERROR(keys.Bool("attention_k_eq_v", &c.attention_k_eq_v));
  RETURN_IF_ERROR(keys.Bool("enable_moe_block", &c.enable_moe_block));
  RETURN_IF_ERROR(keys.Int("num_experts", &c.num_experts));
  RETURN_IF_ERROR(keys.Int("top_k_experts", &c.top_k_experts));
  RETURN_IF_ERROR(keys.Int("moe_intermediate_size", &c.moe_intermediate_size));
  RETURN_IF_ERROR(keys.Int("sliding_window", &c.sliding_window));
  RETURN_IF_ERROR(keys.Double("rms_norm_eps", &c.rms_norm_eps));
  RETURN_IF_ERROR(keys.Double("final_logit_softcapping", &c.final_logit_softcapping));
  RETURN_IF_ERROR(keys.String("hidden_activation", &c.hidden_activation));
  RETURN_IF_ERROR(keys.Bool("tie_word_embeddings", &c.tie_word_embeddings));
  RETURN_IF_ERROR(keys.Int("max_position_embeddings", &c.max_position_embeddings));
  RETURN_IF_ERROR(keys.Int("hidden_size_per_layer_input", &c.hidden_size_per_layer_input));
  RETURN_IF_ERROR(keys.Int("num_kv_shared_layers", &c.num_kv_shared_layers));
  RETURN_IF_ERROR(keys.Bool("use_double_wide_mlp", &c.use_double_wide_mlp));
  RETURN_IF_ERROR(keys.Bool("attention_bias", &c.attention_bias));
  RETURN_IF_ERROR(keys.Int("pad_token_id", &c.pad_token_id));
  RETURN_IF_ERROR(keys.Int("bos_token_id", &c.bos_token_id));
  RETURN_IF_ERROR(keys.IntList("eos_token_id", &c.eos_token_ids).status());

  // Sizes.
  RETURN_IF_ERROR(RequirePositive(keys, "vocab_size", c.vocab_size));
  RETURN_IF_ERROR(RequirePositive(keys, "hidden_size", c.hidden_size));
  RETURN_IF_ERROR(RequirePositive(keys, "intermediate_size", c.intermediate_size));
  RETURN_IF_ERROR(RequirePositive(keys, "num_hidden_layers", c.num_hidden_layers));
  RETURN_IF_ERROR(RequirePositive(keys, "num_attention_heads", c.num_attention_heads));
  RETURN_IF_ERROR(RequirePositive(keys, "num_key_value_heads", c.num_key_value_heads));
  RETURN_IF_ERROR(RequirePositive(keys, "head_dim", c.head_dim));
  RETURN_IF_ERROR(RequirePositive(keys, "global_head_dim", c.global_head_dim));
  RETURN_IF_ERROR(RequirePositive(keys, "max_position_embeddings", c.max_position_embeddings));
  if (c.num_global_key_value_heads < 0) {
    return keys.Error("num_global_key_value_heads", Json(c.num_global_key_value_heads),
                      "a positive integer, or 0/null for num_key_value_heads");
  }
  if (c.sliding_window <= 0) {
    return keys.Error("sliding_window", Json(c.sliding_window), "a positive integer");
  }
  if (c.rms_norm_eps <= 0) {
    return keys.Error("rms_norm_eps", Json(c.rms_norm_eps), "a positive number");
  }
  if (c.final_logit_softcapping < 0) {
    return keys.Error("final_logit_softcapping", Json(c.final_logit_softcapping),
                      "a positive number, or 0/null for none");
  }
  if (c.hidden_activation != "gelu_pytorch_tanh") {
    return keys.Error("hidden_activation", Json(c.hidden_activation),
                      "\"gelu_pytorch_tanh\" (the only activation implemented)");
  }

  // Features the 31B and 26B-A4B checkpoints do not use and this engine does not implement.
  if (c.hidden_size_per_layer_input != 0) {
    return keys.Error(
        "hidden_size_per_layer_input", Json(c.hidden_size_per_layer_input),
        "0: per-layer embeddings (PLE, the E2B/E4B models) are not implemented; set "
        "hidden_size_per_layer_input to 0 (a missing key means the Gemma4TextConfig default 256)");
  }
  if (c.num_kv_shared_layers != 0) {
    return keys.Error("num_kv_shared_layers", Json(c.num_kv_shared_layers),
                      "0: KV sharing across layers is not implemented (31B and 26B-A4B use 0)");
  }
  if (c.use_double_wide_mlp) {
    return keys.Error("use_double_wide_mlp", Json(true),
                      "false: the double-wide MLP is not implemented (31B and 26B-A4B use false)");
  }
  if (c.attention_bias) {
    return keys.Error("attention_bias", Json(true),
                      "false: attention biases are not implemented (31B and 26B-A4B use false)");
  }
  std::string bidirectional;
  RETURN_IF_ERROR(keys.String("use_bidirectional_attention", &bidirectional));
  if (!bidirectional.empty() && bidirectional != "vision") {
    return keys.Error("use_bidirectional_attention", Json(bidirectional),
                      "null or \"vision\" (bidirectional text attention is not implemented)");
  }

  // Heads.
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return keys.Error("num_key_value_heads", Json(c.num_key_value_heads),
                      absl::StrCat("a divisor of num_attention_heads = ", c.num_attention_heads));
  }

  // MoE.
  if (c.enable_moe_block) {
    RETURN_IF_ERROR(RequirePositive(keys, "num_experts", c.num_experts));
    RETURN_IF_ERROR(RequirePositive(keys, "top_k_experts", c.top_k_experts));
    RETURN_IF_ERROR(RequirePositive(keys, "moe_intermediate_size", c.moe_intermediate_size));
    if (c.top_k_experts > c.num_experts) {
      return keys.Error("top_k_experts", Json(c.top_k_experts),
                        absl::StrCat("at most num_experts = ", c.num_experts));
    }
  }

  // Layer types: given, or HF's default of five sliding layers then one full.
  c.layer_types.clear();
  if (const Json* types = keys.Find("layer_types"); types != nullptr) {
    if (!types->is_array()) return keys.Error("layer_types", *types, "a list of strings");
    if (static_cast<int64_t>(types->size()) != c.num_hidden_layers) {
      return keys.Error("layer_types", *types,
                        absl::StrCat("a list of num_hidden_layers = ", c.num_hidden_layers,
                                     " entries (it has ", types->size(), ")"));
    }
    for (size_t i = 0; i < types->size(); ++i) {
      const Json& type = (*types)[i];
      std::string key = absl::StrCat("layer_types[", i, "]");
      if (type.is_string() && type.get<std::string>() == kSliding) {
        c.layer_types.push_back(LayerType::kSliding);
      } else if (type.is_string() && type.get<std::string>() == kFull) {
        c.layer_types.push_back(LayerType::kFull);
      } else {
        return keys.Error(key, type, "\"sliding_attention\" or \"full_attention\"");
      }
    }
  } else {
    if (c.num_hidden_layers > (int64_t{1} << 20)) {
      return keys.Error("num_hidden_layers", Json(c.num_hidden_layers), "at most 1048576");
    }
    constexpr int64_t kSlidingWindowPattern = 6;  // Gemma4TextConfig: 5 sliding : 1 full
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
      c.layer_types.push_back((i + 1) % kSlidingWindowPattern != 0 ? LayerType::kSliding
                                                                   : LayerType::kFull);
    }
  }
  if (c.layer_types.back() != LayerType::kFull) {
    VLOG(1) << keys.source() << ": forcing the last layer to full_attention, as HF does";
    c.layer_types.back() = LayerType::kFull;
  }

  // HF uses num_global_key_value_heads only on full layers that derive V from K; an explicit
  // per_layer_config override applies regardless.
  if (!c.attention_k_eq_v) c.num_global_key_value_heads = 0;
  RETURN_IF_ERROR(ReadPerLayerConfig(keys, &c));
  if (c.num_global_key_value_heads > 0 && c.num_attention_heads % c.num_global_key_value_heads) {
    return keys.Error("num_global_key_value_heads", Json(c.num_global_key_value_heads),
                      absl::StrCat("a divisor of num_attention_heads = ", c.num_attention_heads));
  }

  // RoPE per layer type.
  c.rope_sliding = RopeParams();
  c.rope_full = ModelConfig().rope_full;
  if (const Json* rope = keys.Find("rope_parameters"); rope != nullptr) {
    if (!rope->is_object()) {
      return keys.Error("rope_parameters", *rope,
                        "an object with \"sliding_attention\" and \"full_attention\" entries");
    }
    bool has_sliding = false;
    for (LayerType type : c.layer_types) has_sliding |= type == LayerType::kSliding;
    for (auto [name, params, needed] : {std::tuple(kSliding, &c.rope_sliding, has_sliding),
                                        std::tuple(kFull, &c.rope_full, true)}) {
      auto it = rope->find(std::string(name));
      if (it == rope->end()) {
        if (!needed) continue;
        return keys.Error("rope_parameters", *rope,
                          absl::StrCat("an object with a \"", name, "\" entry"));
      }
      RETURN_IF_ERROR(ReadRope(keys, *it, name, params));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text,
                                             std::string_view source_name) {
  // Debian's Abseil has its own string_view, distinct from std::string_view.
  const absl::string_view source(source_name.data(), source_name.size());
  ASSIGN_OR_RETURN(Json root, ParseJson(absl::string_view(json_text.data(), json_text.size()),
                                         source));
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": the top level is ", root.type_name(), ", expected a JSON object"));
  }

  ModelConfig config;
  KeyReader top(root, source, "");
  if (const Json* archs = top.Find("architectures"); archs != nullptr) {
    if (!archs->is_array() || (!archs->empty() && !(*archs)[0].is_string())) {
      return top.Error("architectures", *archs, "a list of strings");
    }
    if (!archs->empty()) config.architecture = (*archs)[0].get<std::string>();
  }

  const Json* text_config = top.Find("text_config");
  if (text_config != nullptr) {
    if (!text_config->is_object()) return top.Error("text_config", *text_config, "an object");
    if (config.architecture.empty()) config.architecture = "Gemma4ForConditionalGeneration";
    config.tensor_prefix = "model.language_model.";
    RETURN_IF_ERROR(ReadTextConfig(KeyReader(*text_config, source, "text_config."), &config));
    // The top-level eos_token_id (the IT models' [1, 106]) wins over text_config's.
    RETURN_IF_ERROR(top.IntList("eos_token_id", &config.eos_token_ids).status());
  } else {
    if (config.architecture.empty()) config.architecture = "Gemma4ForCausalLM";
    config.tensor_prefix = "model.";
    RETURN_IF_ERROR(ReadTextConfig(top, &config));
  }
  if (config.eos_token_ids.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": eos_token_id is an empty list; expected at least one token id"));
  }
  return config;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  std::filesystem::path path = std::filesystem::path(model_dir) / "config.json";
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    return absl::NotFoundError(absl::StrCat("model config ", path.string(), " not found"));
  }
  if (!std::filesystem::is_regular_file(path, ec)) {
    return absl::InvalidArgumentError(
        absl::StrCat("model config ", path.string(), " is not a regular file"));
  }
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  if (!in.good() && !in.eof()) {
    return absl::UnavailableError(absl::StrCat("cannot read model config ", path.string()));
  }
  return ParseModelConfig(text.str(), path.string());
}

}  // namespace gemma
