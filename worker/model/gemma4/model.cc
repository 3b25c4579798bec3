#include "worker/model/gemma4/model.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "glog/logging.h"

namespace gemma::gemma4 {
namespace {

// Host-side metadata of one step, kept alive until the step's work has been enqueued.
struct StepHost {
  std::vector<int32_t> token_ids, positions, rows;
  std::vector<int32_t> page_tables[2], slots[2];
};

absl::StatusOr<BufferPtr> AllocI32(Backend& backend, const std::vector<int32_t>& host) {
  ASSIGN_OR_RETURN(BufferPtr buf, backend.Alloc(DType::kI32, std::max<size_t>(host.size(), 1)));
  if (!host.empty()) backend.Write(*buf, host.data(), host.size() * sizeof(int32_t));
  return buf;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& model_dir,
                                                   Backend& backend) {
  ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(model_dir));
  ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> checkpoint, Checkpoint::Open(model_dir));
  return Create(config, *checkpoint, backend);
}

absl::StatusOr<std::unique_ptr<Model>> Model::Create(const ModelConfig& config,
                                                     const Checkpoint& checkpoint,
                                                     Backend& backend) {
  std::unique_ptr<Model> model(new Model(config, backend));
  ASSIGN_OR_RETURN(model->weights_, LoadWeights(config, checkpoint, backend));
  RETURN_IF_ERROR(backend.Synchronize());
  return model;
}

absl::Status Model::EnsureScratch(int64_t num_tokens, int64_t num_rows) {
  const ModelConfig& c = config_;
  if (num_tokens > scratch_tokens_) {
    const int64_t t = std::max<int64_t>(num_tokens, 16);
    const int64_t h = c.hidden_size;
    const int64_t max_d = std::max(c.head_dim, c.global_head_dim);
    const int64_t max_kv =
        std::max(c.num_key_value_heads, std::max<int64_t>(c.num_global_key_value_heads, 1));
    const int64_t max_inter = std::max(c.intermediate_size, c.moe_intermediate_size);
    auto alloc = [&](BufferPtr& b, DType dtype, int64_t n) -> absl::Status {
      ASSIGN_OR_RETURN(b, backend_.Alloc(dtype, n));
      return absl::OkStatus();
    };
    RETURN_IF_ERROR(alloc(hidden_, DType::kF32, t * h));
    RETURN_IF_ERROR(alloc(normed_, DType::kF32, t * h));
    RETURN_IF_ERROR(alloc(q_, DType::kF32, t * c.num_attention_heads * max_d));
    RETURN_IF_ERROR(alloc(k_, DType::kF32, t * max_kv * max_d));
    RETURN_IF_ERROR(alloc(v_, DType::kF32, t * max_kv * max_d));
    RETURN_IF_ERROR(alloc(attn_, DType::kF32, t * c.num_attention_heads * max_d));
    RETURN_IF_ERROR(alloc(proj_, DType::kF32, t * h));
    RETURN_IF_ERROR(alloc(gate_up_, DType::kF32, t * 2 * max_inter));
    RETURN_IF_ERROR(alloc(act_, DType::kF32, t * max_inter));
    RETURN_IF_ERROR(alloc(mlp_out_, DType::kF32, t * h));
    if (c.enable_moe_block) {
      RETURN_IF_ERROR(alloc(moe_in_, DType::kF32, t * h));
      RETURN_IF_ERROR(alloc(moe_out_, DType::kF32, t * h));
      RETURN_IF_ERROR(alloc(topk_ids_, DType::kI32, t * c.top_k_experts));
      RETURN_IF_ERROR(alloc(topk_weights_, DType::kF32, t * c.top_k_experts));
    }
    scratch_tokens_ = t;
  }
  if (num_rows > scratch_rows_) {
    const int64_t r = std::max<int64_t>(num_rows, 4);
    ASSIGN_OR_RETURN(row_hidden_, backend_.Alloc(DType::kF32, r * c.hidden_size));
    ASSIGN_OR_RETURN(logits_, backend_.Alloc(DType::kF32, r * c.vocab_size));
    scratch_rows_ = r;
  }
  return absl::OkStatus();
}

void Model::Observe(std::string_view name, const Buffer& buffer, std::vector<int64_t> shape) {
  if (observer_) observer_(name, buffer, shape);
}

