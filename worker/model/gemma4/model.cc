#include "worker/model/gemma4/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>

#include "absl/strings/str_cat.h"
#include "common/fnv.h"
#include "common/status_macros.h"
#include "glog/logging.h"
#include "worker/parallel/expert_dispatch.h"
#include "worker/parallel/sharded_sampling.h"

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
                                                   Backend& backend,
                                                   const ModelParallel& parallel) {
  ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(model_dir));
  ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> checkpoint, Checkpoint::Open(model_dir));
  return Create(config, std::move(checkpoint), backend, parallel);
}

absl::StatusOr<std::unique_ptr<Model>> Model::Create(const ModelConfig& config,
                                                     std::unique_ptr<Checkpoint> checkpoint,
                                                     Backend& backend,
                                                     const ModelParallel& parallel) {
  const ShardLayout& layout = parallel.layout;
  auto check_comm = [](const parallel::Communicator* comm, int size, int rank,
                       const char* what) -> absl::Status {
    if (size == 1 && comm == nullptr) return absl::OkStatus();
    if (comm == nullptr || comm->world_size() != size || comm->rank() != rank) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " communicator does not match the layout: expected rank ", rank, " of ", size,
          comm == nullptr ? ", got none" : absl::StrCat(", got rank ", comm->rank(), " of ",
                                                         comm->world_size())));
    }
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(check_comm(parallel.tp_comm, layout.tp_size, layout.tp_rank, "tensor-parallel"));
  if (parallel.ep_comm != nullptr) {
    RETURN_IF_ERROR(check_comm(parallel.ep_comm, layout.ep_size, layout.ep_rank, "expert-parallel"));
  } else if (layout.ep_size != layout.tp_size || layout.ep_rank != layout.tp_rank) {
    return absl::InvalidArgumentError(
        "without an expert-parallel communicator, experts are split over the tp group: ep size "
        "and rank must equal tp size and rank");
  }
  std::unique_ptr<Model> model(new Model(config, backend, parallel));
  model->parallel_.placement = nullptr;  // not kept: the model holds its own copy in experts_
  ASSIGN_OR_RETURN(model->dims_, ComputeLocalDims(config, layout));
  ASSIGN_OR_RETURN(model->weights_, LoadWeights(config, *checkpoint, model->dims_, backend));
  model->checkpoint_ = std::move(checkpoint);
  if (config.enable_moe_block) {
    eplb::Placement placement;
    if (parallel.placement != nullptr) {
      placement = *parallel.placement;
    } else {
      ASSIGN_OR_RETURN(placement, eplb::StaticPlacement(config.num_hidden_layers,
                                                        config.num_experts, layout.ep_size, 0));
    }
    ASSIGN_OR_RETURN(std::unique_ptr<ExpertSlots> slots, model->PrepareExperts(placement));
    RETURN_IF_ERROR(model->InstallExperts(std::move(slots)));
  }
  RETURN_IF_ERROR(backend.Synchronize());
  return model;
}

absl::StatusOr<std::unique_ptr<ExpertSlots>> Model::PrepareExperts(
    const eplb::Placement& placement) const {
  const ModelConfig& c = config_;
  if (!c.enable_moe_block) {
    return absl::FailedPreconditionError("this model has no experts to place");
  }
  RETURN_IF_ERROR(eplb::Validate(placement));
  const ShardLayout& layout = parallel_.layout;
  if (placement.num_layers != c.num_hidden_layers || placement.num_experts != c.num_experts ||
      placement.num_ranks != layout.ep_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "expert placement for ", placement.num_layers, " layers x ", placement.num_experts,
        " experts over ", placement.num_ranks, " ranks does not fit this model (",
        c.num_hidden_layers, " layers x ", c.num_experts, " experts) over ", layout.ep_size,
        " expert ranks"));
  }
  auto slots = std::make_unique<ExpertSlots>();
  slots->placement = placement;
  slots->copies = std::make_unique<eplb::CopyTable>(placement);
  slots->rank = layout.ep_rank;
  slots->layers.resize(c.num_hidden_layers);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    ASSIGN_OR_RETURN(slots->layers[l],
                     LoadExpertSlots(c, *checkpoint_, l, placement.RankSlots(l, layout.ep_rank),
                                     backend_));
  }
  return slots;
}

