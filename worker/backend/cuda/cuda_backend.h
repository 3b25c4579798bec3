// The CUDA backend: every Backend op on one CUDA stream, kernels from kernels/ and cuBLASLt /
// cuBLAS for matrix products. Device memory is one arena taken at start-up (plain cudaMalloc)
// and carved by DeviceArena; buffers are arena blocks or views of them. Errors from launches and
// library calls are sticky Statuses with file and line, reported by Synchronize() and Read().
// Decode steps can be captured once per batch-size bucket as CUDA graphs and replayed.
// Not thread-safe: one thread drives a backend.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/kernel_types.h"
#include "worker/backend/backend.h"
#include "worker/backend/cuda/device_arena.h"

namespace gemma {

struct CudaBackendOptions {
  int device = 0;
  // Bytes of the arena; 0 takes `arena_fraction` of the device's free memory.
  size_t arena_bytes = 0;
  double arena_fraction = 0.9;
  // cuBLASLt workspace carved from the arena.
  size_t blas_workspace_bytes = size_t{32} << 20;
  // Keep activations in f32 in every product with bf16 weights: prompts of more than
  // kernels::kGemvMaxRows tokens go through the decode kernel in chunks of rows instead of
  // cuBLASLt's tensor cores (which take the activations rounded to bf16). Results then stay at
  // the fp32 reference's precision (and expert choices follow it) at several times the prefill
  // cost: for checks against the reference, not for serving.
  bool f32_products = false;
  // Element type of the KV cache (KvCacheDType(), which KvCache::Create allocates its pools
  // in): BF16 (the default; half the bytes of f32, written rounded to nearest even, widened to
  // f32 inside attention) or F32 (the CPU reference's: with f32_products the results then
  // follow it to its bound; the golden tests use it). Create refuses anything else. WriteKv and
  // Attention take caches of either type whatever this says.
  DType kv_dtype = DType::kBF16;
  // Attention of steps with many query tokens per sequence (prefill) on the tensor-core kernel
  // (kernels/prefill_attention.h: Q, K, V and the softmax weights rounded to bf16, f32
  // accumulation) instead of the f32 kernel. Ignored with f32_products, which keeps the f32
  // kernel for checks against the reference. Off by default: that kernel has not run on a
  // device yet, and it becomes the serving default only once the gpu tier has passed with it
  // on one (docs/perf.md).
  bool tensor_core_attention = false;
  // Expert products of steps with many tokens (prefill) on kernels/moe.h's MoeGroupedGemm
  // (bf16 weights only): the rows per expert are counted, scheduled and multiplied on the
  // device, with no host round trip per MoE layer, instead of reading the counts back for
  // cuBLAS's grouped GEMM (or one cuBLASLt product per expert where cuBLAS has none). Ignored
  // with f32_products. Off by default until the gpu tier has passed with it and the benchmark
  // has put it beside cuBLAS on a device (docs/perf.md).
  bool device_scheduled_experts = false;
};

// The device memory region and its allocator, shared by the backend and its buffers so that
// whichever is destroyed last frees the region.
struct DeviceRegion {
  DeviceRegion(void* base, size_t bytes) : base(base), arena(bytes) {}
  ~DeviceRegion();
  void* base;
  DeviceArena arena;
};

class CudaBuffer final : public Buffer {
 public:
  // An arena block (freed on destruction) or, with `region` null, a view.
  CudaBuffer(DType dtype, int64_t numel, void* data, std::shared_ptr<DeviceRegion> region,
             size_t offset);
  ~CudaBuffer() override;
  void* data() const { return data_; }
  float* f32() const { return static_cast<float*>(data_); }
  int32_t* i32() const { return static_cast<int32_t*>(data_); }

 private:
  void* data_;
  std::shared_ptr<DeviceRegion> region_;
  size_t offset_;
};

class CudaBackend final : public Backend {
 public:
  // Number of usable CUDA devices; 0 when there is no device or driver.
  static int DeviceCount();
  // Selects the device, creates the stream and the library handles, takes the arena.
  // UNAVAILABLE when there is no device.
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(CudaBackendOptions options = {});
  ~CudaBackend() override;

  std::string Name() const override { return "cuda"; }

