// MoE routing and expert compute of the CPU backend. Each expert runs over the tokens routed to
// it (gathered into a dense block), each product a BLAS call: with few tokens per expert
// (decode) the experts run in parallel, each on one thread; otherwise one at a time with
// threaded products. Outputs are combined per token in ascending expert order, so the sum does
// not depend on which rank or thread owns what.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "glog/logging.h"
#include "worker/backend/cpu/cpu_backend.h"

namespace gemma {
namespace {
// Up to this many tokens routed to every expert, experts run in parallel (each product on one
// thread) instead of one after the other with threaded products: at decode each product is
// too small to be worth two synchronisations of the pool.
constexpr int64_t kMoeExpertParallelMaxRows = 4;
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
  const int64_t hidden = a.hidden;
  const int64_t inter = a.inter;
  const int64_t top_k = a.top_k;
  const int32_t* ids = I32Data(*a.topk_ids);
  const float* weights = F32Data(*a.topk_weights);
  const float* x = F32Data(*a.x);
  float* out = F32Data(*a.out);

  // Assignments (token, slot) grouped by local expert.
  std::vector<std::vector<int64_t>> assigned(a.num_local_experts);
  for (int64_t t = 0; t < a.num_tokens; ++t) {
    for (int64_t k = 0; k < top_k; ++k) {
      int64_t local = ids[t * top_k + k] - a.first_expert;
      if (local >= 0 && local < a.num_local_experts) assigned[local].push_back(t * top_k + k);
    }
  }
  // Each (token, slot)'s expert output, combined afterwards in slot (= expert id) order.
  std::vector<float> slot_out(a.num_tokens * top_k * hidden, 0.0f);
  std::vector<int64_t> active;
  int64_t max_rows = 0;
  for (int64_t e = 0; e < a.num_local_experts; ++e) {
    if (assigned[e].empty()) continue;
    active.push_back(e);
    max_rows = std::max<int64_t>(max_rows, static_cast<int64_t>(assigned[e].size()));
  }
  // One expert over its rows: gather, gate/up product, GELU-tanh times up, down product, scatter
  // to the slots. `pool` null runs both products on the calling thread.
  auto run_expert = [&](ThreadPool* pool, int64_t e, std::vector<float>& xin,
                        std::vector<float>& gate_up, std::vector<float>& act,
                        std::vector<float>& y) {
    const auto& rows = assigned[e];
    const int64_t n = static_cast<int64_t>(rows.size());
    xin.resize(n * hidden);
    for (int64_t r = 0; r < n; ++r) {
      std::copy_n(x + (rows[r] / top_k) * hidden, hidden, &xin[r * hidden]);
    }
    gate_up.resize(n * 2 * inter);
    cpu::MatMulF32(pool, xin.data(), *a.gate_up, e * 2 * inter, n, 2 * inter, hidden,
                   gate_up.data());
    act.resize(n * inter);
    for (int64_t r = 0; r < n; ++r) {
      const float* g = &gate_up[r * 2 * inter];
      cpu::GeluTanhMul(g, g + inter, inter, &act[r * inter]);
    }
    if (n == 1) {  // one row: straight into its slot
      cpu::MatMulF32(pool, act.data(), *a.down, e * hidden, 1, hidden, inter,
                     &slot_out[rows[0] * hidden]);
      return;
    }
    y.resize(n * hidden);
    cpu::MatMulF32(pool, act.data(), *a.down, e * hidden, n, hidden, inter, y.data());
    for (int64_t r = 0; r < n; ++r) {
      std::copy_n(&y[r * hidden], hidden, &slot_out[rows[r] * hidden]);
    }
  };
  const int64_t num_active = static_cast<int64_t>(active.size());
  if (max_rows <= kMoeExpertParallelMaxRows && num_active > 1) {
    // Few tokens (decode): whole experts in parallel, each single-threaded. Every slot is
    // written by exactly one expert, so the parts write disjoint memory.
    pool_.ParallelFor(num_active, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> xin, gate_up, act, y;
      for (int64_t i = begin; i < end; ++i) run_expert(nullptr, active[i], xin, gate_up, act, y);
    });
  } else {
    // Many tokens: one expert at a time, each product threaded.
    std::vector<float> xin, gate_up, act, y;
    for (int64_t e : active) run_expert(&pool_, e, xin, gate_up, act, y);
  }
  for (int64_t t = 0; t < a.num_tokens; ++t) {
    float* o = out + t * hidden;
    std::fill(o, o + hidden, 0.0f);
    for (int64_t k = 0; k < top_k; ++k) {
      int64_t local = ids[t * top_k + k] - a.first_expert;
      if (local < 0 || local >= a.num_local_experts) continue;
      const float w = weights[t * top_k + k];
      const float* s = &slot_out[(t * top_k + k) * hidden];
      for (int64_t i = 0; i < hidden; ++i) o[i] += w * s[i];
    }
  }
}

}  // namespace gemma
