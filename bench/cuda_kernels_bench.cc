// CUDA backend kernels at Gemma 4 decode shapes, timed with CUDA events, each next to its
// memory-bandwidth floor (bytes that must move / peak bandwidth; GEMMA_PEAK_GBPS, default
// 3350 GB/s, an H100 SXM). Needs a GPU: every benchmark reports an error and stops without one.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "worker/backend/cuda/cuda_backend.h"

namespace gemma {
namespace {

double PeakBytesPerSecond() {
  const char* env = std::getenv("GEMMA_PEAK_GBPS");
  return (env != nullptr ? std::atof(env) : 3350.0) * 1e9;
}

CudaBackend* Backend() {
  static std::unique_ptr<CudaBackend> backend = [] {
    std::unique_ptr<CudaBackend> b;
    if (CudaBackend::DeviceCount() == 0) return b;
    CudaBackendOptions options;
    options.arena_bytes = size_t{8} << 30;
    auto created = CudaBackend::Create(options);
    if (created.ok()) b = *std::move(created);
    return b;
  }();
  return backend.get();
}

BufferPtr RandomBuffer(CudaBackend& b, DType dtype, int64_t n) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  if (dtype == DType::kBF16) {
    std::vector<uint16_t> v(n);
    for (auto& x : v) x = F32ToBf16(dist(rng));
    return *b.UploadWeight(DType::kBF16, v.data(), n);
  }
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return *b.UploadWeight(DType::kF32, v.data(), n);
}

// Times `op` per iteration with events; sets the floor counters from `bytes`.
template <typename Op>
void Time(benchmark::State& state, CudaBackend& b, double bytes, Op op) {
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  op();  // warm-up (plans, attributes)
  for (auto _ : state) {
    cudaEventRecord(start, b.stream());
    op();
    cudaEventRecord(stop, b.stream());
    cudaEventSynchronize(stop);
    float ms = 0.0f;
    cudaEventElapsedTime(&ms, start, stop);
    state.SetIterationTime(ms / 1e3);
  }
  if (!b.Synchronize().ok()) state.SkipWithError("CUDA error");
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  state.counters["floor_us"] = bytes / PeakBytesPerSecond() * 1e6;
  state.counters["bytes"] = bytes;
}

#define GEMMA_NEED_GPU(b)                                  \
  CudaBackend* b = Backend();                              \
  if (b == nullptr) {                                      \
    state.SkipWithError("no CUDA device present");        \
    return;                                                \
  }

// Decode matrix product: [m, k] x [n, k]^T with bf16 weights (31B q_proj-like: 5376 -> 8192).
void BM_MatMulBf16(benchmark::State& state) {
  GEMMA_NEED_GPU(b);
  const int64_t m = state.range(0), n = 8192, k = 5376;
  auto x = RandomBuffer(*b, DType::kF32, m * k);
  auto w = RandomBuffer(*b, DType::kBF16, n * k);
  auto y = *b->Alloc(DType::kF32, m * n);
  Time(state, *b, 2.0 * n * k + 4.0 * m * (k + n), [&] { b->MatMul(*x, *w, m, n, k, *y); });
}
BENCHMARK(BM_MatMulBf16)->Arg(1)->Arg(8)->Arg(64)->UseManualTime();

void BM_AddRmsNorm(benchmark::State& state) {
  GEMMA_NEED_GPU(b);
  const int64_t rows = state.range(0), dim = 5376;
  auto res = RandomBuffer(*b, DType::kF32, rows * dim);
  auto x = RandomBuffer(*b, DType::kF32, rows * dim);
  auto w = RandomBuffer(*b, DType::kBF16, dim);
  Time(state, *b, 12.0 * rows * dim, [&] { b->AddRmsNorm(*res, *x, *w, nullptr, rows, dim, 1e-6f); });
}
BENCHMARK(BM_AddRmsNorm)->Arg(1)->Arg(64)->UseManualTime();

// Decode attention of one sequence of `len` cached tokens, 32 heads over `kv` KV heads.
void BM_AttentionDecode(benchmark::State& state) {
  GEMMA_NEED_GPU(b);
  const int64_t d = state.range(0), len = state.range(1), heads = 32, kv = d == 512 ? 4 : 16;
  const int64_t page = 16, pages = (len + page - 1) / page;
  const bool k_eq_v = d == 512;
  auto q = RandomBuffer(*b, DType::kF32, heads * d);
  auto v_cache = RandomBuffer(*b, DType::kF32, pages * page * kv * d);
  auto k_cache = k_eq_v ? nullptr : RandomBuffer(*b, DType::kF32, pages * page * kv * d);
  auto k_norm = RandomBuffer(*b, DType::kBF16, d);
  auto out = *b->Alloc(DType::kF32, heads * d);
  std::vector<int32_t> table(pages);
  std::iota(table.begin(), table.end(), 0);
  std::vector<int32_t> pos{static_cast<int32_t>(len - 1)}, qs{0, 1}, lens{static_cast<int32_t>(len)};
  auto positions = *b->Alloc(DType::kI32, 1), query_start = *b->Alloc(DType::kI32, 2),
       seq_lens = *b->Alloc(DType::kI32, 1), page_table = *b->Alloc(DType::kI32, pages);
  b->Write(*positions, pos.data(), 4);
  b->Write(*query_start, qs.data(), 8);
  b->Write(*seq_lens, lens.data(), 4);
  b->Write(*page_table, table.data(), pages * 4);
  BatchLayout layout;
  layout.num_tokens = 1;
  layout.num_seqs = 1;
  layout.max_pages_per_seq = pages;
  layout.positions = positions.get();
  layout.query_start = query_start.get();
  layout.seq_lens = seq_lens.get();
  layout.page_tables[0] = layout.page_tables[1] = page_table.get();
  layout.host_query_start = qs;
  layout.host_seq_lens = lens;
  AttentionArgs a;
  a.layout = &layout;
  a.q = q.get();
  a.k_cache = k_cache.get();
  a.v_cache = v_cache.get();
  a.k_norm_weight = k_norm.get();
  a.rope = RopeSpec{d, d == 512 ? 64 : d / 2, 1e6, 1.0};
  a.num_heads = heads;
  a.num_kv_heads = kv;
  a.head_dim = d;
  a.page_size = page;
  a.out = out.get();
  const double bytes = 4.0 * len * kv * d * (k_eq_v ? 1 : 2);
  Time(state, *b, bytes, [&] { b->Attention(a); });
}
BENCHMARK(BM_AttentionDecode)->Args({256, 1024})->Args({512, 4096})->Args({512, 32768})
    ->UseManualTime();

// 26B-A4B expert layer at decode: 128 experts, top-8, hidden 2816, expert width 704, bf16.
void BM_MoeExpertsDecode(benchmark::State& state) {
  GEMMA_NEED_GPU(b);
  const int64_t tokens = state.range(0), hidden = 2816, inter = 704, experts = 128, top_k = 8;
  auto gate_up = RandomBuffer(*b, DType::kBF16, experts * 2 * inter * hidden);
  auto down = RandomBuffer(*b, DType::kBF16, experts * hidden * inter);
  auto x = RandomBuffer(*b, DType::kF32, tokens * hidden);
  auto w = RandomBuffer(*b, DType::kF32, tokens * top_k);
  std::vector<int32_t> ids(tokens * top_k);
  for (int64_t i = 0; i < tokens * top_k; ++i) ids[i] = static_cast<int32_t>((i * 37) % experts);
  for (int64_t t = 0; t < tokens; ++t) std::sort(ids.begin() + t * top_k, ids.begin() + (t + 1) * top_k);
  auto id = *b->Alloc(DType::kI32, tokens * top_k);
  b->Write(*id, ids.data(), ids.size() * 4);
  auto out = *b->Alloc(DType::kF32, tokens * hidden);
  MoeExpertsArgs a;
  a.x = x.get();
  a.topk_ids = id.get();
  a.topk_weights = w.get();
  a.gate_up = gate_up.get();
  a.down = down.get();
  a.num_tokens = tokens;
  a.hidden = hidden;
  a.inter = inter;
  a.top_k = top_k;
  a.num_local_experts = experts;
  a.out = out.get();
  const double bytes = 2.0 * std::min<int64_t>(experts, tokens * top_k) * 3 * inter * hidden;
  Time(state, *b, bytes, [&] { b->MoeExperts(a); });
}
BENCHMARK(BM_MoeExpertsDecode)->Arg(1)->Arg(8)->UseManualTime();

void BM_SampleGreedy(benchmark::State& state) {
  GEMMA_NEED_GPU(b);
  const int64_t rows = state.range(0), vocab = 262144;
  auto logits = RandomBuffer(*b, DType::kF32, rows * vocab);
  auto ids = *b->Alloc(DType::kI32, rows);
  std::vector<SamplingParams> params(rows);
  Time(state, *b, 4.0 * rows * vocab, [&] { b->Sample(*logits, rows, vocab, params, *ids); });
}
BENCHMARK(BM_SampleGreedy)->Arg(1)->Arg(32)->UseManualTime();

}  // namespace
}  // namespace gemma

BENCHMARK_MAIN();