  absl::StatusOr<BufferPtr> Alloc(DType dtype, int64_t numel) override;
  DType KvCacheDType() const override { return options_.kv_dtype; }
  absl::StatusOr<BufferPtr> UploadWeight(DType src_dtype, const void* src, int64_t numel) override;
  void Write(Buffer& dst, const void* src, size_t bytes, size_t offset = 0) override;
  absl::Status Read(const Buffer& src, void* dst, size_t bytes, size_t offset = 0) override;
  absl::Status Synchronize() override;
  absl::StatusOr<BufferPtr> View(Buffer& base, int64_t offset, int64_t numel) override;
  void* RawData(Buffer& b) override;

  void Embed(const Buffer& ids, const Buffer& table, int64_t n, int64_t vocab,
             int64_t vocab_offset, int64_t hidden, float scale, Buffer& out) override;
  void MatMul(const Buffer& x, const Buffer& w, int64_t m, int64_t n, int64_t k, Buffer& y,
              int64_t w_row_offset = 0) override;
  void RmsNorm(const Buffer& x, const Buffer* w, int64_t rows, int64_t dim, float eps,
               Buffer& out) override;
  void AddRmsNorm(Buffer& residual, const Buffer& x, const Buffer& w, const Buffer* scalar,
                  int64_t rows, int64_t dim, float eps) override;
  void Add(const Buffer& a, const Buffer& b, int64_t n, Buffer& out) override;
  void HeadNormRope(Buffer& x, const Buffer* w, const Buffer& positions, int64_t num_tokens,
                    int64_t num_heads, const RopeSpec& rope, float eps) override;
  void WriteKv(const Buffer* k, const Buffer& v, const Buffer& slots, int64_t num_tokens,
               int64_t row_elems, Buffer* k_cache, Buffer& v_cache) override;
  void Attention(const AttentionArgs& args) override;
  void GeluMul(const Buffer& gate_up, int64_t n, int64_t inter, Buffer& out) override;
  void MoeRoute(const MoeRouteArgs& args) override;
  void MoeExperts(const MoeExpertsArgs& args) override;
  void Softcap(Buffer& x, int64_t n, float cap) override;
  void GatherRows(const Buffer& x, const Buffer& rows, int64_t num_rows, int64_t dim,
                  Buffer& out) override;
  void GatherSumRows(const Buffer& x, const Buffer& idx, int64_t rows, int64_t k, int64_t dim,
                     Buffer& out) override;
  void TopK(const Buffer& x, int64_t rows, int64_t cols, int64_t k, int64_t id_offset,
            Buffer& values, Buffer& ids) override;
  void LogSumExp(const Buffer& x, int64_t rows, int64_t cols,
                 const std::vector<float>& temperature, Buffer& max_out,
                 Buffer& sum_out) override;
  void Sample(const Buffer& logits, int64_t rows, int64_t vocab,
              const std::vector<SamplingParams>& params, Buffer& ids) override;

  // ---- CUDA graphs ----
  // Between BeginCapture() and EndCapture(key) ops are recorded, not run; EndCapture
  // instantiates them as the graph for `key` (e.g. a decode batch-size bucket), replacing any
  // earlier one. Replay(key) launches it on the stream. A captured graph reads and writes the
  // same buffers every replay, so inputs are written into those buffers (Write) before Replay
  // and outputs read after. Scratch taken by ops during capture comes from a pool kept until
  // DropGraphs (see graph_pool_). Not allowed while capturing (sticky FAILED_PRECONDITION):
  // Write, Read, Synchronize, DropGraphs, and ops whose arguments live on the host (LogSumExp,
  // and Sample with a non-greedy row); MoeExperts takes its fused path, which needs no host
  // round trip.
  bool SupportsGraphs() const override { return true; }
  absl::Status BeginCapture() override;
  absl::Status EndCapture(int64_t key) override;
  absl::Status Replay(int64_t key) override;
  bool HasGraph(int64_t key) const override { return graphs_.count(key) > 0; }
  void DropGraphs() override;
  bool capturing() const { return capturing_; }
  // The step stream, on which NCCL sums of a tensor-parallel step graph are recorded.
  void* NativeStream() override { return stream_; }

  // Which MoeExperts path each call took (tests use it to know a path ran).
  struct MoePathCounts {
    int64_t fused = 0;       // the fused kernels (few tokens, capture, f32 products)
    int64_t grouped = 0;     // cuBLAS's grouped GEMM over the permuted rows
    int64_t per_expert = 0;  // one cuBLASLt product per active expert (no grouped GEMM)
    int64_t scheduled = 0;   // MoeGroupedGemm, scheduled on the device (no host round trip)
  };
  const MoePathCounts& moe_paths() const { return moe_paths_; }
  // Which attention kernel each Attention call ran.
  struct AttentionPathCounts {
    int64_t scalar = 0;       // PagedAttention: f32 scores and softmax, decode and prefill
    int64_t tensor_core = 0;  // PrefillAttention: bf16 tensor-core products (prefill)
  };
  const AttentionPathCounts& attention_paths() const { return attention_paths_; }

