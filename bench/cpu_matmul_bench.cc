// Few-row products of the CPU backend (CpuBackend::MatMul, F32 weights) at the shapes of
// batched decode on the engine-core benchmark model: 32 rows through the dense projections and
// about 4 through each expert. One thread; the weights cycle through enough copies (256 MiB) that
// each call reads them from memory, as decode does. Reports multiply-adds per second.
//   bin/cpu_matmul_bench [--benchmark_filter=...]
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "benchmark/benchmark.h"
#include "worker/backend/cpu/cpu_backend.h"

namespace {

constexpr int64_t kColdBytes = int64_t{256} << 20;

// Args: rows of x (m), weight rows (n), row length (k).
void BM_MatMulF32(benchmark::State& state) {
  const int64_t m = state.range(0), n = state.range(1), k = state.range(2);
  gemma::CpuBackend backend(gemma::CpuBackendOptions{.num_threads = 1});
  const int64_t copies = std::max<int64_t>(1, kColdBytes / (n * k * 4));
  std::vector<float> host(copies * n * k);
  for (size_t i = 0; i < host.size(); ++i) host[i] = std::sin(0.001 * static_cast<double>(i));
  auto w = *backend.UploadWeight(gemma::DType::kF32, host.data(), copies * n * k);
  std::vector<float> xs(m * k);
  for (size_t i = 0; i < xs.size(); ++i) xs[i] = std::cos(0.01 * static_cast<double>(i));
  auto x = *backend.Alloc(gemma::DType::kF32, m * k);
  backend.Write(*x, xs.data(), xs.size() * sizeof(float));
  auto y = *backend.Alloc(gemma::DType::kF32, m * n);
  int64_t copy = 0;
  for (auto _ : state) {
    backend.MatMul(*x, *w, m, n, k, *y, copy * n);
    copy = (copy + 1) % copies;
  }
  state.counters["GMAC/s"] = benchmark::Counter(static_cast<double>(m * n * k) * 1e-9,
                                                benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_MatMulF32)
    ->Args({32, 2048, 1024})   // dense MLP gate/up
    ->Args({32, 1024, 2048})   // full-attention output projection
    ->Args({8, 2048, 1024})    // 8 sequences
    ->Args({4, 512, 1024})     // expert gate/up, 4 tokens
    ->Args({4, 1024, 256})     // expert down, 4 tokens
    ->Args({3, 1024, 256})     // expert down, 3 tokens
    ->Args({2, 1024, 256})     // expert down, 2 tokens
    ->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