absl::Status Model::InstallExperts(std::unique_ptr<ExpertSlots> slots) {
  if (slots == nullptr || slots->rank != parallel_.layout.ep_rank ||
      slots->layers.size() != static_cast<size_t>(config_.num_hidden_layers)) {
    return absl::InvalidArgumentError("expert slots were not prepared for this rank");
  }
  graphs_.Drop();  // they replay on the old slot weights
  experts_ = std::move(slots);
  return absl::OkStatus();
}

const eplb::Placement& Model::placement() const {
  static const eplb::Placement kNone;
  return experts_ != nullptr ? experts_->placement : kNone;
}

KvCacheOptions Model::CacheOptions(KvCacheOptions base) const {
  base.kv_heads_per_layer.clear();
  for (const LocalLayerDims& l : dims_.layers) base.kv_heads_per_layer.push_back(l.kv_heads);
  return base;
}

absl::Status Model::TpAllReduce(Buffer& buffer, int64_t count) {
  if (parallel_.tp_comm == nullptr || count == 0) return absl::OkStatus();
  if (stream_sums_) {
    return parallel_.tp_comm->EnqueueAllReduce(backend_.RawData(buffer), count, DType::kF32,
                                               backend_.NativeStream());
  }
  return parallel_.tp_comm->AllReduce(backend_.RawData(buffer), count, DType::kF32);
}

absl::Status Model::EnsureScratch(int64_t num_tokens, int64_t num_rows) {
  const ModelConfig& c = config_;
  if (num_tokens > scratch_tokens_ || hidden_ == nullptr) {
    graphs_.Drop();  // they replay on the buffers about to be replaced
    const int64_t t = std::max<int64_t>(num_tokens, 16);
    const int64_t h = c.hidden_size;
    int64_t max_q = 0, max_kv = 0, max_inter = c.moe_intermediate_size;
    for (const LocalLayerDims& l : dims_.layers) {
      max_q = std::max(max_q, l.q_heads * l.head_dim);
      max_kv = std::max(max_kv, l.kv_heads * l.head_dim);
      max_inter = std::max(max_inter, l.inter);
    }
    auto alloc = [&](BufferPtr& b, DType dtype, int64_t n) -> absl::Status {
      ASSIGN_OR_RETURN(b, backend_.Alloc(dtype, n));
      return absl::OkStatus();
    };
    RETURN_IF_ERROR(alloc(hidden_, DType::kF32, t * h));
    RETURN_IF_ERROR(alloc(normed_, DType::kF32, t * h));
    RETURN_IF_ERROR(alloc(q_, DType::kF32, t * max_q));
    RETURN_IF_ERROR(alloc(k_, DType::kF32, t * max_kv));
    RETURN_IF_ERROR(alloc(v_, DType::kF32, t * max_kv));
    RETURN_IF_ERROR(alloc(attn_, DType::kF32, t * max_q));
    RETURN_IF_ERROR(alloc(proj_, DType::kF32, t * h));
    RETURN_IF_ERROR(alloc(gate_up_, DType::kF32, t * 2 * max_inter));
    RETURN_IF_ERROR(alloc(act_, DType::kF32, t * max_inter));
    RETURN_IF_ERROR(alloc(ffn_pair_, DType::kF32, 2 * t * h));
    if (c.enable_moe_block) {
      RETURN_IF_ERROR(alloc(moe_in_, DType::kF32, t * h));
      RETURN_IF_ERROR(alloc(topk_ids_, DType::kI32, t * c.top_k_experts));
      RETURN_IF_ERROR(alloc(topk_weights_, DType::kF32, t * c.top_k_experts));
      RETURN_IF_ERROR(alloc(local_slots_, DType::kI32, t * c.top_k_experts));
    }
    scratch_tokens_ = t;
  }
  if (num_rows > scratch_rows_ || logits_ == nullptr) {
    graphs_.Drop();
    const int64_t r = std::max<int64_t>(num_rows, 4);
    ASSIGN_OR_RETURN(row_hidden_, backend_.Alloc(DType::kF32, r * c.hidden_size));
    ASSIGN_OR_RETURN(logits_, backend_.Alloc(DType::kF32, r * dims_.vocab));
    scratch_rows_ = r;
  }
  return absl::OkStatus();
}

