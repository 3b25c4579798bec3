#include "worker/model/gemma4/sharding.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace gemma::gemma4 {

ShardSpec ShardSpecFor(const std::string& name) {
  struct Rule {
    const char* suffix;
    ShardSpec spec;
  };
  // The table. Norms, layer_scalar and the router are replicated (every rank routes every token
  // in tp mode, so routing must be identical everywhere).
  static const Rule kRules[] = {
      {"embed_tokens.weight", {ShardKind::kSplitRows, ShardDim::kVocab}},
      {"lm_head.weight", {ShardKind::kSplitRows, ShardDim::kVocab}},
      {"self_attn.q_proj.weight", {ShardKind::kSplitRows, ShardDim::kQueryHeads}},
      {"self_attn.k_proj.weight", {ShardKind::kSplitRows, ShardDim::kKvHeads}},
      {"self_attn.v_proj.weight", {ShardKind::kSplitRows, ShardDim::kKvHeads}},
      {"self_attn.o_proj.weight", {ShardKind::kSplitCols, ShardDim::kQueryHeads}},
      {"mlp.gate_proj.weight", {ShardKind::kSplitRows, ShardDim::kIntermediate}},
      {"mlp.up_proj.weight", {ShardKind::kSplitRows, ShardDim::kIntermediate}},
      {"mlp.down_proj.weight", {ShardKind::kSplitCols, ShardDim::kIntermediate}},
      {"experts.gate_up_proj", {ShardKind::kExpertOwned, ShardDim::kExperts}},
      {"experts.down_proj", {ShardKind::kExpertOwned, ShardDim::kExperts}},
  };
  for (const Rule& rule : kRules) {
    if (absl::EndsWith(name, rule.suffix)) return rule.spec;
  }
  return {};
}

int64_t LocalDims::RangeBegin(ShardDim dim, int layer_idx) const {
  const LocalLayerDims& l = layers[layer_idx < 0 ? 0 : layer_idx];
  switch (dim) {
    case ShardDim::kQueryHeads:
      return l.q_head_offset * l.head_dim;
    case ShardDim::kKvHeads:
      return l.kv_head_offset * l.head_dim;
    case ShardDim::kIntermediate:
      return l.inter_offset;
    case ShardDim::kExperts:
      return expert_offset;
    case ShardDim::kVocab:
      return vocab_offset;
    case ShardDim::kNone:
      return 0;
  }
  return 0;
}

int64_t LocalDims::RangeSize(ShardDim dim, int layer_idx) const {
  const LocalLayerDims& l = layers[layer_idx < 0 ? 0 : layer_idx];
  switch (dim) {
    case ShardDim::kQueryHeads:
      return l.q_heads * l.head_dim;
    case ShardDim::kKvHeads:
      return l.kv_heads * l.head_dim;
    case ShardDim::kIntermediate:
      return l.inter;
    case ShardDim::kExperts:
      return experts;
    case ShardDim::kVocab:
      return vocab;
    case ShardDim::kNone:
      return 0;
  }
  return 0;
}

namespace {
absl::Status NotDivisible(const char* what, int64_t value, const char* by, int ranks) {
  return absl::InvalidArgumentError(absl::StrCat(what, " = ", value, " cannot be split over ", by,
                                                 " = ", ranks, " ranks: it must divide evenly"));
}
}  // namespace

absl::StatusOr<LocalDims> ComputeLocalDims(const ModelConfig& c, const ShardLayout& s) {
  if (s.tp_size <= 0 || s.tp_rank < 0 || s.tp_rank >= s.tp_size || s.ep_size <= 0 ||
      s.ep_rank < 0 || s.ep_rank >= s.ep_size) {
    return absl::InvalidArgumentError(absl::StrCat("bad shard layout: tp rank ", s.tp_rank, " of ",
                                                   s.tp_size, ", ep rank ", s.ep_rank, " of ",
                                                   s.ep_size));
  }
  const int tp = s.tp_size;
  LocalDims d;
  if (c.num_attention_heads % tp != 0) {
    return NotDivisible("num_attention_heads", c.num_attention_heads, "tp", tp);
  }
  if (c.intermediate_size % tp != 0) return NotDivisible("intermediate_size", c.intermediate_size, "tp", tp);
  if (c.vocab_size % tp != 0) return NotDivisible("vocab_size", c.vocab_size, "tp", tp);
  d.layers.resize(c.num_hidden_layers);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    LocalLayerDims& ld = d.layers[l];
    ld.head_dim = c.LayerHeadDim(l);
    ld.q_heads = c.num_attention_heads / tp;
    ld.q_head_offset = ld.q_heads * s.tp_rank;
    const int64_t kv = c.LayerKvHeads(l);
    if (kv >= tp) {
      if (kv % tp != 0) {
        return NotDivisible(c.IsFull(l) ? "num_global_key_value_heads" : "num_key_value_heads", kv,
                            "tp", tp);
      }
      ld.kv_heads = kv / tp;
      ld.kv_head_offset = ld.kv_heads * s.tp_rank;
    } else {
      // More ranks than KV heads: each rank holds the one KV head its query heads use.
      if (tp % kv != 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tp = ", tp, " must be a multiple of the ", kv, " KV heads of layer ", l,
            " to replicate them"));
      }
      ld.kv_heads = 1;
      ld.kv_head_offset = s.tp_rank / (tp / kv);
    }
    ld.inter = c.intermediate_size / tp;
    ld.inter_offset = ld.inter * s.tp_rank;
  }
  if (c.enable_moe_block) {
    if (c.num_experts % s.ep_size != 0) {
      return NotDivisible("num_experts", c.num_experts, "ep", s.ep_size);
    }
    d.experts = c.num_experts / s.ep_size;
    d.expert_offset = d.experts * s.ep_rank;
  }
  d.vocab = c.vocab_size / tp;
  d.vocab_offset = d.vocab * s.tp_rank;
  return d;
}

}  // namespace gemma::gemma4
