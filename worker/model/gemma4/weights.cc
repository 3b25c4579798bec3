#include "worker/model/gemma4/weights.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace gemma::gemma4 {
namespace {

class Loader {
 public:
  Loader(const ModelConfig& config, const Checkpoint& checkpoint, Backend& backend)
      : config_(config), checkpoint_(checkpoint), backend_(backend) {}

  absl::StatusOr<BufferPtr> Load(const std::string& name, const std::vector<int64_t>& shape) {
    ASSIGN_OR_RETURN(TensorView view,
                     checkpoint_.GetWithShape(config_.tensor_prefix + name, shape));
    RETURN_IF_ERROR(CheckFloat(view));
    return backend_.UploadWeight(view.dtype, view.data, view.NumElements());
  }

  // Several tensors of one dtype concatenated along their first axis.
  absl::StatusOr<BufferPtr> LoadConcat(const std::vector<std::string>& names,
                                       const std::vector<int64_t>& shape) {
    std::vector<TensorView> views;
    for (const auto& name : names) {
      ASSIGN_OR_RETURN(TensorView view,
                       checkpoint_.GetWithShape(config_.tensor_prefix + name, shape));
      RETURN_IF_ERROR(CheckFloat(view));
      if (!views.empty() && view.dtype != views.front().dtype) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tensor '", view.name, "' in ", view.file, " has dtype ", DTypeName(view.dtype),
            " but '", views.front().name, "' has ", DTypeName(views.front().dtype)));
      }
      views.push_back(view);
    }
    std::vector<uint8_t> joined;
    for (const auto& view : views) joined.insert(joined.end(), view.data, view.data + view.num_bytes);
    int64_t numel = 0;
    for (const auto& view : views) numel += view.NumElements();
    return backend_.UploadWeight(views.front().dtype, joined.data(), numel);
  }

 private:
  static absl::Status CheckFloat(const TensorView& view) {
    if (view.dtype == DType::kF32 || view.dtype == DType::kBF16 || view.dtype == DType::kF16) {
      return absl::OkStatus();
    }
    return absl::InvalidArgumentError(absl::StrCat("tensor '", view.name, "' in ", view.file,
                                                   " has dtype ", DTypeName(view.dtype),
                                                   "; weights must be F32, BF16 or F16"));
  }

  const ModelConfig& config_;
  const Checkpoint& checkpoint_;
  Backend& backend_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Weights>> LoadWeights(const ModelConfig& config,
                                                     const Checkpoint& checkpoint,
                                                     Backend& backend) {
  Loader loader(config, checkpoint, backend);
  auto w = std::make_unique<Weights>();
  const int64_t hidden = config.hidden_size;
  const int64_t vocab = config.vocab_size;
  ASSIGN_OR_RETURN(w->embed_tokens, loader.Load("embed_tokens.weight", {vocab, hidden}));
  ASSIGN_OR_RETURN(w->final_norm, loader.Load("norm.weight", {hidden}));
  if (!config.tie_word_embeddings) {
    ASSIGN_OR_RETURN(TensorView head, checkpoint.GetWithShape("lm_head.weight", {vocab, hidden}));
    ASSIGN_OR_RETURN(w->lm_head, backend.UploadWeight(head.dtype, head.data, head.NumElements()));
  }
  w->layers.resize(config.num_hidden_layers);
  for (int l = 0; l < config.num_hidden_layers; ++l) {
    LayerWeights& lw = w->layers[l];
    const std::string p = absl::StrCat("layers.", l, ".");
    const int64_t d = config.LayerHeadDim(l);
    const int64_t heads = config.num_attention_heads;
    const int64_t kv_heads = config.LayerKvHeads(l);
    ASSIGN_OR_RETURN(lw.input_layernorm, loader.Load(p + "input_layernorm.weight", {hidden}));
    ASSIGN_OR_RETURN(lw.q_proj, loader.Load(p + "self_attn.q_proj.weight", {heads * d, hidden}));
    ASSIGN_OR_RETURN(lw.k_proj,
                     loader.Load(p + "self_attn.k_proj.weight", {kv_heads * d, hidden}));
    if (!config.LayerKEqV(l)) {
      ASSIGN_OR_RETURN(lw.v_proj,
                       loader.Load(p + "self_attn.v_proj.weight", {kv_heads * d, hidden}));
    }
    ASSIGN_OR_RETURN(lw.o_proj, loader.Load(p + "self_attn.o_proj.weight", {hidden, heads * d}));
    ASSIGN_OR_RETURN(lw.q_norm, loader.Load(p + "self_attn.q_norm.weight", {d}));
    ASSIGN_OR_RETURN(lw.k_norm, loader.Load(p + "self_attn.k_norm.weight", {d}));
    ASSIGN_OR_RETURN(lw.post_attention_layernorm,
                     loader.Load(p + "post_attention_layernorm.weight", {hidden}));
    ASSIGN_OR_RETURN(lw.pre_feedforward_layernorm,
                     loader.Load(p + "pre_feedforward_layernorm.weight", {hidden}));
    const int64_t inter = config.intermediate_size;
    ASSIGN_OR_RETURN(lw.mlp_gate_up,
                     loader.LoadConcat({p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"},
                                       {inter, hidden}));
    ASSIGN_OR_RETURN(lw.mlp_down, loader.Load(p + "mlp.down_proj.weight", {hidden, inter}));
    ASSIGN_OR_RETURN(lw.post_feedforward_layernorm,
                     loader.Load(p + "post_feedforward_layernorm.weight", {hidden}));
    ASSIGN_OR_RETURN(lw.layer_scalar, loader.Load(p + "layer_scalar", {1}));
    if (config.enable_moe_block) {
      const int64_t experts = config.num_experts;
      const int64_t moe_inter = config.moe_intermediate_size;
      ASSIGN_OR_RETURN(lw.router_proj, loader.Load(p + "router.proj.weight", {experts, hidden}));
      ASSIGN_OR_RETURN(lw.router_scale, loader.Load(p + "router.scale", {hidden}));
      ASSIGN_OR_RETURN(lw.per_expert_scale, loader.Load(p + "router.per_expert_scale", {experts}));
      ASSIGN_OR_RETURN(lw.experts_gate_up,
                       loader.Load(p + "experts.gate_up_proj", {experts, 2 * moe_inter, hidden}));
      ASSIGN_OR_RETURN(lw.experts_down,
                       loader.Load(p + "experts.down_proj", {experts, hidden, moe_inter}));
      ASSIGN_OR_RETURN(lw.pre_feedforward_layernorm_2,
                       loader.Load(p + "pre_feedforward_layernorm_2.weight", {hidden}));
      ASSIGN_OR_RETURN(lw.post_feedforward_layernorm_1,
                       loader.Load(p + "post_feedforward_layernorm_1.weight", {hidden}));
      ASSIGN_OR_RETURN(lw.post_feedforward_layernorm_2,
                       loader.Load(p + "post_feedforward_layernorm_2.weight", {hidden}));
    }
  }
  return w;
}

}  // namespace gemma::gemma4
