// The Backend interface: the coarse ops the Gemma 4 model is written against, shaped for a GPU.
// Buffers are opaque handles the model never dereferences; ops are enqueued in order on the
// backend's stream and may run asynchronously; errors inside ops are sticky and surface at the
// next Synchronize(). Knows the model's op vocabulary but not the model graph.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/dtype.h"
#include "common/sampling_params.h"

namespace gemma {

// Device memory owned by a backend. Only the backend that allocated it reads its contents.
class Buffer {
 public:
  virtual ~Buffer() = default;
  DType dtype() const { return dtype_; }
  int64_t numel() const { return numel_; }
  size_t bytes() const { return static_cast<size_t>(numel_) * DTypeSize(dtype_); }

 protected:
  Buffer(DType dtype, int64_t numel) : dtype_(dtype), numel_(numel) {}

 private:
  DType dtype_;
  int64_t numel_;
};
using BufferPtr = std::unique_ptr<Buffer>;

// Rotary embedding of one layer type, half-split (NeoX) layout: dim j pairs with j + head_dim/2.
// Pair i < rotary_pairs turns by position * inv_freq[i], inv_freq[i] = theta^(-2i/head_dim) /
// factor; pairs at or past rotary_pairs do not turn (the "proportional" kind of global layers).
struct RopeSpec {
  int64_t head_dim = 0;
  int64_t rotary_pairs = 0;
  double theta = 10000.0;
  double factor = 1.0;
};

// Per-step batch layout, built once per forward and shared by the attention ops. Sequences are
// laid end to end: tokens of sequence s are rows [query_start[s], query_start[s+1]).
struct BatchLayout {
  int64_t num_tokens = 0;
  int64_t num_seqs = 0;
  int64_t max_pages_per_seq = 0;  // row length of the page tables
  const Buffer* positions = nullptr;    // [num_tokens] i32, absolute position of each token
  const Buffer* query_start = nullptr;  // [num_seqs + 1] i32
  const Buffer* seq_lens = nullptr;     // [num_seqs] i32, cached length after this step
  // Per pool (0 = sliding layers, 1 = full layers): [num_seqs, max_pages_per_seq] i32 physical
  // page of each logical page (-1 where no page is held), and [num_tokens] i32 cache slot
  // (page * page_size + offset) each new token is written to.
  const Buffer* page_tables[2] = {nullptr, nullptr};
  const Buffer* slots[2] = {nullptr, nullptr};
  // Host copies of the same, for backends that schedule work on the host.
  std::vector<int32_t> host_query_start;
  std::vector<int32_t> host_seq_lens;
};

// Attention of one layer over the paged cache. The new tokens' K/V must already be in the cache
// (WriteKv). Query i of a sequence sees key j iff j <= i and, with a window w > 0, j > i - w.
struct AttentionArgs {
  const BatchLayout* layout = nullptr;
  int pool = 0;                    // which page table / slots to use
  const Buffer* q = nullptr;       // [num_tokens, num_heads, head_dim] f32, normed and rotated
  const Buffer* k_cache = nullptr; // [num_pages, page_size, num_kv_heads, head_dim]; null when
                                   // K is derived from V (k_eq_v layers)
  const Buffer* v_cache = nullptr; // [num_pages, page_size, num_kv_heads, head_dim]
                                   // (both in the backend's KvCacheDType())
  // For k_eq_v layers: K = RoPE(V * k_norm_weight), rotated with `rope`.
  const Buffer* k_norm_weight = nullptr;  // [head_dim]
  RopeSpec rope;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t page_size = 0;
  int64_t window = 0;  // 0: full causal
  float scale = 1.0f;
  Buffer* out = nullptr;  // [num_tokens, num_heads, head_dim] f32
};

// Expert routing of a Gemma 4 MoE layer: z = rmsnorm(x) * scale * hidden^-1/2; logits = z W^T;
// softmax over all experts; top-k; renormalise over the k; times per_expert_scale.
struct MoeRouteArgs {
  const Buffer* x = nullptr;                 // [num_tokens, hidden] f32 (post-attention residual)
  const Buffer* router_scale = nullptr;      // [hidden]
  const Buffer* router_proj = nullptr;       // [num_experts, hidden]
  const Buffer* per_expert_scale = nullptr;  // [num_experts]
  int64_t num_tokens = 0, hidden = 0, num_experts = 0, top_k = 0;
  float eps = 1e-6f;
  Buffer* topk_ids = nullptr;      // [num_tokens, top_k] i32, ascending expert id per token
  Buffer* topk_weights = nullptr;  // [num_tokens, top_k] f32, in the order of topk_ids
  Buffer* expert_counts = nullptr; // [num_experts] i32, incremented by tokens routed (may be null)
};

// Expert compute and weighted combine: out[t] = sum_k w[t,k] * down_e(gelu(gate_e x) * up_e x)
// over the token's experts e = ids[t,k] that lie in [first_expert, first_expert +
// num_local_experts); the others contribute nothing (another rank owns them). Summed in
// ascending expert order.
struct MoeExpertsArgs {
  const Buffer* x = nullptr;             // [num_tokens, hidden] f32 (normed expert input)
  const Buffer* topk_ids = nullptr;      // [num_tokens, top_k] i32
  const Buffer* topk_weights = nullptr;  // [num_tokens, top_k] f32
  const Buffer* gate_up = nullptr;       // [num_local_experts, 2 * inter, hidden]: gate rows first
  const Buffer* down = nullptr;          // [num_local_experts, hidden, inter]
  int64_t num_tokens = 0, hidden = 0, inter = 0, top_k = 0;
  int64_t first_expert = 0, num_local_experts = 0;
  Buffer* out = nullptr;  // [num_tokens, hidden] f32, overwritten
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string Name() const = 0;