void Model::Observe(std::string_view name, const Buffer& buffer, std::vector<int64_t> shape) {
  if (observer_) observer_(name, buffer, shape);
}

absl::StatusOr<const Buffer*> Model::Forward(std::span<const SequenceStep> steps,
                                             KvCache& cache) {
  return AfterFailure(DoForward(steps, cache));
}

absl::StatusOr<std::vector<int32_t>> Model::Sample(const std::vector<SamplingParams>& params) {
  return AfterFailure(DoSample(params));
}

absl::StatusOr<std::vector<float>> Model::LogitsToHost() { return AfterFailure(DoLogitsToHost()); }

void Model::ReleaseFailedCommunicators() {
  for (parallel::Communicator* comm : {parallel_.tp_comm, parallel_.ep_comm}) {
    if (comm == nullptr || comm->healthy()) continue;
    // NCCL's abort waits for every graph that recorded its collectives: drop them first.
    graphs_.Drop();
    comm->Abort();
  }
}

absl::StatusOr<const Buffer*> Model::DoForward(std::span<const SequenceStep> steps,
                                               KvCache& cache) {
  const ModelConfig& c = config_;
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
  const bool graph = GraphEligible(steps);
  if (graph) max_pages = StepGraphs::RoundPages(max_pages);
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
  const int64_t hidden = c.hidden_size;
  ASSIGN_OR_RETURN(mlp_out_, backend_.View(*ffn_pair_, 0, num_tokens * hidden));
  ASSIGN_OR_RETURN(moe_out_, backend_.View(*ffn_pair_, num_tokens * hidden, num_tokens * hidden));
  const int64_t num_seqs = static_cast<int64_t>(steps.size());
  std::optional<StepGraphs::Slot> slot;
  if (graph) slot = graphs_.Acquire(num_seqs, max_pages, num_rows, cache, c.num_hidden_layers);
  StepInputs* in = slot ? slot->inputs : &step_inputs_;
  const bool reuse = slot && slot->reuse;
  // Eager steps take fresh buffers; a graph's are allocated once and overwritten each replay.
  auto upload = [&](BufferPtr& buffer, const std::vector<int32_t>& values) -> absl::Status {
    if (!reuse) {
      ASSIGN_OR_RETURN(buffer, AllocI32(backend_, values));
    } else if (!values.empty()) {
      backend_.Write(*buffer, values.data(), values.size() * sizeof(int32_t));
    }
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(upload(in->token_ids, host.token_ids));
  RETURN_IF_ERROR(upload(in->positions, host.positions));
  RETURN_IF_ERROR(upload(in->query_start, query_start));
  RETURN_IF_ERROR(upload(in->seq_lens, seq_lens));
  RETURN_IF_ERROR(upload(in->rows, host.rows));
  for (int pool = 0; pool < 2; ++pool) {
    RETURN_IF_ERROR(upload(in->page_tables[pool], host.page_tables[pool]));
    RETURN_IF_ERROR(upload(in->slots[pool], host.slots[pool]));
  }
  BatchLayout layout;
  layout.num_tokens = num_tokens;
  layout.num_seqs = num_seqs;
  layout.max_pages_per_seq = max_pages;
  layout.positions = in->positions.get();
  layout.query_start = in->query_start.get();
  layout.seq_lens = in->seq_lens.get();
  for (int pool = 0; pool < 2; ++pool) {
    layout.page_tables[pool] = in->page_tables[pool].get();
    layout.slots[pool] = in->slots[pool].get();
  }
  layout.host_query_start = query_start;
  layout.host_seq_lens = seq_lens;
  num_tokens_ = num_tokens;
  num_logit_rows_ = num_rows;

  if (slot) {
    stream_sums_ = parallel_.tp_comm != nullptr;  // GraphEligible: the comm enqueues on streams
    absl::Status ran = graphs_.Run(*slot, [&] { return RunNetwork(layout, *in, cache); });
    stream_sums_ = false;
    RETURN_IF_ERROR(ran);
    // The replay's sums wait on the peers: their watchdog, before anything else waits.
    if (parallel_.tp_comm != nullptr) {
      RETURN_IF_ERROR(parallel_.tp_comm->AwaitStream(backend_.NativeStream()));
    }
  } else {
    RETURN_IF_ERROR(RunNetwork(layout, *in, cache));
  }
  for (const SequenceStep& step : steps) step.kv->length += static_cast<int64_t>(step.tokens.size());
  RETURN_IF_ERROR(backend_.Synchronize());
  return logits_.get();
}

bool Model::GraphEligible(std::span<const SequenceStep> steps) const {
  if (!use_graphs_ || !backend_.SupportsGraphs() || steps.empty() || observer_) return false;
  // The dp-ep dispatch needs host round trips (routing, counts); so do the routing check and
  // experts with copies (MapToLocalSlots).
  if (parallel_.ep_comm != nullptr || parallel_.check_routing) return false;
  if (experts_ != nullptr && !experts_->copies->contiguous()) return false;
  // Tensor-parallel sums go into the graph only where they can be enqueued on the step's
  // stream (NCCL); Gloo and staged groups need the host.
  if (parallel_.tp_comm != nullptr &&
      (!parallel_.tp_comm->SupportsStreamOrdered() || backend_.NativeStream() == nullptr ||
       !parallel_.tp_comm->healthy())) {
    return false;
  }
  for (const SequenceStep& step : steps) {
    if (step.tokens.size() != 1) return false;
  }
  return true;
}

absl::Status Model::RunNetwork(const BatchLayout& layout, const StepInputs& in, KvCache& cache) {
  const ModelConfig& c = config_;
  const int64_t num_tokens = num_tokens_;
  const int64_t num_rows = num_logit_rows_;
  const int64_t hidden = c.hidden_size;
  backend_.Embed(*in.token_ids, *weights_->embed_tokens, num_tokens, dims_.vocab,
                 dims_.vocab_offset, hidden, std::sqrt(static_cast<float>(hidden)), *hidden_);
  RETURN_IF_ERROR(TpAllReduce(*hidden_, num_tokens * hidden));
  Observe("embed", *hidden_, {num_tokens, hidden});
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    RETURN_IF_ERROR(AttentionBlock(l, layout, cache));
    RETURN_IF_ERROR(FeedForwardBlock(l));
    Observe(absl::StrCat("layers.", l, ".out"), *hidden_, {num_tokens, hidden});
  }
  if (num_rows > 0) {
    backend_.GatherRows(*hidden_, *in.rows, num_rows, hidden, *row_hidden_);
    backend_.RmsNorm(*row_hidden_, weights_->final_norm.get(), num_rows, hidden,
                     static_cast<float>(c.rms_norm_eps), *row_hidden_);
    backend_.MatMul(*row_hidden_, weights_->LmHead(), num_rows, dims_.vocab, hidden, *logits_);
    if (c.final_logit_softcapping > 0) {
      backend_.Softcap(*logits_, num_rows * dims_.vocab,
                       static_cast<float>(c.final_logit_softcapping));
    }
  }
  return absl::OkStatus();
}

