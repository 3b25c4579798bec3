// The cost of a /metrics scrape at the real model's shape: 30 MoE layers x 128 experts, with
// replicas of 1 and 8 expert ranks registered and a window of counts from each, with and
// without the per-expert series (--metrics-per-expert).
#include <random>
#include <string>

#include "benchmark/benchmark.h"
#include "coordinator/metrics.h"
#include "coordinator/registry.h"

namespace gemma::coordinator {
namespace {

constexpr int kLayers = 30;
constexpr int kExperts = 128;

void FillRegistry(Registry& registry, int replicas) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int64_t> count(0, 5000);
  for (int r = 0; r < replicas; ++r) {
    gemma::internal::v1::RegisterRequest reg;
    reg.set_protocol_version(1);
    reg.set_model_fingerprint("0123456789abcdef");
    reg.set_address("127.0.0.1:" + std::to_string(40000 + r));
    reg.set_vocab_size(262144);
    reg.set_max_context(262144);
    reg.set_world_size(r % 2 == 0 ? 1 : 8);
    auto id = registry.Register(reg);
    if (!id.ok()) continue;
    gemma::internal::v1::HeartbeatRequest beat;
    beat.set_replica_id(*id);
    auto* window = beat.add_expert_windows();
    window->set_num_layers(kLayers);
    window->set_num_experts(kExperts);
    window->set_expert_ranks(r % 2 == 0 ? 1 : 8);
    for (int i = 0; i < kLayers * kExperts; ++i) window->add_counts(count(rng));
    window->set_first_step(1);
    window->set_last_step(100);
    window->set_windows(1);
    registry.Heartbeat(beat);
  }
}

void BM_Scrape(benchmark::State& state) {
  Registry registry(RegistryOptions{});
  FillRegistry(registry, static_cast<int>(state.range(0)));
  Metrics metrics(&registry, state.range(1) != 0);
  size_t bytes = 0;
  for (auto _ : state) {
    std::string text = metrics.Scrape();
    bytes = text.size();
    benchmark::DoNotOptimize(text);
  }
  state.counters["bytes"] = static_cast<double>(bytes);
}
BENCHMARK(BM_Scrape)
    ->ArgNames({"replicas", "per_expert"})
    ->Args({2, 0})
    ->Args({2, 1})
    ->Args({8, 0})
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace gemma::coordinator

BENCHMARK_MAIN();
