// CUDA backend kernels at Gemma 4 decode shapes, timed with CUDA events, each next to a floor
// measured on the device it runs on. At start-up the program measures
//   - the device-to-device copy bandwidth: bytes read plus bytes written per second of a
//     1 GiB cudaMemcpyAsync, the fastest of 20 copies (as BM_CopyDeviceToDevice does), and
//   - the bf16 matrix rate: FLOPs per second of an 8192 x 8192 x 8192 bf16 product through
//     cuBLASLt (f32 accumulation, bf16 output), the fastest of 20 (as BM_GemmBf16Lt does),
// prints both, and records them in the benchmark context (JSON "context": copy_GBps,
// bf16_TFLOPs). Every benchmark then reports these counters:
//   bytes     bytes the operation must move at least (weights, caches, inputs and outputs)
//   flops     floating-point operations (2 per multiply-add), where it computes
//   floor_us  max(bytes / measured bandwidth, flops / measured rate), in microseconds
//   vs_floor  the mean time of one operation over floor_us (1.0 = at the floor)
//   GBps      achieved bytes per second (bytes / mean time), in GB/s
//   TFLOPs    achieved FLOPs per second, where flops is set
// Needs a GPU: without one it says so and exits 1.
#include <benchmark/benchmark.h>
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/dtype.h"
#include "common/status_macros.h"
#include "worker/backend/cuda/cuda_backend.h"

namespace gemma {
namespace {

constexpr int64_t kCopyMiB = 1024;   // the copy measured at start-up
constexpr int64_t kGemmSize = 8192;  // m = n = k of the product measured at start-up
constexpr int kFloorReps = 20;

// A backend with `options`, or null (saying why) where none can be made.
std::unique_ptr<CudaBackend> MakeBackend(const CudaBackendOptions& options) {
  if (CudaBackend::DeviceCount() == 0) return nullptr;
  auto created = CudaBackend::Create(options);
  if (!created.ok()) {
    std::fprintf(stderr, "cuda_kernels_bench: %s\n", created.status().ToString().c_str());
    return nullptr;
  }
  return *std::move(created);
}

CudaBackend* SharedBackend() {
  static std::unique_ptr<CudaBackend> backend = [] {
    CudaBackendOptions options;
    options.arena_bytes = size_t{8} << 30;
    return MakeBackend(options);
  }();
  return backend.get();
}

void* Ptr(Buffer& b) { return static_cast<CudaBuffer&>(b).data(); }

// splitmix64: a fast seeded generator for filling large buffers.
uint64_t Mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Uniform in [-1, 1) from 24 random bits.
float Uniform(uint64_t bits) {
  return static_cast<float>(bits & 0xFFFFFF) * (2.0f / 16777216.0f) - 1.0f;
}

BufferPtr RandomBuffer(CudaBackend& b, DType dtype, int64_t n, uint64_t seed = 7) {
  if (dtype == DType::kBF16) {
    std::vector<uint16_t> v(n);
    for (int64_t i = 0; i < n; ++i) v[i] = F32ToBf16(Uniform(Mix(seed * 0x100000001ull + i)));
    return *b.UploadWeight(DType::kBF16, v.data(), n);
  }
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = Uniform(Mix(seed * 0x100000001ull + i));
  return *b.UploadWeight(DType::kF32, v.data(), n);
}

// What one operation must do at least.
struct Work {
  double bytes = 0;
  double flops = 0;
};

// Measured at start-up (main); zero until then.
struct Floors {
  double bytes_per_s = 0;
  double flops_per_s = 0;
};
Floors g_floors;

void SetFloorCounters(benchmark::State& state, const Work& work, double mean_s) {
  double floor_s = 0;
  if (g_floors.bytes_per_s > 0) floor_s = std::max(floor_s, work.bytes / g_floors.bytes_per_s);
  if (g_floors.flops_per_s > 0) floor_s = std::max(floor_s, work.flops / g_floors.flops_per_s);
  state.counters["bytes"] = work.bytes;
  state.counters["floor_us"] = floor_s * 1e6;
  state.counters["vs_floor"] = floor_s > 0 ? mean_s / floor_s : 0.0;
  state.counters["GBps"] = mean_s > 0 ? work.bytes / mean_s / 1e9 : 0.0;
  if (work.flops > 0) {
    state.counters["flops"] = work.flops;
    state.counters["TFLOPs"] = mean_s > 0 ? work.flops / mean_s / 1e12 : 0.0;
  }
}

// A pair of events timing work on one stream.
class EventTimer {
 public:
  EventTimer() {
    cudaEventCreate(&start_);
    cudaEventCreate(&stop_);
  }
  ~EventTimer() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;