absl::Status Model::EnableExpertCounts() {
  if (!config_.enable_moe_block || expert_counts_ != nullptr) return absl::OkStatus();
  const int64_t layers = config_.num_hidden_layers, experts = config_.num_experts;
  ASSIGN_OR_RETURN(expert_counts_, backend_.Alloc(DType::kI32, layers * experts));
  const std::vector<int32_t> zeros(layers * experts, 0);
  backend_.Write(*expert_counts_, zeros.data(), zeros.size() * sizeof(int32_t));
  for (int64_t l = 0; l < layers; ++l) {
    ASSIGN_OR_RETURN(BufferPtr view, backend_.View(*expert_counts_, l * experts, experts));
    layer_expert_counts_.push_back(std::move(view));
  }
  // Graphs recorded before had no counter in their routers.
  graphs_.Drop();
  return backend_.Synchronize();
}

void Model::DisableExpertCounts() {
  if (expert_counts_ == nullptr) return;
  graphs_.Drop();  // they add to the counters
  layer_expert_counts_.clear();
  expert_counts_.reset();
}

absl::StatusOr<std::vector<int64_t>> Model::TakeExpertCounts() {
  if (expert_counts_ == nullptr) return std::vector<int64_t>();
  const int64_t n = expert_counts_->numel();
  std::vector<int32_t> counts(n);
  RETURN_IF_ERROR(backend_.Read(*expert_counts_, counts.data(), n * sizeof(int32_t)));
  const std::vector<int32_t> zeros(n, 0);
  backend_.Write(*expert_counts_, zeros.data(), zeros.size() * sizeof(int32_t));
  RETURN_IF_ERROR(backend_.Synchronize());
  return std::vector<int64_t>(counts.begin(), counts.end());
}