  cudaStream_t stream() const { return stream_; }
  const DeviceArena& arena() const { return region_->arena; }

  // Records `err` (if not success) as the sticky error, at file:line. Returns err == success.
  bool Check(cudaError_t err, const char* file, int line);
  bool CheckStatus(const absl::Status& status);

 private:
  CudaBackend() = default;

  struct LtPlan;
  // Alignments (bytes, powers of two up to 256) of the weight, the activation and the output.
  LtPlan* GetLtPlan(int64_t m, int64_t n, int64_t k, kernels::ElemType w_type, uint32_t w_align,
                    uint32_t x_align, uint32_t y_align);
  void LtMatMul(const float* x, const void* w, kernels::ElemType w_type, int64_t m, int64_t n,
                int64_t k, float* y);
  // The same with x already in the weights' type (the permuted expert rows).
  void LtMatMulTyped(const void* x, const void* w, kernels::ElemType w_type, int64_t m, int64_t n,
                     int64_t k, float* y);
  // Scratch from the arena, released when the returned buffer dies (stream order makes reuse
  // by later ops safe). While capturing, a view of a graph_pool_ block instead. Null, with the
  // sticky error set, when the arena is full.
  std::shared_ptr<Buffer> Scratch(DType dtype, int64_t numel);
  std::shared_ptr<Buffer> GraphScratch(DType dtype, int64_t numel);
  // Copies a host array into fresh scratch (the host copy may die after the call: the bytes are
  // copied into upload_keepalive_, the source of the asynchronous copy, until the stream is
  // next waited on).
  std::shared_ptr<Buffer> UploadScratch(DType dtype, const void* src, int64_t numel);
  // Drops the keep-alive copies once the stream has been waited on successfully.
  void ReleaseUploads() { upload_keepalive_.clear(); }
  // Records FAILED_PRECONDITION naming `what` when capturing; returns true if capturing.
  bool RefuseWhileCapturing(const char* what);
  void MoeExpertsFused(const MoeExpertsArgs& a, kernels::ElemType w_type);
  void MoeExpertsGrouped(const MoeExpertsArgs& a, kernels::ElemType w_type);
  void MoeExpertsScheduled(const MoeExpertsArgs& a);

  CudaBackendOptions options_;
  cudaStream_t stream_ = nullptr;
  std::shared_ptr<DeviceRegion> region_;
  void* blas_handle_ = nullptr;     // cublasHandle_t
  void* lt_handle_ = nullptr;       // cublasLtHandle_t
  std::shared_ptr<Buffer> blas_workspace_;
  // shared_ptr: LtPlan is complete only in cuda_matmul.cc.
  std::map<std::tuple<int64_t, int64_t, int64_t, int>, std::shared_ptr<LtPlan>> lt_plans_;
  std::map<int64_t, cudaGraphExec_t> graphs_;
  bool capturing_ = false;
  // Scratch of captured ops. A graph keeps the addresses its ops were given, so these blocks
  // stay allocated (never handed to another owner by the arena) until DropGraphs. They are
  // shared: by ops of one capture whose scratch is not live at the same time (graph nodes run
  // in capture order, as the stream would), and by every graph (replays run one after another
  // on the stream, and no op keeps scratch contents past its return). Keeping each op's
  // scratch for its graph alone would hold layers x ops x batch bytes per graph: gigabytes
  // over a few dozen decode shapes.
  struct PoolBlock {
    std::shared_ptr<Buffer> buffer;
    bool busy = false;  // handed to an op of the capture under way
  };
  std::vector<std::shared_ptr<PoolBlock>> graph_pool_;
  // cuBLAS refused its grouped GEMM for these types once: expert products run as one cuBLASLt
  // product per active expert instead.
  bool grouped_gemm_unsupported_ = false;
  MoePathCounts moe_paths_;
  AttentionPathCounts attention_paths_;
  // Host sources of UploadScratch copies that may still be in flight (a cudaMemcpyAsync from
  // pageable memory may read its source after the call returns).
  std::vector<std::vector<char>> upload_keepalive_;
  absl::Status sticky_;
};

}  // namespace gemma