absl::StatusOr<const Buffer*> Model::Forward(std::span<const SequenceStep> steps,
                                             KvCache& cache) {
  const ModelConfig& c = config_;
  if (steps.empty()) return absl::InvalidArgumentError("Forward called with no sequences");
  // ---- host metadata ----
  StepHost host;
  std::vector<int32_t> query_start = {0};
  std::vector<int32_t> seq_lens;
  int64_t max_pages = 1;
  for (size_t s = 0; s < steps.size(); ++s) {
    const SequenceStep& step = steps[s];
    if (step.kv == nullptr) return absl::InvalidArgumentError("a sequence has no KV state");
    if (step.tokens.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", s, " has no tokens this step"));
    }
    const int64_t start = step.kv->length;
    const int64_t end = start + static_cast<int64_t>(step.tokens.size());
    if (end > c.max_position_embeddings) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence ", s, " reaches ", end, " positions, past max_position_embeddings ",
                       c.max_position_embeddings));
    }
    for (size_t i = 0; i < step.tokens.size(); ++i) {
      int32_t id = step.tokens[i];
      if (id < 0 || id >= c.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat(
            "token id ", id, " (sequence ", s, ", index ", i,
            ") is outside the vocabulary [0, ", c.vocab_size, ")"));
      }
      host.token_ids.push_back(id);
      host.positions.push_back(static_cast<int32_t>(start + i));
    }
    for (int pool = 0; pool < 2; ++pool) {
      const auto& table = step.kv->page_tables[pool];
      const int64_t last_page = (end - 1) / cache.page_size();
      if (static_cast<int64_t>(table.size()) <= last_page || table[last_page] < 0) {
        return absl::FailedPreconditionError(absl::StrCat(
            "sequence ", s, " holds no ", pool == kSlidingPool ? "sliding" : "full",
            " page for position ", end - 1, "; grow its KV pages before Forward"));
      }
      max_pages = std::max<int64_t>(max_pages, table.size());
    }
    query_start.push_back(static_cast<int32_t>(host.token_ids.size()));
    seq_lens.push_back(static_cast<int32_t>(end));
    int64_t first_row = step.logits == LogitsMode::kAll ? start : end - 1;
    if (step.logits != LogitsMode::kNone) {
      for (int64_t p = first_row; p < end; ++p) {
        host.rows.push_back(static_cast<int32_t>(query_start[s] + (p - start)));
      }
    }
  }
  const int64_t num_tokens = static_cast<int64_t>(host.token_ids.size());
  const int64_t num_rows = static_cast<int64_t>(host.rows.size());
  for (int pool = 0; pool < 2; ++pool) {
    host.page_tables[pool].assign(steps.size() * max_pages, -1);
    for (size_t s = 0; s < steps.size(); ++s) {
      const auto& table = steps[s].kv->page_tables[pool];
      std::copy(table.begin(), table.end(), host.page_tables[pool].begin() + s * max_pages);
      for (int64_t p = steps[s].kv->length; p < seq_lens[s]; ++p) {
        int32_t page = table[p / cache.page_size()];
        if (page < 0) {
          return absl::FailedPreconditionError(absl::StrCat(
              "sequence ", s, " has no page for position ", p, "; grow its KV pages first"));
        }
        host.slots[pool].push_back(static_cast<int32_t>(page * cache.page_size() +
                                                        p % cache.page_size()));
      }
    }
  }
  RETURN_IF_ERROR(EnsureScratch(num_tokens, num_rows));
  ASSIGN_OR_RETURN(token_ids_, AllocI32(backend_, host.token_ids));
  ASSIGN_OR_RETURN(positions_, AllocI32(backend_, host.positions));
  ASSIGN_OR_RETURN(query_start_, AllocI32(backend_, query_start));
  ASSIGN_OR_RETURN(seq_lens_, AllocI32(backend_, seq_lens));
  ASSIGN_OR_RETURN(rows_, AllocI32(backend_, host.rows));
  for (int pool = 0; pool < 2; ++pool) {
    ASSIGN_OR_RETURN(page_tables_[pool], AllocI32(backend_, host.page_tables[pool]));
    ASSIGN_OR_RETURN(slots_[pool], AllocI32(backend_, host.slots[pool]));
  }
  BatchLayout layout;
  layout.num_tokens = num_tokens;
  layout.num_seqs = static_cast<int64_t>(steps.size());
  layout.max_pages_per_seq = max_pages;
  layout.positions = positions_.get();
  layout.query_start = query_start_.get();
  layout.seq_lens = seq_lens_.get();
  for (int pool = 0; pool < 2; ++pool) {
    layout.page_tables[pool] = page_tables_[pool].get();
    layout.slots[pool] = slots_[pool].get();
  }
  layout.host_query_start = query_start;
  layout.host_seq_lens = seq_lens;
  num_tokens_ = num_tokens;

  // ---- the network ----
  const int64_t hidden = c.hidden_size;
  backend_.Embed(*token_ids_, *weights_->embed_tokens, num_tokens, c.vocab_size, 0, hidden,
                 std::sqrt(static_cast<float>(hidden)), *hidden_);
  Observe("embed", *hidden_, {num_tokens, hidden});
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    AttentionBlock(l, layout, cache);
    FeedForwardBlock(l);
    Observe(absl::StrCat("layers.", l, ".out"), *hidden_, {num_tokens, hidden});
  }
  num_logit_rows_ = num_rows;
  if (num_rows > 0) {
    backend_.GatherRows(*hidden_, *rows_, num_rows, hidden, *row_hidden_);
    backend_.RmsNorm(*row_hidden_, weights_->final_norm.get(), num_rows, hidden,
                     static_cast<float>(c.rms_norm_eps), *row_hidden_);
    backend_.MatMul(*row_hidden_, weights_->LmHead(), num_rows, c.vocab_size, hidden, *logits_);
    if (c.final_logit_softcapping > 0) {
      backend_.Softcap(*logits_, num_rows * c.vocab_size,
                       static_cast<float>(c.final_logit_softcapping));
    }
  }
  for (const SequenceStep& step : steps) step.kv->length += static_cast<int64_t>(step.tokens.size());
  RETURN_IF_ERROR(backend_.Synchronize());
  return logits_.get();
}

