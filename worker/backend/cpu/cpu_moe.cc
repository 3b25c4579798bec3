// MoE routing and expert compute of the CPU backend. Each expert runs over the tokens routed to
// it (gathered into a dense block). With few tokens (decode) the pool's threads claim whole
// experts one at a time, largest first, each running its products alone: one synchronisation
// of the pool per layer, where splitting every product cost two per expert (about 500 per
// decode step of the benchmark model at 32 sequences). With many (prefill) the experts run one
// after the other with threaded products. Outputs are combined per token in ascending expert
// order, so the sum does not depend on which rank or thread owns what.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <numeric>
#include <vector>

#include "glog/logging.h"
#include "worker/backend/cpu/cpu_backend.h"

namespace gemma {
namespace {

// The experts of one MoeExperts call: the (token, slot) pairs routed to each local expert, each
// pair's expert output, and the weighted combine.
class ExpertBatch {
 public:
  explicit ExpertBatch(const MoeExpertsArgs& a) : a_(a), assigned_(a.num_local_experts) {
    const int32_t* ids = I32Data(*a.topk_ids);
    for (int64_t t = 0; t < a.num_tokens; ++t) {
      for (int64_t k = 0; k < a.top_k; ++k) {
        int64_t local = ids[t * a.top_k + k] - a.first_expert;
        if (local >= 0 && local < a.num_local_experts) assigned_[local].push_back(t * a.top_k + k);
      }
    }
    for (int64_t e = 0; e < a.num_local_experts; ++e) {
      if (!assigned_[e].empty()) active_.push_back(e);
    }
    // Largest first, so that threads claiming them one at a time finish close together.
    std::stable_sort(active_.begin(), active_.end(), [&](int64_t x, int64_t y) {
      return assigned_[x].size() > assigned_[y].size();
    });
    // Not zeroed: every slot of a local expert is written by Run before Combine reads it, and
    // Combine skips the others.
    slot_out_.reset(new float[a.num_tokens * a.top_k * a.hidden]);
  }

  int64_t num_active() const { return static_cast<int64_t>(active_.size()); }

  // Per-thread scratch of Run.
  struct Scratch {
    std::vector<float> xin, gate_up, act, y;
  };

  // The i-th active expert over its rows: gather, gate/up product, GELU-tanh times up, down
  // product, scatter to the slots. `pool` null runs both products on the calling thread.
  // Different experts write disjoint slots.
  void Run(ThreadPool* pool, int64_t i, Scratch& s) {
    const int64_t e = active_[i];
    const int64_t hidden = a_.hidden, inter = a_.inter, top_k = a_.top_k;
    const float* x = F32Data(*a_.x);
    const auto& rows = assigned_[e];
    const int64_t n = static_cast<int64_t>(rows.size());
    s.xin.resize(n * hidden);
    for (int64_t r = 0; r < n; ++r) {
      std::copy_n(x + (rows[r] / top_k) * hidden, hidden, &s.xin[r * hidden]);
    }
    s.gate_up.resize(n * 2 * inter);
    cpu::MatMulF32(pool, s.xin.data(), *a_.gate_up, e * 2 * inter, n, 2 * inter, hidden,
                   s.gate_up.data());
    s.act.resize(n * inter);
    for (int64_t r = 0; r < n; ++r) {
      const float* g = &s.gate_up[r * 2 * inter];
      cpu::GeluTanhMul(g, g + inter, inter, &s.act[r * inter]);
    }
    if (n == 1) {  // one row: straight into its slot
      cpu::MatMulF32(pool, s.act.data(), *a_.down, e * hidden, 1, hidden, inter,
                     &slot_out_[rows[0] * hidden]);
      return;
    }
    s.y.resize(n * hidden);
    cpu::MatMulF32(pool, s.act.data(), *a_.down, e * hidden, n, hidden, inter, s.y.data());
    for (int64_t r = 0; r < n; ++r) {
      std::copy_n(&s.y[r * hidden], hidden, &slot_out_[rows[r] * hidden]);
    }
  }

  // out[t] = sum over the token's local experts, in slot (= ascending expert id) order.
  void Combine() {
    const int64_t hidden = a_.hidden, top_k = a_.top_k;
    const int32_t* ids = I32Data(*a_.topk_ids);
    const float* weights = F32Data(*a_.topk_weights);
    float* out = F32Data(*a_.out);
    for (int64_t t = 0; t < a_.num_tokens; ++t) {
      float* o = out + t * hidden;
      std::fill(o, o + hidden, 0.0f);
      for (int64_t k = 0; k < top_k; ++k) {
        int64_t local = ids[t * top_k + k] - a_.first_expert;
        if (local < 0 || local >= a_.num_local_experts) continue;
        const float w = weights[t * top_k + k];
        const float* s = &slot_out_[(t * top_k + k) * hidden];
        for (int64_t i = 0; i < hidden; ++i) o[i] += w * s[i];
      }
    }
  }