absl::StatusOr<std::vector<int32_t>> Model::DoSample(const std::vector<SamplingParams>& given) {
  const int64_t rows = num_logit_rows_;
  if (static_cast<int64_t>(given.size()) != rows) {
    return absl::InvalidArgumentError(absl::StrCat("Sample got ", given.size(),
                                                   " parameter sets for ", rows, " logit rows"));
  }
  std::vector<SamplingParams> params = given;
  for (SamplingParams& p : params) {
    if (p.temperature < kMinTemperature) p.temperature = 0.0f;
  }
  std::vector<int32_t> ids(rows);
  if (rows == 0) return ids;
  if (parallel_.tp_comm != nullptr) {
    return parallel::SampleSharded(backend_, *parallel_.tp_comm, *logits_,
                                   {.rows = num_logit_rows_,
                                    .local_vocab = dims_.vocab,
                                    .vocab_offset = dims_.vocab_offset,
                                    .vocab = config_.vocab_size},
                                   params);
  }
  if (sampled_ == nullptr || sampled_->numel() < rows) {
    ASSIGN_OR_RETURN(sampled_, backend_.Alloc(DType::kI32, std::max<int64_t>(rows, 16)));
  }
  backend_.Sample(*logits_, rows, config_.vocab_size, params, *sampled_);
  RETURN_IF_ERROR(backend_.Read(*sampled_, ids.data(), rows * sizeof(int32_t)));
  return ids;
}

absl::StatusOr<std::vector<float>> Model::DoLogitsToHost() {
  const int64_t rows = num_logit_rows_;
  const int64_t local = dims_.vocab;
  std::vector<float> host(rows * config_.vocab_size);
  if (host.empty()) return host;
  if (parallel_.tp_comm == nullptr) {
    RETURN_IF_ERROR(backend_.Read(*logits_, host.data(), host.size() * sizeof(float)));
    return host;
  }
  // Gather the vocabulary shards [tp, rows, local] and interleave them into [rows, vocab].
  const int tp = parallel_.layout.tp_size;
  ASSIGN_OR_RETURN(BufferPtr gathered, backend_.Alloc(DType::kF32, tp * rows * local));
  RETURN_IF_ERROR(parallel_.tp_comm->AllGather(backend_.RawData(*logits_),
                                               backend_.RawData(*gathered), rows * local,
                                               DType::kF32));
  std::vector<float> shards(tp * rows * local);
  RETURN_IF_ERROR(backend_.Read(*gathered, shards.data(), shards.size() * sizeof(float)));
  for (int r = 0; r < tp; ++r) {
    for (int64_t row = 0; row < rows; ++row) {
      std::copy_n(&shards[(r * rows + row) * local], local,
                  &host[row * config_.vocab_size + r * local]);
    }
  }
  return host;
}

