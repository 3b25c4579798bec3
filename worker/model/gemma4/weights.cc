#include "worker/model/gemma4/weights.h"

#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace gemma::gemma4 {
namespace {

// This rank's bytes of one tensor.
struct Slice {
  DType dtype = DType::kF32;
  int64_t numel = 0;
  std::vector<uint8_t> gathered;    // used when the slice is not contiguous in the file
  const uint8_t* data = nullptr;    // the slice's bytes (into the mapping or `gathered`)
};

absl::Status CheckFloat(const TensorView& view) {
  if (view.dtype == DType::kF32 || view.dtype == DType::kBF16 || view.dtype == DType::kF16) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat("tensor '", view.name, "' in ", view.file,
                                                 " has dtype ", DTypeName(view.dtype),
                                                 "; weights must be F32, BF16 or F16"));
}

class Loader {
 public:
  Loader(const ModelConfig& config, const Checkpoint& checkpoint, const LocalDims& dims,
         Backend& backend)
      : config_(config), checkpoint_(checkpoint), dims_(dims), backend_(backend) {}

  // `name` below the prefix; `shape` the whole tensor's shape; `layer_idx` for per-layer dims.
  absl::StatusOr<BufferPtr> Load(const std::string& name, const std::vector<int64_t>& shape,
                                 int layer_idx = -1) {
    ASSIGN_OR_RETURN(Slice slice, Read(name, shape, layer_idx));
    return backend_.UploadWeight(slice.dtype, slice.data, slice.numel);
  }

  // Several tensors of one dtype (each sliced) concatenated along their first axis.
  absl::StatusOr<BufferPtr> LoadConcat(const std::vector<std::string>& names,
                                       const std::vector<int64_t>& shape, int layer_idx) {
    std::vector<uint8_t> joined;
    int64_t numel = 0;
    DType dtype = DType::kF32;
    for (size_t i = 0; i < names.size(); ++i) {
      ASSIGN_OR_RETURN(Slice slice, Read(names[i], shape, layer_idx));
      if (i > 0 && slice.dtype != dtype) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tensor '", config_.tensor_prefix, names[i], "' has dtype ", DTypeName(slice.dtype),
            " but '", config_.tensor_prefix, names[0], "' has ", DTypeName(dtype)));
      }
      dtype = slice.dtype;
      joined.insert(joined.end(), slice.data, slice.data + slice.numel * DTypeSize(dtype));
      numel += slice.numel;
    }
    return backend_.UploadWeight(dtype, joined.data(), numel);
  }

 private:
  absl::StatusOr<Slice> Read(const std::string& name, const std::vector<int64_t>& shape,
                             int layer_idx) {
    ASSIGN_OR_RETURN(TensorView view,
                     checkpoint_.GetWithShape(config_.tensor_prefix + name, shape));
    RETURN_IF_ERROR(CheckFloat(view));
    Slice slice;
    slice.dtype = view.dtype;
    const ShardSpec spec = ShardSpecFor(name);
    const size_t elem = DTypeSize(view.dtype);
    if (spec.kind == ShardKind::kReplicated) {
      slice.numel = view.NumElements();
      slice.data = view.data;
      return slice;
    }
    const int64_t begin = dims_.RangeBegin(spec.dim, layer_idx);
    const int64_t size = dims_.RangeSize(spec.dim, layer_idx);
    if (spec.kind == ShardKind::kSplitCols) {
      // [rows, cols] -> [rows, size]: a strided gather touching only the slice's pages.
      const int64_t rows = shape[0], cols = shape[1];
      slice.numel = rows * size;
      slice.gathered.resize(slice.numel * elem);
      for (int64_t r = 0; r < rows; ++r) {
        std::memcpy(slice.gathered.data() + r * size * elem, view.data + (r * cols + begin) * elem,
                    size * elem);
      }
      slice.data = slice.gathered.data();
      return slice;
    }
    // Split along axis 0 (rows of a projection, or whole experts): contiguous.
    int64_t inner = 1;
    for (size_t i = 1; i < shape.size(); ++i) inner *= shape[i];
    slice.numel = size * inner;
    slice.data = view.data + begin * inner * elem;
    return slice;
  }

  const ModelConfig& config_;
  const Checkpoint& checkpoint_;
  const LocalDims& dims_;
  Backend& backend_;
};

}  // namespace

absl::StatusOr<ExpertSlotWeights> LoadExpertSlots(const ModelConfig& config,
                                                  const Checkpoint& checkpoint, int layer_idx,
                                                  std::span<const int32_t> experts,
                                                  Backend& backend) {
  const int64_t e_count = config.num_experts, hidden = config.hidden_size,
                inter = config.moe_intermediate_size;
  const std::string p = absl::StrCat(config.tensor_prefix, "layers.", layer_idx, ".");
  ExpertSlotWeights out;
  struct Part {
    const char* name;
    int64_t rows, cols;
    BufferPtr* target;
  };
  for (const Part& part : {Part{"experts.gate_up_proj", 2 * inter, hidden, &out.gate_up},
                           Part{"experts.down_proj", hidden, inter, &out.down}}) {
    const auto& [name, rows, cols, target] = part;
    ASSIGN_OR_RETURN(TensorView view, checkpoint.GetWithShape(p + name, {e_count, rows, cols}));
    RETURN_IF_ERROR(CheckFloat(view));
    const size_t expert_bytes = static_cast<size_t>(rows * cols) * DTypeSize(view.dtype);
    std::vector<uint8_t> joined(expert_bytes * experts.size());
    for (size_t s = 0; s < experts.size(); ++s) {
      if (experts[s] < 0 || experts[s] >= e_count) {
        return absl::InvalidArgumentError(absl::StrCat("expert slot ", s, " of layer ", layer_idx,
                                                       " names expert ", experts[s], " of ",
                                                       e_count));
      }
      std::memcpy(joined.data() + s * expert_bytes, view.data + experts[s] * expert_bytes,
                  expert_bytes);
    }
    ASSIGN_OR_RETURN(*target, backend.UploadWeight(view.dtype, joined.data(),
                                                   static_cast<int64_t>(experts.size()) * rows * cols));
  }
  return out;
}