 private:
  const MoeExpertsArgs& a_;
  std::vector<std::vector<int64_t>> assigned_;
  std::vector<int64_t> active_;
  std::unique_ptr<float[]> slot_out_;
};

// Every expert of `batch` on whichever thread of `pool` claims it next, each single-threaded.
void RunClaimed(ThreadPool& pool, ExpertBatch& batch) {
  std::atomic<int64_t> next{0};
  pool.ParallelFor(pool.num_threads(), 1, [&](int64_t begin, int64_t end) {
    ExpertBatch::Scratch scratch;
    for (int64_t part = begin; part < end; ++part) {
      for (int64_t i = next.fetch_add(1); i < batch.num_active(); i = next.fetch_add(1)) {
        batch.Run(nullptr, i, scratch);
      }
    }
  });
}
}  // namespace

void CpuBackend::MoeRoute(const MoeRouteArgs& a) {
  const int64_t hidden = a.hidden;
  const int64_t num_experts = a.num_experts;
  const int64_t top_k = a.top_k;
  CHECK_LE(top_k, num_experts);
  const float* x = F32Data(*a.x);
  std::vector<float> scale(hidden);
  LoadF32Range(*a.router_scale, 0, hidden, scale.data());
  std::vector<float> per_expert(num_experts);
  LoadF32Range(*a.per_expert_scale, 0, num_experts, per_expert.data());
  const float root = 1.0f / std::sqrt(static_cast<float>(hidden));

  // z = rmsnorm(x) * scale * hidden^-1/2, then logits = z . W^T in one product.
  std::vector<float> z(a.num_tokens * hidden);
  for (int64_t t = 0; t < a.num_tokens; ++t) {
    const float* xr = x + t * hidden;
    double sum = 0.0;
    for (int64_t i = 0; i < hidden; ++i) sum += static_cast<double>(xr[i]) * xr[i];
    float inv = 1.0f / std::sqrt(static_cast<float>(sum / hidden) + a.eps);
    for (int64_t i = 0; i < hidden; ++i) z[t * hidden + i] = (xr[i] * inv) * scale[i] * root;
  }
  std::vector<float> logits(a.num_tokens * num_experts);
  cpu::MatMulF32(&pool_, z.data(), *a.router_proj, 0, a.num_tokens, num_experts, hidden,
                 logits.data());

  int32_t* ids = I32Data(*a.topk_ids);
  float* weights = F32Data(*a.topk_weights);
  int32_t* counts = a.expert_counts != nullptr ? I32Data(*a.expert_counts) : nullptr;
  std::vector<int32_t> order(num_experts);
  std::vector<float> probs(num_experts);
  for (int64_t t = 0; t < a.num_tokens; ++t) {
    const float* l = &logits[t * num_experts];
    float max_logit = *std::max_element(l, l + num_experts);
    double denom = 0.0;
    for (int64_t e = 0; e < num_experts; ++e) {
      probs[e] = std::exp(l[e] - max_logit);
      denom += probs[e];
    }
    for (int64_t e = 0; e < num_experts; ++e) probs[e] = static_cast<float>(probs[e] / denom);
    // Top-k by probability; equal probabilities go to the lower expert id.
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + top_k, order.end(), [&](int32_t i, int32_t j) {
      return probs[i] != probs[j] ? probs[i] > probs[j] : i < j;
    });
    std::sort(order.begin(), order.begin() + top_k);
    double chosen = 0.0;
    for (int64_t k = 0; k < top_k; ++k) chosen += probs[order[k]];
    for (int64_t k = 0; k < top_k; ++k) {
      int32_t e = order[k];
      ids[t * top_k + k] = e;
      weights[t * top_k + k] = static_cast<float>(probs[e] / chosen) * per_expert[e];
      if (counts != nullptr) ++counts[e];
    }
  }
}

void CpuBackend::MoeExperts(const MoeExpertsArgs& a) {
  ExpertBatch batch(a);
  if (a.num_tokens <= experts_whole_max_tokens_ && batch.num_active() > 1) {
    RunClaimed(pool_, batch);
  } else {
    ExpertBatch::Scratch scratch;
    for (int64_t i = 0; i < batch.num_active(); ++i) batch.Run(&pool_, i, scratch);
  }
  batch.Combine();
}

}  // namespace gemma