  // ---- step graphs (optional; the CUDA backend has them) ----
  // Ops enqueued between BeginCapture() and EndCapture(key) are recorded, not run; Replay(key)
  // runs the recording again on the same buffers. The model uses this for decode steps, whose
  // shapes repeat (design.md, "Backends"). Backends without it keep these defaults.
  virtual bool SupportsGraphs() const { return false; }
  virtual absl::Status BeginCapture() {
    return absl::UnimplementedError(Name() + " backend: no step graphs");
  }
  virtual absl::Status EndCapture(int64_t /*key*/) {
    return absl::UnimplementedError(Name() + " backend: no step graphs");
  }
  virtual absl::Status Replay(int64_t /*key*/) {
    return absl::UnimplementedError(Name() + " backend: no step graphs");
  }
  virtual bool HasGraph(int64_t /*key*/) const { return false; }
  virtual void DropGraphs() {}
  // The queue every op is enqueued on, for communicators that enqueue collectives in the same
  // order (Communicator::EnqueueAllReduce; a cudaStream_t on CUDA). Null: ops run as called.
  virtual void* NativeStream() { return nullptr; }

  // ---- memory ----
  // Uninitialised device memory.
  virtual absl::StatusOr<BufferPtr> Alloc(DType dtype, int64_t numel) = 0;
  // The element type the KV cache's pools are allocated in (KvCache::Create asks): F32, or
  // BF16 on backends whose WriteKv rounds to bf16 and whose Attention widens it back to f32.
  // Activations stay f32 either way.
  virtual DType KvCacheDType() const { return DType::kF32; }
  // A weight from host memory of `src_dtype` (F32, BF16 or F16); the backend picks its storage
  // dtype (F32 or BF16). `src` may be freed after the call returns.
  virtual absl::StatusOr<BufferPtr> UploadWeight(DType src_dtype, const void* src,
                                                 int64_t numel) = 0;
  // Whether UploadWeight may run on another thread while steps run on this one (loading a new
  // expert placement in the background). Backends that upload on the step stream say no.
  virtual bool ThreadSafeUploads() const { return false; }
  // Host -> device copy of `bytes` at byte `offset`. `src` must stay valid until Synchronize().
  virtual void Write(Buffer& dst, const void* src, size_t bytes, size_t offset = 0) = 0;
  // Device -> host copy; waits for the stream. Returns the sticky error, if any.
  virtual absl::Status Read(const Buffer& src, void* dst, size_t bytes, size_t offset = 0) = 0;
  // Waits for all enqueued work; returns (and keeps) the first error an op hit.
  virtual absl::Status Synchronize() = 0;
  // A buffer aliasing elements [offset, offset + numel) of `base` (which must outlive it).
  virtual absl::StatusOr<BufferPtr> View(Buffer& base, int64_t offset, int64_t numel) = 0;
  // The address of the buffer's first element in the backend's memory space, for collectives
  // (host memory on the CPU backend, device memory on a GPU). The model never dereferences it.
  virtual void* RawData(Buffer& b) = 0;