  // Seconds `op` took on `stream`; negative on a CUDA error.
  template <typename Op>
  double Seconds(cudaStream_t stream, Op op) {
    cudaEventRecord(start_, stream);
    op();
    cudaEventRecord(stop_, stream);
    if (cudaEventSynchronize(stop_) != cudaSuccess) return -1;
    float ms = 0.0f;
    if (cudaEventElapsedTime(&ms, start_, stop_) != cudaSuccess) return -1;
    return ms / 1e3;
  }

 private:
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

// Times `op` per iteration with events; sets the counters from `work` and the mean time.
template <typename Op>
void Time(benchmark::State& state, CudaBackend& b, const Work& work, Op op) {
  EventTimer timer;
  op();  // warm-up (plans, attributes)
  double total_s = 0;
  int64_t n = 0;
  for (auto _ : state) {
    const double s = timer.Seconds(b.stream(), op);
    if (s < 0) {
      state.SkipWithError("CUDA event error");
      break;
    }
    state.SetIterationTime(s);
    total_s += s;
    ++n;
  }
  if (!b.Synchronize().ok()) {
    state.SkipWithError("CUDA error");
    return;
  }
  SetFloorCounters(state, work, n > 0 ? total_s / static_cast<double>(n) : 0.0);
}

#define GEMMA_NEED_GPU(b)                          \
  CudaBackend* b = SharedBackend();                \
  if (b == nullptr) {                              \
    state.SkipWithError("no CUDA device present"); \
    return;                                        \
  }

// ---- the floors ----

// D[m, n] = A[m, k] . B[n, k]^T, all bf16 row-major, f32 accumulation, through cuBLASLt (in
// column-major terms D^T = B . A^T: "TN"). Buffers and workspace come from the backend's arena.
class LtGemm {
 public:
  static absl::StatusOr<std::unique_ptr<LtGemm>> Create(CudaBackend& b, int64_t m, int64_t n,
                                                        int64_t k) {
    std::unique_ptr<LtGemm> g(new LtGemm());
    auto check = [&](cublasStatus_t s, const char* what) -> absl::Status {
      if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
      return absl::InternalError(
          absl::StrCat(what, " failed with cuBLAS status ", s, " (m=", m, " n=", n, " k=", k, ")"));
    };
    g->a_ = RandomBuffer(b, DType::kBF16, m * k, 11);
    g->b_ = RandomBuffer(b, DType::kBF16, n * k, 12);
    ASSIGN_OR_RETURN(g->d_, b.Alloc(DType::kBF16, m * n));
    ASSIGN_OR_RETURN(g->ws_, b.Alloc(DType::kI32, static_cast<int64_t>(kWorkspace / 4)));
    RETURN_IF_ERROR(check(cublasLtCreate(&g->lt_), "cublasLtCreate"));
    RETURN_IF_ERROR(check(cublasLtMatmulDescCreate(&g->op_, CUBLAS_COMPUTE_32F, CUDA_R_32F),
                          "cublasLtMatmulDescCreate"));
    const cublasOperation_t trans = CUBLAS_OP_T;
    RETURN_IF_ERROR(check(
        cublasLtMatmulDescSetAttribute(g->op_, CUBLASLT_MATMUL_DESC_TRANSA, &trans, sizeof(trans)),
        "cublasLtMatmulDescSetAttribute"));
    // Column-major: the first operand is B as [k, n] (transposed to [n, k]), the second A^T
    // as [k, m], the result D^T as [n, m].
    RETURN_IF_ERROR(check(cublasLtMatrixLayoutCreate(&g->la_, CUDA_R_16BF, k, n, k),
                          "cublasLtMatrixLayoutCreate"));
    RETURN_IF_ERROR(check(cublasLtMatrixLayoutCreate(&g->lb_, CUDA_R_16BF, k, m, k),
                          "cublasLtMatrixLayoutCreate"));
    RETURN_IF_ERROR(check(cublasLtMatrixLayoutCreate(&g->ld_, CUDA_R_16BF, n, m, n),
                          "cublasLtMatrixLayoutCreate"));
    cublasLtMatmulPreference_t pref = nullptr;
    RETURN_IF_ERROR(check(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate"));
    const size_t workspace = kWorkspace;
    cublasStatus_t s = cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof(workspace));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    if (s == CUBLAS_STATUS_SUCCESS) {
      s = cublasLtMatmulAlgoGetHeuristic(g->lt_, g->op_, g->la_, g->lb_, g->ld_, g->ld_, pref, 1,
                                         &result, &found);
    }
    cublasLtMatmulPreferenceDestroy(pref);
    RETURN_IF_ERROR(check(s, "cublasLtMatmulAlgoGetHeuristic"));
    if (found == 0) {
      return absl::InternalError(
          absl::StrCat("cuBLASLt has no bf16 algorithm for m=", m, " n=", n, " k=", k));
    }
    g->algo_ = result.algo;
    return g;
  }

  ~LtGemm() {
    if (ld_ != nullptr) cublasLtMatrixLayoutDestroy(ld_);
    if (lb_ != nullptr) cublasLtMatrixLayoutDestroy(lb_);
    if (la_ != nullptr) cublasLtMatrixLayoutDestroy(la_);
    if (op_ != nullptr) cublasLtMatmulDescDestroy(op_);
    if (lt_ != nullptr) cublasLtDestroy(lt_);
  }

  bool Run(cudaStream_t stream) {
    const float alpha = 1.0f, beta = 0.0f;
    return cublasLtMatmul(lt_, op_, &alpha, Ptr(*b_), la_, Ptr(*a_), lb_, &beta, Ptr(*d_), ld_,
                          Ptr(*d_), ld_, &algo_, Ptr(*ws_), kWorkspace,
                          stream) == CUBLAS_STATUS_SUCCESS;
  }

 private:
  static constexpr size_t kWorkspace = size_t{32} << 20;
  LtGemm() = default;
  BufferPtr a_, b_, d_, ws_;
  cublasLtHandle_t lt_ = nullptr;
  cublasLtMatmulDesc_t op_ = nullptr;
  cublasLtMatrixLayout_t la_ = nullptr, lb_ = nullptr, ld_ = nullptr;
  cublasLtMatmulAlgo_t algo_{};
};

// Fastest of `reps` device-to-device copies of `bytes` (after two warm-ups), in seconds.
absl::StatusOr<double> FastestCopySeconds(CudaBackend& b, int64_t bytes, int reps) {
  ASSIGN_OR_RETURN(BufferPtr src, b.Alloc(DType::kI32, bytes / 4));
  ASSIGN_OR_RETURN(BufferPtr dst, b.Alloc(DType::kI32, bytes / 4));
  cudaMemsetAsync(Ptr(*src), 1, bytes, b.stream());
  EventTimer timer;
  auto copy = [&] {
    cudaMemcpyAsync(Ptr(*dst), Ptr(*src), bytes, cudaMemcpyDeviceToDevice, b.stream());
  };
  double best = -1;
  for (int i = 0; i < reps + 2; ++i) {
    const double s = timer.Seconds(b.stream(), copy);
    if (s <= 0)
      return absl::InternalError(
          absl::StrCat("device-to-device copy failed: ", cudaGetErrorString(cudaGetLastError())));
    if (i >= 2 && (best < 0 || s < best)) best = s;
  }
  return best;
}

// Fastest of `reps` m = n = k = `size` bf16 products, in seconds.
absl::StatusOr<double> FastestGemmSeconds(CudaBackend& b, int64_t size, int reps) {
  auto gemm = LtGemm::Create(b, size, size, size);
  if (!gemm.ok()) return gemm.status();
  EventTimer timer;
  bool ok = true;
  double best = -1;
  // 3 x reps warm-ups: the clocks rise from idle.
  for (int i = 0; i < 4 * reps; ++i) {
    const double s = timer.Seconds(b.stream(), [&] { ok = ok && (*gemm)->Run(b.stream()); });
    if (!ok || s <= 0) return absl::InternalError("cublasLtMatmul failed");
    if (i >= 3 * reps && (best < 0 || s < best)) best = s;
  }
  return best;
}

// ---- floors as benchmarks ----

// Device-to-device copy of `MiB`: bytes = read + written.
void BM_CopyDeviceToDevice(benchmark::State& state) {
  GEMMA_NEED_GPU(b);
  const int64_t bytes = state.range(0) << 20;
  auto src = *b->Alloc(DType::kI32, bytes / 4);
  auto dst = *b->Alloc(DType::kI32, bytes / 4);
  cudaMemsetAsync(Ptr(*src), 1, bytes, b->stream());
  Time(state, *b, Work{2.0 * static_cast<double>(bytes), 0}, [&] {
    cudaMemcpyAsync(Ptr(*dst), Ptr(*src), bytes, cudaMemcpyDeviceToDevice, b->stream());
  });
}
BENCHMARK(BM_CopyDeviceToDevice)->Arg(kCopyMiB)->Arg(64)->UseManualTime();

// bf16 x bf16 -> bf16 product of m = n = k through cuBLASLt, f32 accumulation.
void BM_GemmBf16Lt(benchmark::State& state) {
  GEMMA_NEED_GPU(b);
  const int64_t size = state.range(0);
  auto gemm = LtGemm::Create(*b, size, size, size);
  if (!gemm.ok()) {
    state.SkipWithError(std::string(gemm.status().message()).c_str());
    return;
  }
  const double s = static_cast<double>(size);
  bool ok = true;
  Time(state, *b, Work{2.0 * 3 * s * s, 2.0 * s * s * s},
       [&] { ok = ok && (*gemm)->Run(b->stream()); });
  if (!ok) state.SkipWithError("cublasLtMatmul failed");
}
BENCHMARK(BM_GemmBf16Lt)->Arg(kGemmSize)->Arg(4096)->UseManualTime();

// ---- kernels ----

// Matrix product through the backend: [m, k] f32 x [n, k]^T bf16 weights -> [m, n] f32 (gemv
// kernel up to 8 rows, cuBLASLt above). Shapes: 31B q_proj-like (5376 -> 8192), 26B-A4B
// q_proj (2816 -> 4096) and the 26B-A4B output head (2816 -> 262144).
void BM_MatMulBf16(benchmark::State& state) {
  GEMMA_NEED_GPU(b);
  const int64_t m = state.range(0), n = state.range(1), k = state.range(2);
  auto x = RandomBuffer(*b, DType::kF32, m * k);
  auto w = RandomBuffer(*b, DType::kBF16, n * k);
  auto y = *b->Alloc(DType::kF32, m * n);
  const Work work{2.0 * n * k + 4.0 * m * (k + n), 2.0 * m * n * k};
  Time(state, *b, work, [&] { b->MatMul(*x, *w, m, n, k, *y); });
}
BENCHMARK(BM_MatMulBf16)
    ->ArgNames({"m", "n", "k"})
    ->Args({1, 8192, 5376})
    ->Args({8, 8192, 5376})
    ->Args({64, 8192, 5376})
    ->Args({1, 4096, 2816})
    ->Args({32, 4096, 2816})
    ->Args({1, 262144, 2816})
    ->Args({32, 262144, 2816})
    ->UseManualTime();

void BM_AddRmsNorm(benchmark::State& state) {
  GEMMA_NEED_GPU(b);
  const int64_t rows = state.range(0), dim = 5376;
  auto res = RandomBuffer(*b, DType::kF32, rows * dim);
  auto x = RandomBuffer(*b, DType::kF32, rows * dim);
  auto w = RandomBuffer(*b, DType::kBF16, dim);
  // Reads residual and x, writes residual (f32), reads the bf16 weight; 5 flops per element.
  const Work work{12.0 * rows * dim + 2.0 * dim, 5.0 * rows * dim};
  Time(state, *b, work, [&] { b->AddRmsNorm(*res, *x, *w, nullptr, rows, dim, 1e-6f); });
}
BENCHMARK(BM_AddRmsNorm)->Arg(1)->Arg(64)->UseManualTime();

// Decode attention of one sequence of `len` cached tokens, 32 heads over `kv` KV heads, over a
// cache of `cache_bytes` bytes an element: 2 (bf16, the CUDA backend's default) or 4 (f32).
// One sequence's step on the device: `tokens` queries at positions len - tokens .. len - 1 over
// cache pages 0 .. pages - 1, as the model uploads them; null after a CUDA error.
struct OneSequenceStep {
  BufferPtr positions, query_start, seq_lens, page_table;
  BatchLayout layout;
};
std::unique_ptr<OneSequenceStep> OneSequence(CudaBackend& b, int64_t tokens, int64_t len,
                                             int64_t pages) {
  auto step = std::make_unique<OneSequenceStep>();
  std::vector<int32_t> table(pages), pos(tokens);
  std::iota(table.begin(), table.end(), 0);
  std::iota(pos.begin(), pos.end(), static_cast<int32_t>(len - tokens));
  std::vector<int32_t> qs{0, static_cast<int32_t>(tokens)}, lens{static_cast<int32_t>(len)};
  step->positions = *b.Alloc(DType::kI32, tokens);
  step->query_start = *b.Alloc(DType::kI32, 2);
  step->seq_lens = *b.Alloc(DType::kI32, 1);
  step->page_table = *b.Alloc(DType::kI32, pages);
  b.Write(*step->positions, pos.data(), tokens * 4);
  b.Write(*step->query_start, qs.data(), 8);
  b.Write(*step->seq_lens, lens.data(), 4);
  b.Write(*step->page_table, table.data(), pages * 4);
  if (!b.Synchronize().ok()) return nullptr;  // the host vectors are the copies' sources
  BatchLayout& layout = step->layout;
  layout.num_tokens = tokens;
  layout.num_seqs = 1;
  layout.max_pages_per_seq = pages;
  layout.positions = step->positions.get();
  layout.query_start = step->query_start.get();
  layout.seq_lens = step->seq_lens.get();
  layout.page_tables[0] = layout.page_tables[1] = step->page_table.get();
  layout.host_query_start = qs;
  layout.host_seq_lens = lens;
  return step;
}

// Attention of `heads` query heads over `kv` KV heads of head_dim d on a step's layout; K is
// derived from V (with k_norm and rope) where k_cache is null.
AttentionArgs AttentionOver(const BatchLayout& layout, const Buffer& q, const Buffer* k_cache,
                            const Buffer& v_cache, const Buffer& k_norm, RopeSpec rope,
                            int64_t heads, int64_t kv, int64_t d, int64_t page, Buffer& out) {
  AttentionArgs a;
  a.layout = &layout;
  a.q = &q;
  a.k_cache = k_cache;
  a.v_cache = &v_cache;
  a.k_norm_weight = &k_norm;
  a.rope = rope;
  a.num_heads = heads;
  a.num_kv_heads = kv;
  a.head_dim = d;
  a.page_size = page;
  a.out = &out;
  return a;
}

void BM_AttentionDecode(benchmark::State& state) {
  GEMMA_NEED_GPU(b);
  const int64_t d = state.range(0), len = state.range(1), heads = 32, kv = d == 512 ? 4 : 16;
  const int64_t cache_bytes = state.range(2);
  const DType cache_dtype = cache_bytes == 2 ? DType::kBF16 : DType::kF32;
  state.SetLabel(cache_bytes == 2 ? "bf16 cache" : "f32 cache");
  const int64_t page = 16, pages = (len + page - 1) / page;
  const bool k_eq_v = d == 512;
  auto q = RandomBuffer(*b, DType::kF32, heads * d);
  auto v_cache = RandomBuffer(*b, cache_dtype, pages * page * kv * d);
  auto k_cache = k_eq_v ? nullptr : RandomBuffer(*b, cache_dtype, pages * page * kv * d);
  auto k_norm = RandomBuffer(*b, DType::kBF16, d);
  auto out = *b->Alloc(DType::kF32, heads * d);
  std::unique_ptr<OneSequenceStep> step = OneSequence(*b, 1, len, pages);
  if (step == nullptr) {
    state.SkipWithError("CUDA error");
    return;
  }
  const AttentionArgs a =
      AttentionOver(step->layout, *q, k_cache.get(), *v_cache, *k_norm,
                    RopeSpec{d, d == 512 ? 64 : d / 2, 1e6, 1.0}, heads, kv, d, page, *out);
  // The cached keys and values (on k_eq_v layers K is derived from V), plus q and out (f32).
  const Work work{static_cast<double>(cache_bytes) * len * kv * d * (k_eq_v ? 1 : 2) +
                      8.0 * heads * d,
                  4.0 * heads * len * d};
  Time(state, *b, work, [&] { b->Attention(a); });
}
// Each shape over the bf16 cache the backend keeps, then over an f32 cache for comparison.
BENCHMARK(BM_AttentionDecode)
    ->Args({256, 1024, 2})
    ->Args({512, 4096, 2})
    ->Args({512, 32768, 2})
    ->Args({256, 1024, 4})
    ->Args({512, 4096, 4})
    ->Args({512, 32768, 4})
    ->UseManualTime();

// A backend whose prefill attention takes the tensor-core kernel (tensor_core_attention), for
// BM_AttentionPrefill; created on first use.
CudaBackend* TensorCoreBackend() {
  static std::unique_ptr<CudaBackend> backend = [] {
    CudaBackendOptions options;
    options.arena_bytes = size_t{2} << 30;
    options.tensor_core_attention = true;
    return MakeBackend(options);
  }();
  return backend.get();
}

// Prefill attention of one 8192-token prompt (positions 0 .. 8191) over a bf16 cache at the
// 26B-A4B's shapes: range(0) 0 is a sliding layer (16 query heads over 8 KV heads, head_dim
// 256, window 1024, K and V cached), 1 a full layer (16 over 2, head_dim 512, K derived from
// V); range(1) 0 runs the f32 kernel (PagedAttention), 1 the tensor-core kernel
// (PrefillAttention), so the two sit side by side. flops counts the two products over the keys
// each query sees (4 x heads x head_dim a query-key pair), bytes the queries and outputs (f32)
// and the cache read once; the floor is the larger of the two at the measured rates (the bf16
// rate is the tensor-core kernel's ceiling; the f32 kernel has none so near).
void BM_AttentionPrefill(benchmark::State& state) {
  GEMMA_NEED_GPU(shared);
  const bool full = state.range(0) == 1, tensor_core = state.range(1) == 1;
  CudaBackend* b = tensor_core ? TensorCoreBackend() : shared;
  if (b == nullptr) {
    state.SkipWithError("no tensor-core backend");
    return;
  }
  const int64_t tokens = 8192, heads = 16, kv = full ? 2 : 8, d = full ? 512 : 256;
  const int64_t window = full ? 0 : 1024, page = 16, pages = tokens / page;
  state.SetLabel(absl::StrCat(full ? "full, K = V" : "sliding", ", ",
                              tensor_core ? "tensor-core kernel" : "f32 kernel"));
  // Queries, keys and values uniform in [-1, 1): the timing does not depend on the values.
  auto q = RandomBuffer(*b, DType::kF32, tokens * heads * d);
  auto v_cache = RandomBuffer(*b, DType::kBF16, pages * page * kv * d, 11);
  auto k_cache = full ? nullptr : RandomBuffer(*b, DType::kBF16, pages * page * kv * d, 13);
  auto k_norm = RandomBuffer(*b, DType::kBF16, d, 17);
  auto out = *b->Alloc(DType::kF32, tokens * heads * d);
  std::unique_ptr<OneSequenceStep> step = OneSequence(*b, tokens, tokens, pages);
  if (step == nullptr) {
    state.SkipWithError("CUDA error");
    return;
  }
  AttentionArgs a = AttentionOver(step->layout, *q, k_cache.get(), *v_cache, *k_norm,
                                  RopeSpec{d, full ? 64 : d / 2, full ? 1e6 : 1e4, 1.0}, heads,
                                  kv, d, page, *out);
  a.window = window;
  double pairs = 0;  // query-key pairs: each query sees min(position + 1, window) keys
  for (int64_t t = 0; t < tokens; ++t) pairs += window > 0 ? std::min(t + 1, window) : t + 1;
  const Work work{8.0 * tokens * heads * d + 2.0 * tokens * kv * d * (full ? 1 : 2),
                  4.0 * heads * d * pairs};
  const auto paths = b->attention_paths();
  Time(state, *b, work, [&] { b->Attention(a); });
  if (tensor_core && b->attention_paths().tensor_core == paths.tensor_core) {
    state.SkipWithError("the tensor-core kernel did not run");
  }
}
BENCHMARK(BM_AttentionPrefill)
    ->Args({0, 0})
    ->Args({0, 1})
    ->Args({1, 0})
    ->Args({1, 1})
    ->UseManualTime()
    ->Iterations(3);

// The 26B-A4B's expert layer on `b`: 128 experts, top-8, hidden 2816, expert width 704, bf16
// weights, `tokens` tokens whose ids are spread evenly over the experts (ascending per token).
struct ExpertLayer {
  BufferPtr x, w, id, out;
  MoeExpertsArgs args;
  Work work;  // the weights of every expert some token uses, the f32 rows in and out
};
std::unique_ptr<ExpertLayer> MakeExpertLayer(CudaBackend& b, int64_t tokens) {
  const int64_t hidden = 2816, inter = 704, experts = 128, top_k = 8;
  // The 1.5 GB of weights are made once per backend (on the host: seconds) and kept; the
  // buffers share their backend's memory region, so they may outlive it at exit.
  static std::map<CudaBackend*, std::pair<BufferPtr, BufferPtr>> weights;
  auto& [gate_up, down] = weights[&b];
  if (gate_up == nullptr) {
    gate_up = RandomBuffer(b, DType::kBF16, experts * 2 * inter * hidden);
    down = RandomBuffer(b, DType::kBF16, experts * hidden * inter);
  }
  auto layer = std::make_unique<ExpertLayer>();
  layer->x = RandomBuffer(b, DType::kF32, tokens * hidden);
  layer->w = RandomBuffer(b, DType::kF32, tokens * top_k);
  std::vector<int32_t> ids(tokens * top_k);
  for (int64_t i = 0; i < tokens * top_k; ++i) ids[i] = static_cast<int32_t>((i * 37) % experts);
  for (int64_t t = 0; t < tokens; ++t)
    std::sort(ids.begin() + t * top_k, ids.begin() + (t + 1) * top_k);
  std::vector<int32_t> distinct = ids;
  std::sort(distinct.begin(), distinct.end());
  const int64_t used = std::unique(distinct.begin(), distinct.end()) - distinct.begin();
  layer->id = *b.Alloc(DType::kI32, tokens * top_k);
  b.Write(*layer->id, ids.data(), ids.size() * 4);
  if (!b.Synchronize().ok()) return nullptr;  // `ids` dies here
  layer->out = *b.Alloc(DType::kF32, tokens * hidden);
  MoeExpertsArgs& a = layer->args;
  a.x = layer->x.get();
  a.topk_ids = layer->id.get();
  a.topk_weights = layer->w.get();
  a.gate_up = gate_up.get();
  a.down = down.get();
  a.num_tokens = tokens;
  a.hidden = hidden;
  a.inter = inter;
  a.top_k = top_k;
  a.num_local_experts = experts;
  a.out = layer->out.get();
  layer->work = Work{2.0 * used * 3 * inter * hidden + 8.0 * tokens * hidden,
                     2.0 * tokens * top_k * 3 * inter * hidden};
  return layer;
}

void BM_MoeExpertsDecode(benchmark::State& state) {
  GEMMA_NEED_GPU(b);
  std::unique_ptr<ExpertLayer> layer = MakeExpertLayer(*b, state.range(0));
  if (layer == nullptr) {
    state.SkipWithError("CUDA error");
    return;
  }
  Time(state, *b, layer->work, [&] { b->MoeExperts(layer->args); });
}
BENCHMARK(BM_MoeExpertsDecode)->Arg(1)->Arg(8)->Arg(32)->UseManualTime();

// A backend whose expert products of many tokens are scheduled on the device
// (device_scheduled_experts), for BM_MoeExpertsPrefill; created on first use.
CudaBackend* ScheduledExpertsBackend() {
  static std::unique_ptr<CudaBackend> backend = [] {
    CudaBackendOptions options;
    options.arena_bytes = size_t{6} << 30;
    options.device_scheduled_experts = true;
    return MakeBackend(options);
  }();
  return backend.get();
}

// The expert layer at prefill sizes (range(0) tokens), range(1) 0 on the default path (the
// counts read back, then cuBLAS's grouped GEMM or one cuBLASLt product per expert, whichever
// this cuBLAS offers) and 1 on the device-scheduled MoeGroupedGemm, side by side. The floor's
// flops term (the products at the measured bf16 rate) is what both approach at 8K tokens.
void BM_MoeExpertsPrefill(benchmark::State& state) {
  GEMMA_NEED_GPU(shared);
  const bool scheduled = state.range(1) == 1;
  CudaBackend* b = scheduled ? ScheduledExpertsBackend() : shared;
  if (b == nullptr) {
    state.SkipWithError("no backend with device-scheduled experts");
    return;
  }
  std::unique_ptr<ExpertLayer> layer = MakeExpertLayer(*b, state.range(0));
  if (layer == nullptr) {
    state.SkipWithError("CUDA error");
    return;
  }
  const auto before = b->moe_paths();
  Time(state, *b, layer->work, [&] { b->MoeExperts(layer->args); });
  const auto after = b->moe_paths();
  state.SetLabel(scheduled ? "device-scheduled MoeGroupedGemm"
                 : after.grouped > before.grouped ? "cuBLAS grouped GEMM"
                                                  : "cuBLASLt per expert");
  if (scheduled && after.scheduled == before.scheduled) {
    state.SkipWithError("the device-scheduled path did not run");
  }
}
BENCHMARK(BM_MoeExpertsPrefill)
    ->Args({128, 0})
    ->Args({128, 1})
    ->Args({1024, 0})
    ->Args({1024, 1})
    ->Args({8192, 0})
    ->Args({8192, 1})
    ->UseManualTime();

void BM_SampleGreedy(benchmark::State& state) {
  GEMMA_NEED_GPU(b);
  const int64_t rows = state.range(0), vocab = 262144;
  auto logits = RandomBuffer(*b, DType::kF32, rows * vocab);
  auto ids = *b->Alloc(DType::kI32, rows);
  std::vector<SamplingParams> params(rows);
  Time(state, *b, Work{4.0 * rows * vocab, 0},
       [&] { b->Sample(*logits, rows, vocab, params, *ids); });
}
BENCHMARK(BM_SampleGreedy)->Arg(1)->Arg(32)->UseManualTime();

}  // namespace
}  // namespace gemma

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  gemma::CudaBackend* b = gemma::SharedBackend();
  if (b == nullptr) {
    std::fprintf(stderr,
                 "cuda_kernels_bench: no usable CUDA device (none visible to this process, or "
                 "the backend failed to start); nothing to measure\n");
    return 1;
  }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  absl::StatusOr<double> copy_s =
      gemma::FastestCopySeconds(*b, gemma::kCopyMiB << 20, gemma::kFloorReps);
  absl::StatusOr<double> gemm_s =
      gemma::FastestGemmSeconds(*b, gemma::kGemmSize, gemma::kFloorReps);
  if (!copy_s.ok() || !gemm_s.ok()) {
    std::fprintf(stderr, "cuda_kernels_bench: measuring the floors failed: %s\n",
                 (!copy_s.ok() ? copy_s.status() : gemm_s.status()).ToString().c_str());
    return 1;
  }
  const double g = static_cast<double>(gemma::kGemmSize);
  gemma::g_floors.bytes_per_s = 2.0 * static_cast<double>(gemma::kCopyMiB << 20) / *copy_s;
  gemma::g_floors.flops_per_s = 2.0 * g * g * g / *gemm_s;
  const std::string copy_gbps = absl::StrFormat("%.1f", gemma::g_floors.bytes_per_s / 1e9);
  const std::string gemm_tflops = absl::StrFormat("%.1f", gemma::g_floors.flops_per_s / 1e12);
  std::printf(
      "device: %s (%d SMs, %.1f GiB)\n"
      "measured copy bandwidth: %s GB/s (device-to-device copy of %lld MiB, bytes read + "
      "written, fastest of %d)\n"
      "measured bf16 matrix rate: %s TFLOP/s (cuBLASLt %lldx%lldx%lld, f32 accumulation, "
      "fastest of %d)\n"
      "floor_us = max(bytes / bandwidth, flops / rate); vs_floor = mean time / floor_us\n",
      prop.name, prop.multiProcessorCount,
      static_cast<double>(prop.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0), copy_gbps.c_str(),
      static_cast<long long>(gemma::kCopyMiB), gemma::kFloorReps, gemm_tflops.c_str(),
      static_cast<long long>(gemma::kGemmSize), static_cast<long long>(gemma::kGemmSize),
      static_cast<long long>(gemma::kGemmSize), gemma::kFloorReps);
  std::fflush(stdout);
  benchmark::AddCustomContext("device", prop.name);
  benchmark::AddCustomContext("copy_GBps", copy_gbps);
  benchmark::AddCustomContext("bf16_TFLOPs", gemm_tflops);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
