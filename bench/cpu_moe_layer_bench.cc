// CpuBackend::MoeExperts on one MoE layer of the engine-core benchmark model (hidden 1024, 32
// experts of 256, top 4) at decode batch sizes, on all cores, both ways it can run: whole
// experts claimed by the threads (what decode uses) and one expert after the other with each
// product split over the threads (what it used before, and what prefill uses). Eight layers'
// experts cycle, so every call reads its weights from memory as a decode step does; routing is
// a seeded uniform draw of 4 distinct experts per token. Reports the expert weights read per
// second and multiply-adds per second.
//   bin/cpu_moe_layer_bench [--benchmark_filter=...]
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "benchmark/benchmark.h"
#include "worker/backend/cpu/cpu_backend.h"

namespace {

constexpr int64_t kHidden = 1024, kExperts = 32, kInter = 256, kTopK = 4, kLayers = 8;

gemma::BufferPtr Filled(gemma::CpuBackend& backend, int64_t numel, double step) {
  std::vector<float> host(numel);
  for (int64_t i = 0; i < numel; ++i) host[i] = 0.05f * std::sin(step * static_cast<double>(i));
  return *backend.UploadWeight(gemma::DType::kF32, host.data(), numel);
}

// Args: tokens; whole experts per thread (1) or threaded products (0).
void BM_MoeExperts(benchmark::State& state) {
  const int64_t t = state.range(0);
  gemma::CpuBackend backend(
      gemma::CpuBackendOptions{.experts_whole_max_tokens = state.range(1) != 0 ? t : 0});
  std::vector<gemma::BufferPtr> gate_up, down;
  for (int64_t l = 0; l < kLayers; ++l) {
    gate_up.push_back(Filled(backend, kExperts * 2 * kInter * kHidden, 0.003));
    down.push_back(Filled(backend, kExperts * kHidden * kInter, 0.004));
  }
  auto x = Filled(backend, t * kHidden, 0.01);
  std::mt19937 rng(7);
  std::vector<int32_t> ids;
  std::set<int32_t> used;
  for (int64_t i = 0; i < t; ++i) {
    std::vector<int32_t> order(kExperts);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    std::sort(order.begin(), order.begin() + kTopK);
    ids.insert(ids.end(), order.begin(), order.begin() + kTopK);
    used.insert(order.begin(), order.begin() + kTopK);
  }
  std::vector<float> weights(t * kTopK, 1.0f / kTopK);
  auto topk_ids = *backend.Alloc(gemma::DType::kI32, t * kTopK);
  backend.Write(*topk_ids, ids.data(), ids.size() * sizeof(int32_t));
  auto topk_weights = *backend.Alloc(gemma::DType::kF32, t * kTopK);
  backend.Write(*topk_weights, weights.data(), weights.size() * sizeof(float));
  auto out = *backend.Alloc(gemma::DType::kF32, t * kHidden);

  int64_t layer = 0;
  for (auto _ : state) {
    gemma::MoeExpertsArgs a{.x = x.get(), .topk_ids = topk_ids.get(),
                            .topk_weights = topk_weights.get(), .gate_up = gate_up[layer].get(),
                            .down = down[layer].get(), .num_tokens = t, .hidden = kHidden,
                            .inter = kInter, .top_k = kTopK, .first_expert = 0,
                            .num_local_experts = kExperts, .out = out.get()};
    backend.MoeExperts(a);
    layer = (layer + 1) % kLayers;
  }
  const double expert_bytes = 3.0 * kInter * kHidden * sizeof(float);
  state.counters["experts"] = static_cast<double>(used.size());
  state.counters["GB/s"] =
      benchmark::Counter(static_cast<double>(used.size()) * expert_bytes * 1e-9,
                         benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GMAC/s"] =
      benchmark::Counter(static_cast<double>(t * kTopK) * 3 * kInter * kHidden * 1e-9,
                         benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_MoeExperts)
    ->ArgNames({"tokens", "whole"})
    ->ArgsProduct({{1, 8, 32}, {0, 1}})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