absl::StatusOr<std::vector<int32_t>> Model::Sample(const std::vector<SamplingParams>& params) {
  const int64_t rows = num_logit_rows_;
  if (static_cast<int64_t>(params.size()) != rows) {
    return absl::InvalidArgumentError(absl::StrCat("Sample got ", params.size(),
                                                   " parameter sets for ", rows, " logit rows"));
  }
  std::vector<int32_t> ids(rows);
  if (rows == 0) return ids;
  if (sampled_ == nullptr || sampled_->numel() < rows) {
    ASSIGN_OR_RETURN(sampled_, backend_.Alloc(DType::kI32, std::max<int64_t>(rows, 16)));
  }
  backend_.Sample(*logits_, rows, config_.vocab_size, params, *sampled_);
  RETURN_IF_ERROR(backend_.Read(*sampled_, ids.data(), rows * sizeof(int32_t)));
  return ids;
}

absl::StatusOr<std::vector<float>> Model::LogitsToHost() {
  std::vector<float> host(num_logit_rows_ * config_.vocab_size);
  if (!host.empty()) {
    RETURN_IF_ERROR(backend_.Read(*logits_, host.data(), host.size() * sizeof(float)));
  }
  return host;
}

void Model::AttentionBlock(int l, const BatchLayout& layout, KvCache& cache) {
  const ModelConfig& c = config_;
  const LayerWeights& w = weights_->layers[l];
  const int64_t t = num_tokens_;
  const int64_t hidden = c.hidden_size;
  const int64_t d = c.LayerHeadDim(l);
  const int64_t heads = c.num_attention_heads;
  const int64_t kv_heads = c.LayerKvHeads(l);
  const float eps = static_cast<float>(c.rms_norm_eps);
  const RopeParams& rp = c.LayerRope(l);
  RopeSpec rope;
  rope.head_dim = d;
  rope.theta = rp.rope_theta;
  rope.factor = rp.factor;
  rope.rotary_pairs = rp.rope_type == "proportional"
                          ? static_cast<int64_t>(rp.partial_rotary_factor * d / 2)
                          : d / 2;
  RopeSpec no_rope = rope;
  no_rope.rotary_pairs = 0;
  const int pool = c.IsFull(l) ? kFullPool : kSlidingPool;

  backend_.RmsNorm(*hidden_, w.input_layernorm.get(), t, hidden, eps, *normed_);
  backend_.MatMul(*normed_, *w.q_proj, t, heads * d, hidden, *q_);
  backend_.HeadNormRope(*q_, w.q_norm.get(), *positions_, t, heads, rope, eps);
  backend_.MatMul(*normed_, *w.k_proj, t, kv_heads * d, hidden, *k_);
  if (c.LayerKEqV(l)) {
    // V = weightless norm of the raw K projection; K is derived from V inside attention.
    backend_.HeadNormRope(*k_, nullptr, *positions_, t, kv_heads, no_rope, eps);
    backend_.WriteKv(nullptr, *k_, *layout.slots[pool], t, kv_heads * d, nullptr, cache.v(l));
  } else {
    backend_.MatMul(*normed_, *w.v_proj, t, kv_heads * d, hidden, *v_);
    backend_.HeadNormRope(*k_, w.k_norm.get(), *positions_, t, kv_heads, rope, eps);
    backend_.HeadNormRope(*v_, nullptr, *positions_, t, kv_heads, no_rope, eps);
    backend_.WriteKv(k_.get(), *v_, *layout.slots[pool], t, kv_heads * d, cache.k(l),
                     cache.v(l));
  }
  AttentionArgs args;
  args.layout = &layout;
  args.pool = pool;
  args.q = q_.get();
  args.k_cache = cache.k(l);
  args.v_cache = &cache.v(l);
  args.k_norm_weight = w.k_norm.get();
  args.rope = rope;
  args.num_heads = heads;
  args.num_kv_heads = kv_heads;
  args.head_dim = d;
  args.page_size = cache.page_size();
  args.window = c.IsFull(l) ? 0 : c.sliding_window;
  args.scale = 1.0f;
  args.out = attn_.get();
  backend_.Attention(args);
  backend_.MatMul(*attn_, *w.o_proj, t, hidden, heads * d, *proj_);
  backend_.AddRmsNorm(*hidden_, *proj_, *w.post_attention_layernorm, nullptr, t, hidden, eps);
}