  // ---- ops (all activations f32; weights F32 or BF16) ----
  // out[t] = table[ids[t] - vocab_offset] * scale for ids in [vocab_offset, vocab_offset +
  // vocab), zeros for other ids (rows held by another rank). ids i32 [n]; table [vocab, hidden];
  // out [n, hidden].
  virtual void Embed(const Buffer& ids, const Buffer& table, int64_t n, int64_t vocab,
                     int64_t vocab_offset, int64_t hidden, float scale, Buffer& out) = 0;
  // y[m, n] = x[m, k] . w[n, k]^T (w rows starting at row `w_row_offset`).
  virtual void MatMul(const Buffer& x, const Buffer& w, int64_t m, int64_t n, int64_t k,
                      Buffer& y, int64_t w_row_offset = 0) = 0;
  // out[r] = x[r] / rms(x[r]) * w (w may be null: no weight). rows x dim. out may alias x.
  virtual void RmsNorm(const Buffer& x, const Buffer* w, int64_t rows, int64_t dim, float eps,
                       Buffer& out) = 0;
  // residual = (residual + rmsnorm(x) * w) * scalar, scalar a [1] buffer or null (= 1).
  virtual void AddRmsNorm(Buffer& residual, const Buffer& x, const Buffer& w,
                          const Buffer* scalar, int64_t rows, int64_t dim, float eps) = 0;
  // out = a + b, n elements. out may alias either.
  virtual void Add(const Buffer& a, const Buffer& b, int64_t n, Buffer& out) = 0;
  // Per-head RMSNorm (weight [head_dim] or null) then RoPE (skipped if rope.rotary_pairs == 0),
  // in place on x [num_tokens, num_heads, head_dim]; positions i32 [num_tokens].
  virtual void HeadNormRope(Buffer& x, const Buffer* w, const Buffer& positions,
                            int64_t num_tokens, int64_t num_heads, const RopeSpec& rope,
                            float eps) = 0;
  // Scatters the new tokens' k and v [num_tokens, num_kv_heads, head_dim] (f32) into the caches
  // at `slots` (k / k_cache may be null for V-only caches), converting to the caches' dtype.
  virtual void WriteKv(const Buffer* k, const Buffer& v, const Buffer& slots, int64_t num_tokens,
                       int64_t row_elems, Buffer* k_cache, Buffer& v_cache) = 0;
  virtual void Attention(const AttentionArgs& args) = 0;
  // out[t, i] = gelu_tanh(gate_up[t, i]) * gate_up[t, inter + i]; gate_up [n, 2*inter].
  virtual void GeluMul(const Buffer& gate_up, int64_t n, int64_t inter, Buffer& out) = 0;
  virtual void MoeRoute(const MoeRouteArgs& args) = 0;
  virtual void MoeExperts(const MoeExpertsArgs& args) = 0;
  // x = cap * tanh(x / cap), n elements, in place.
  virtual void Softcap(Buffer& x, int64_t n, float cap) = 0;
  // out[r] = x[rows[r]]; rows i32 [num_rows]; x [*, dim].
  virtual void GatherRows(const Buffer& x, const Buffer& rows, int64_t num_rows, int64_t dim,
                          Buffer& out) = 0;
  // out[r] = x[idx[r, 0]] + x[idx[r, 1]] + ... (rows of x [*, dim]), added left to right onto
  // zero in f32; an index below zero adds nothing, so a row of only such indices is zero.
  // idx i32 [rows, k]. Combines rows that came back from other ranks (expert dispatch).
  virtual void GatherSumRows(const Buffer& x, const Buffer& idx, int64_t rows, int64_t k,
                             int64_t dim, Buffer& out) = 0;
  // The k largest values of each row of x (rows x cols), largest first (lower index first on
  // ties): values f32 [rows, k] and their column + id_offset, i32 [rows, k].
  virtual void TopK(const Buffer& x, int64_t rows, int64_t cols, int64_t k, int64_t id_offset,
                    Buffer& values, Buffer& ids) = 0;
  // Per row r, with y_j = x[r, j] / temperature[r] (in f32, as Sample scales): max_out[r] =
  // max_j y_j and sum_out[r] = sum_j exp(y_j - max_out[r]) (accumulated in double, stored f32).
  virtual void LogSumExp(const Buffer& x, int64_t rows, int64_t cols,
                         const std::vector<float>& temperature, Buffer& max_out,
                         Buffer& sum_out) = 0;
  // ids[r] = a token drawn from logits[r] (rows x vocab) under params[r].
  virtual void Sample(const Buffer& logits, int64_t rows, int64_t vocab,
                      const std::vector<SamplingParams>& params, Buffer& ids) = 0;
};

// The uniform in [0, 1) that seeded sampling draws for (seed, request_key, position): a
// counter-based hash, so the draw does not depend on batch composition or preemption.
double SamplingUniform(uint64_t seed, uint64_t request_key, int64_t position);
// The draw of one row under `p` (an unset seed reads as 0).
inline double SamplingUniform(const SamplingParams& p) {
  return SamplingUniform(p.seed.value_or(0), p.request_key, p.position);
}

}  // namespace gemma