absl::Status Model::AttentionBlock(int l, const BatchLayout& layout, KvCache& cache) {
  const ModelConfig& c = config_;
  const LayerWeights& w = weights_->layers[l];
  const LocalLayerDims& ld = dims_.layers[l];
  const int64_t t = num_tokens_;
  const int64_t hidden = c.hidden_size;
  const int64_t d = ld.head_dim;
  const int64_t heads = ld.q_heads;
  const int64_t kv_heads = ld.kv_heads;
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
  backend_.HeadNormRope(*q_, w.q_norm.get(), *layout.positions, t, heads, rope, eps);
  backend_.MatMul(*normed_, *w.k_proj, t, kv_heads * d, hidden, *k_);
  if (c.LayerKEqV(l)) {
    // V = weightless norm of the raw K projection; K is derived from V inside attention.
    backend_.HeadNormRope(*k_, nullptr, *layout.positions, t, kv_heads, no_rope, eps);
    backend_.WriteKv(nullptr, *k_, *layout.slots[pool], t, kv_heads * d, nullptr, cache.v(l));
  } else {
    backend_.MatMul(*normed_, *w.v_proj, t, kv_heads * d, hidden, *v_);
    backend_.HeadNormRope(*k_, w.k_norm.get(), *layout.positions, t, kv_heads, rope, eps);
    backend_.HeadNormRope(*v_, nullptr, *layout.positions, t, kv_heads, no_rope, eps);
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
  // o_proj is row-parallel: sum the partials before the norm that follows.
  RETURN_IF_ERROR(TpAllReduce(*proj_, t * hidden));
  backend_.AddRmsNorm(*hidden_, *proj_, *w.post_attention_layernorm, nullptr, t, hidden, eps);
  return absl::OkStatus();
}

absl::Status Model::FeedForwardBlock(int l) {
  const ModelConfig& c = config_;
  const LayerWeights& w = weights_->layers[l];
  const int64_t t = num_tokens_;
  const int64_t hidden = c.hidden_size;
  const int64_t inter = dims_.layers[l].inter;
  const float eps = static_cast<float>(c.rms_norm_eps);

  backend_.RmsNorm(*hidden_, w.pre_feedforward_layernorm.get(), t, hidden, eps, *normed_);
  backend_.MatMul(*normed_, *w.mlp_gate_up, t, 2 * inter, hidden, *gate_up_);
  backend_.GeluMul(*gate_up_, t, inter, *act_);
  backend_.MatMul(*act_, *w.mlp_down, t, hidden, inter, *mlp_out_);
  if (!c.enable_moe_block) {
    RETURN_IF_ERROR(TpAllReduce(*mlp_out_, t * hidden));
  } else {
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
    if (expert_counts_ != nullptr) route.expert_counts = layer_expert_counts_[l].get();
    backend_.MoeRoute(route);
    Observe(absl::StrCat("layers.", l, ".router_ids"), *topk_ids_, {t, c.top_k_experts});
    if (parallel_.check_routing) RETURN_IF_ERROR(CheckRouting(l));
    backend_.RmsNorm(*hidden_, w.pre_feedforward_layernorm_2.get(), t, hidden, eps, *moe_in_);
    const eplb::CopyTable& copies = *experts_->copies;
    if (parallel_.ep_comm != nullptr) {
      const int ranks = parallel_.layout.ep_size;
      const int per_node = parallel_.ranks_per_node > 0 ? parallel_.ranks_per_node : ranks;
      RETURN_IF_ERROR(parallel::DispatchExperts(
          backend_, *parallel_.ep_comm,
          {.num_tokens = t,
           .hidden = c.hidden_size,
           .top_k = c.top_k_experts,
           .layer = l,
           .tp_rank = parallel_.layout.tp_rank,
           .tp_size = parallel_.layout.tp_size},
          copies, {.num_ranks = ranks, .ranks_per_node = per_node}, *topk_ids_, *topk_weights_,
          *moe_in_, *moe_out_,
          [&](const Buffer& x, const Buffer& slots, const Buffer& weights, int64_t rows,
              int64_t top_k, Buffer& out) {
            RunLocalExperts(l, x, slots, weights, rows, top_k, 0, out);
          }));
    } else if (copies.contiguous()) {
      // Rank r holds experts [r * S, (r + 1) * S) in order: the router's ids are the slots.
      RunLocalExperts(l, *moe_in_, *topk_ids_, *topk_weights_, t, c.top_k_experts,
                      static_cast<int64_t>(experts_->rank) * copies.slots_per_rank(), *moe_out_);
    } else {
      RETURN_IF_ERROR(MapToLocalSlots(l));
      RunLocalExperts(l, *moe_in_, *local_slots_, *topk_weights_, t, c.top_k_experts, 0,
                      *moe_out_);
    }
    // The dense and expert partials feed two different norms: one collective for both.
    RETURN_IF_ERROR(TpAllReduce(*ffn_pair_, 2 * t * hidden));
    backend_.RmsNorm(*mlp_out_, w.post_feedforward_layernorm_1.get(), t, hidden, eps, *mlp_out_);
    backend_.RmsNorm(*moe_out_, w.post_feedforward_layernorm_2.get(), t, hidden, eps, *moe_out_);
    backend_.Add(*mlp_out_, *moe_out_, t * hidden, *mlp_out_);
  }
  backend_.AddRmsNorm(*hidden_, *mlp_out_, *w.post_feedforward_layernorm, w.layer_scalar.get(),
                      t, hidden, eps);
  return absl::OkStatus();
}

absl::Status Model::CheckRouting(int l) {
  if (parallel_.tp_comm == nullptr) return absl::OkStatus();
  const int64_t n = num_tokens_ * config_.top_k_experts;
  std::vector<int32_t> ids(n);
  if (n > 0) RETURN_IF_ERROR(backend_.Read(*topk_ids_, ids.data(), n * sizeof(int32_t)));
  const uint64_t hash = Fnv1a64(ids.data(), ids.size() * sizeof(int32_t));
  const int tp = parallel_.layout.tp_size;
  std::vector<int64_t> all(tp);
  int64_t mine = static_cast<int64_t>(hash);
  RETURN_IF_ERROR(parallel_.tp_comm->AllGather(&mine, all.data(), 1, DType::kI64));
  for (int r = 0; r < tp; ++r) {
    if (all[r] != all[0]) {
      return absl::InternalError(absl::StrCat("routing of layer ", l, " differs across tp ranks: ",
                                              "rank 0 hash ", all[0], ", rank ", r, " hash ",
                                              all[r]));
    }
  }
  return absl::OkStatus();
}

absl::Status Model::MapToLocalSlots(int l) {
  const int64_t n = num_tokens_ * config_.top_k_experts;
  if (n == 0) return absl::OkStatus();
  std::vector<int32_t>& ids = host_local_slots_;  // kept: Write reads it until the step ends
  ids.resize(n);
  RETURN_IF_ERROR(backend_.Read(*topk_ids_, ids.data(), n * sizeof(int32_t)));
  const eplb::CopyTable& copies = *experts_->copies;
  const int spr = copies.slots_per_rank();
  std::vector<int64_t> nth(config_.num_experts, 0);
  for (int64_t i = 0; i < n; ++i) {
    std::span<const int32_t> list = copies.Copies(l, ids[i]);
    const int32_t slot = list[static_cast<size_t>(nth[ids[i]]++ % static_cast<int64_t>(list.size()))];
    ids[i] = slot / spr == experts_->rank ? slot % spr : -1;
  }
  backend_.Write(*local_slots_, ids.data(), n * sizeof(int32_t));
  return absl::OkStatus();
}

void Model::RunLocalExperts(int l, const Buffer& x, const Buffer& ids, const Buffer& topk_weights,
                            int64_t num_tokens, int64_t top_k, int64_t first_slot, Buffer& out) {
  const ExpertSlotWeights& w = experts_->layers[l];
  MoeExpertsArgs experts;
  experts.x = &x;
  experts.topk_ids = &ids;
  experts.topk_weights = &topk_weights;
  experts.gate_up = w.gate_up.get();
  experts.down = w.down.get();
  experts.num_tokens = num_tokens;
  experts.hidden = config_.hidden_size;
  experts.inter = config_.moe_intermediate_size;
  experts.top_k = top_k;
  experts.first_expert = first_slot;
  experts.num_local_experts = experts_->copies->slots_per_rank();
  experts.out = &out;
  backend_.MoeExperts(experts);
}

}  // namespace gemma::gemma4