void Model::FeedForwardBlock(int l) {
  const ModelConfig& c = config_;
  const LayerWeights& w = weights_->layers[l];
  const int64_t t = num_tokens_;
  const int64_t hidden = c.hidden_size;
  const int64_t inter = c.intermediate_size;
  const float eps = static_cast<float>(c.rms_norm_eps);

  backend_.RmsNorm(*hidden_, w.pre_feedforward_layernorm.get(), t, hidden, eps, *normed_);
  backend_.MatMul(*normed_, *w.mlp_gate_up, t, 2 * inter, hidden, *gate_up_);
  backend_.GeluMul(*gate_up_, t, inter, *act_);
  backend_.MatMul(*act_, *w.mlp_down, t, hidden, inter, *mlp_out_);
  if (c.enable_moe_block) {
    backend_.RmsNorm(*mlp_out_, w.post_feedforward_layernorm_1.get(), t, hidden, eps, *mlp_out_);
    MoeRouteArgs route;
    route.x = hidden_.get();
    route.router_scale = w.router_scale.get();
    route.router_proj = w.router_proj.get();
    route.per_expert_scale = w.per_expert_scale.get();
    route.num_tokens = t;
    route.hidden = hidden;
    route.num_experts = c.num_experts;
    route.top_k = c.top_k_experts;
    route.eps = eps;
    route.topk_ids = topk_ids_.get();
    route.topk_weights = topk_weights_.get();
    backend_.MoeRoute(route);
    Observe(absl::StrCat("layers.", l, ".router_ids"), *topk_ids_, {t, c.top_k_experts});
    backend_.RmsNorm(*hidden_, w.pre_feedforward_layernorm_2.get(), t, hidden, eps, *moe_in_);
    MoeExpertsArgs experts;
    experts.x = moe_in_.get();
    experts.topk_ids = topk_ids_.get();
    experts.topk_weights = topk_weights_.get();
    experts.gate_up = w.experts_gate_up.get();
    experts.down = w.experts_down.get();
    experts.num_tokens = t;
    experts.hidden = hidden;
    experts.inter = c.moe_intermediate_size;
    experts.top_k = c.top_k_experts;
    experts.first_expert = 0;
    experts.num_local_experts = c.num_experts;
    experts.out = moe_out_.get();
    backend_.MoeExperts(experts);
    backend_.RmsNorm(*moe_out_, w.post_feedforward_layernorm_2.get(), t, hidden, eps, *moe_out_);
    backend_.Add(*mlp_out_, *moe_out_, t * hidden, *mlp_out_);
  }
  backend_.AddRmsNorm(*hidden_, *mlp_out_, *w.post_feedforward_layernorm, w.layer_scalar.get(),
                      t, hidden, eps);
}

}  // namespace gemma::gemma4