absl::StatusOr<std::unique_ptr<Weights>> LoadWeights(const ModelConfig& config,
                                                     const Checkpoint& checkpoint,
                                                     const LocalDims& dims, Backend& backend) {
  Loader loader(config, checkpoint, dims, backend);
  auto w = std::make_unique<Weights>();
  const int64_t hidden = config.hidden_size;
  const int64_t vocab = config.vocab_size;
  ASSIGN_OR_RETURN(w->embed_tokens, loader.Load("embed_tokens.weight", {vocab, hidden}));
  ASSIGN_OR_RETURN(w->final_norm, loader.Load("norm.weight", {hidden}));
  if (!config.tie_word_embeddings) {
    // lm_head sits outside the decoder prefix; read it through a loader with an empty prefix.
    ModelConfig top = config;
    top.tensor_prefix = "";
    Loader head_loader(top, checkpoint, dims, backend);
    ASSIGN_OR_RETURN(w->lm_head, head_loader.Load("lm_head.weight", {vocab, hidden}));
  }
  w->layers.resize(config.num_hidden_layers);
  for (int l = 0; l < config.num_hidden_layers; ++l) {
    LayerWeights& lw = w->layers[l];
    const std::string p = absl::StrCat("layers.", l, ".");
    const int64_t d = config.LayerHeadDim(l);
    const int64_t heads = config.num_attention_heads;
    const int64_t kv_heads = config.LayerKvHeads(l);
    ASSIGN_OR_RETURN(lw.input_layernorm, loader.Load(p + "input_layernorm.weight", {hidden}));
    ASSIGN_OR_RETURN(lw.q_proj, loader.Load(p + "self_attn.q_proj.weight", {heads * d, hidden}, l));
    ASSIGN_OR_RETURN(lw.k_proj,
                     loader.Load(p + "self_attn.k_proj.weight", {kv_heads * d, hidden}, l));
    if (!config.LayerKEqV(l)) {
      ASSIGN_OR_RETURN(lw.v_proj,
                       loader.Load(p + "self_attn.v_proj.weight", {kv_heads * d, hidden}, l));
    }
    ASSIGN_OR_RETURN(lw.o_proj, loader.Load(p + "self_attn.o_proj.weight", {hidden, heads * d}, l));
    ASSIGN_OR_RETURN(lw.q_norm, loader.Load(p + "self_attn.q_norm.weight", {d}));
    ASSIGN_OR_RETURN(lw.k_norm, loader.Load(p + "self_attn.k_norm.weight", {d}));
    ASSIGN_OR_RETURN(lw.post_attention_layernorm,
                     loader.Load(p + "post_attention_layernorm.weight", {hidden}));
    ASSIGN_OR_RETURN(lw.pre_feedforward_layernorm,
                     loader.Load(p + "pre_feedforward_layernorm.weight", {hidden}));
    const int64_t inter = config.intermediate_size;
    ASSIGN_OR_RETURN(lw.mlp_gate_up,
                     loader.LoadConcat({p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"},
                                       {inter, hidden}, l));
    ASSIGN_OR_RETURN(lw.mlp_down, loader.Load(p + "mlp.down_proj.weight", {hidden, inter}, l));
    ASSIGN_OR_RETURN(lw.post_feedforward_layernorm,
                     loader.Load(p + "post_feedforward_layernorm.weight", {hidden}));
    ASSIGN_OR_RETURN(lw.layer_scalar, loader.Load(p + "layer_scalar", {1}));
    if (config.enable_moe_block) {
      const int64_t experts = config.num_experts;
      const int64_t moe_inter = config.moe_intermediate_size;
      ASSIGN_OR_RETURN(lw.router_proj, loader.Load(p + "router.proj.weight", {experts, hidden}));
      ASSIGN_OR_RETURN(lw.router_scale, loader.Load(p + "router.scale", {hidden}));
      ASSIGN_OR_RETURN(lw.per_expert_scale, loader.Load(p + "router.per_expert_scale", {experts}));
      // The experts themselves are loaded per placement (LoadExpertSlots); check them here.
      for (const auto& [name, shape] :
           {std::pair<const char*, std::vector<int64_t>>{"experts.gate_up_proj",
                                                         {experts, 2 * moe_inter, hidden}},
            {"experts.down_proj", {experts, hidden, moe_inter}}}) {
        ASSIGN_OR_RETURN(TensorView view,
                         checkpoint.GetWithShape(config.tensor_prefix + p + name, shape));
        RETURN_IF_ERROR(CheckFloat(view));
      }
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
