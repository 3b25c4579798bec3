// The Gemma 4 text decoder (31B dense and 26B-A4B MoE) written once against the Backend
// interface: one forward call over a batch of sequences, each at its own position, some in
// prefill and some in decode, reading and writing the paged KV cache.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model_config.h"
#include "common/safetensors.h"
#include "eplb/placement.h"
#include "worker/backend/backend.h"
#include "worker/model/gemma4/kv_cache.h"
#include "worker/model/gemma4/sharding.h"
#include "worker/model/gemma4/step_graphs.h"
#include "worker/model/gemma4/weights.h"
#include "worker/parallel/communicator.h"

namespace gemma::gemma4 {

// Which positions of a sequence produce logits.
enum class LogitsMode : uint8_t { kNone, kLast, kAll };
// kAll when every position's logits are kept, else kLast when the last one is sampled.
inline LogitsMode LogitsModeOf(bool sample, bool all_logits) {
  return all_logits ? LogitsMode::kAll : sample ? LogitsMode::kLast : LogitsMode::kNone;
}

// One sequence's share of a step: `tokens` are appended at positions kv->length, ... The caller
// has grown kv's pages to cover them (KvCache::Grow); Forward advances kv->length.
struct SequenceStep {
  std::span<const int32_t> tokens;
  SequenceKv* kv = nullptr;
  LogitsMode logits = LogitsMode::kLast;
};

// Sees named intermediates ("embed", "layers.3.out", "layers.3.router_ids") as they are made.
// Debug and test use only: it synchronises the backend.
using TensorObserver = std::function<void(std::string_view name, const Buffer& buffer,
                                          const std::vector<int64_t>& shape)>;

// How this rank takes part in a model spread over several ranks (design.md, "Parallelism
// inside a replica"). The default is one rank holding everything.
struct ModelParallel {
  ShardLayout layout;
  // The tensor-parallel group (attention heads, MLP columns, vocabulary rows); null if tp 1.
  parallel::Communicator* tp_comm = nullptr;
  // dp-ep mode: every rank of the replica, over which tokens travel to their experts' owners
  // by all-to-all. Null in tp mode, where each tp rank owns experts and sums partials.
  parallel::Communicator* ep_comm = nullptr;
  // Compare a hash of each layer's routing across the tp group (debug; one host sync a layer).
  bool check_routing = false;
  // Where the experts sit over the ep_size ranks (tp mode: the tp group) to start with; null is
  // the static placement (E / ep_size contiguous experts per rank, no copies). Copied.
  const eplb::Placement* placement = nullptr;
  // Consecutive ranks that share a node, for choosing among an expert's copies (0: one node).
  int ranks_per_node = 0;
};

// One expert placement's share on this rank: the placement, its copy table and the weights of
// this rank's slots, per layer. Made by Model::PrepareExperts, used after InstallExperts.
struct ExpertSlots {
  eplb::Placement placement;
  std::unique_ptr<eplb::CopyTable> copies;
  int rank = 0;                            // this rank's index in the placement
  std::vector<ExpertSlotWeights> layers;   // per layer: [slots, 2 * I_moe, H], [slots, H, I_moe]
};

class Model {
 public:
  // Loads config.json and the weights of `model_dir` onto `backend` (this rank's slices).
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& model_dir,
                                                     Backend& backend,
                                                     const ModelParallel& parallel = {});
  // Takes the checkpoint, which stays mapped while the model lives (expert placements load
  // from it).
  static absl::StatusOr<std::unique_ptr<Model>> Create(const ModelConfig& config,
                                                       std::unique_ptr<Checkpoint> checkpoint,
                                                       Backend& backend,
                                                       const ModelParallel& parallel = {});
  // KV-cache options for this rank (its KV heads per layer), from `base`.
  KvCacheOptions CacheOptions(KvCacheOptions base) const;

  // Runs one step. Returns the logits of the requested positions, in sequence order, as a
  // device buffer [num_rows, local vocab] (this rank's vocabulary shard; valid until the next
  // Forward). INVALID_ARGUMENT for token ids outside the vocabulary or positions past
  // max_position_embeddings. With tensor or expert parallelism every rank of the group calls
  // Forward for the same step (in dp-ep mode a group with no sequences passes an empty span).
  absl::StatusOr<const Buffer*> Forward(std::span<const SequenceStep> steps, KvCache& cache);
  // Rows of logits produced by the last Forward.
  int64_t num_logit_rows() const { return num_logit_rows_; }
  // One token per logit row of the last Forward, drawn under params[row] (see SamplingParams).
  absl::StatusOr<std::vector<int32_t>> Sample(const std::vector<SamplingParams>& params);
  // The logits of the last Forward as host floats [num_logit_rows, vocab_size].
  absl::StatusOr<std::vector<float>> LogitsToHost();

  void set_observer(TensorObserver observer) { observer_ = std::move(observer); }

  // Expert load: once enabled (before the first step, so that step graphs record it), every
  // router adds the tokens it routes to a per-layer, per-expert counter on the backend, with no
  // extra pass and no host round trip per step. TakeExpertCounts reads and zeroes them
  // ([num_hidden_layers * num_experts], layer-major; a synchronisation, so once per window,
  // between steps). Nothing for a model without experts. Enable it on one rank of each group
  // that routes the same tokens (in tp every rank does).
  absl::Status EnableExpertCounts();
  bool expert_counts_enabled() const { return expert_counts_ != nullptr; }
  // Stops counting (the counters are freed; step graphs are recorded again without them).
  void DisableExpertCounts();
  absl::StatusOr<std::vector<int64_t>> TakeExpertCounts();
  // Expert placement (MoE models): the experts this rank's slots hold, and the live switch.
  // PrepareExperts reads this rank's slots of `placement` from the mapped checkpoint and uploads
  // them; on a backend with ThreadSafeUploads() it may run on another thread while steps run.
  // InstallExperts makes them the ones the next step uses (between steps, on the step thread;
  // every rank of the placement must switch at the same step). INVALID_ARGUMENT when the
  // placement's layers, experts or ranks do not match this model and layout.
  absl::StatusOr<std::unique_ptr<ExpertSlots>> PrepareExperts(
      const eplb::Placement& placement) const;
  absl::Status InstallExperts(std::unique_ptr<ExpertSlots> slots);
  // The placement in use (an empty one for a model without experts).
  const eplb::Placement& placement() const;

  // Step graphs, on a backend that has them (CUDA): a step whose sequences each bring one token
  // (decode), without an observer, is recorded once per shape (sequences, page-table width
  // rounded up to a power of two, logit rows) and replayed after that. On one rank, or in a
  // tensor-parallel group whose communicator enqueues its sums on the backend's stream (NCCL):
  // the graph then holds the sums too, and each replay is awaited through the communicator's
  // watchdog. Not in dp-ep (the dispatch reads the routing on the host). On by default.
  void set_use_graphs(bool on) { use_graphs_ = on; }
  int64_t graph_captures() const { return graphs_.captures(); }
  int64_t graph_replays() const { return graphs_.replays(); }
  const ModelConfig& config() const { return config_; }
  const LocalDims& local_dims() const { return dims_; }
  const ModelParallel& parallel() const { return parallel_; }
  Backend& backend() { return backend_; }

 private:
  Model(const ModelConfig& config, Backend& backend, const ModelParallel& parallel)
      : config_(config), backend_(backend), parallel_(parallel), graphs_(backend) {}
  absl::Status EnsureScratch(int64_t num_tokens, int64_t num_rows);
  bool GraphEligible(std::span<const SequenceStep> steps) const;
  // Forward, Sample and LogitsToHost, before ReleaseFailedCommunicators.
  absl::StatusOr<const Buffer*> DoForward(std::span<const SequenceStep> steps, KvCache& cache);
  absl::StatusOr<std::vector<int32_t>> DoSample(const std::vector<SamplingParams>& params);
  absl::StatusOr<std::vector<float>> DoLogitsToHost();
  // After a failure: each communicator that died has its step graphs dropped and is then
  // aborted (Communicator::Abort), so that nothing is left waiting on a dead peer.
  void ReleaseFailedCommunicators();
  template <typename T>
  T AfterFailure(T result) {
    if (!result.ok()) ReleaseFailedCommunicators();
    return result;
  }
  // The network from the embedding to the (soft-capped) logits of the step in `layout`.
  absl::Status RunNetwork(const BatchLayout& layout, const StepInputs& in, KvCache& cache);
  absl::Status AttentionBlock(int layer_idx, const BatchLayout& layout, KvCache& cache);
  absl::Status FeedForwardBlock(int layer_idx);
  // Sums `buffer`'s first `count` floats over the tp group (no-op without one).
  absl::Status TpAllReduce(Buffer& buffer, int64_t count);
  // This rank's slots of layer l on num_tokens rows of x routed by `ids` / topk_weights
  // [num_tokens, top_k]: ids are slot indices offset by first_slot (out of range: not here).
  void RunLocalExperts(int l, const Buffer& x, const Buffer& ids, const Buffer& topk_weights,
                       int64_t num_tokens, int64_t top_k, int64_t first_slot, Buffer& out);
  // tp mode with copies or a non-contiguous placement: each (token, expert) of layer l goes to
  // one copy (the copies taken in turn per expert, the same on every tp rank); writes this
  // rank's local slot or -1 per (token, k) into local_slots_.
  absl::Status MapToLocalSlots(int l);
  absl::Status CheckRouting(int layer_idx);
  void Observe(std::string_view name, const Buffer& buffer, std::vector<int64_t> shape);

  ModelConfig config_;
  Backend& backend_;
  // The checkpoint the weights came from, kept mapped for loading other expert placements.
  std::unique_ptr<Checkpoint> checkpoint_;
  std::unique_ptr<ExpertSlots> experts_;
  ModelParallel parallel_;
  LocalDims dims_;
  std::unique_ptr<Weights> weights_;
  TensorObserver observer_;
  int64_t num_tokens_ = 0;
  int64_t num_logit_rows_ = 0;

  // Scratch, sized for the largest step seen so far.
  int64_t scratch_tokens_ = 0;
  int64_t scratch_rows_ = 0;
  BufferPtr hidden_;      // [T, H] residual stream
  BufferPtr normed_;      // [T, H]
  BufferPtr q_;           // [T, heads * max_d]
  BufferPtr k_;           // [T, kv_heads * max_d]
  BufferPtr v_;           // [T, kv_heads * max_d]
  BufferPtr attn_;        // [T, heads * max_d]
  BufferPtr proj_;        // [T, H]
  BufferPtr gate_up_;     // [T, 2 * max_inter]
  BufferPtr act_;         // [T, max_inter]
  BufferPtr ffn_pair_;    // [2, T, H]: dense and expert partials, reduced in one collective
  BufferPtr mlp_out_;     // view of ffn_pair_[0]
  BufferPtr moe_out_;     // view of ffn_pair_[1]
  BufferPtr moe_in_;      // [T, H]
  BufferPtr topk_ids_;    // [T, top_k]
  BufferPtr topk_weights_;// [T, top_k]
  BufferPtr local_slots_; // [T, top_k] i32 (MapToLocalSlots)
  std::vector<int32_t> host_local_slots_;
  BufferPtr row_hidden_;  // [R, H]
  BufferPtr logits_;      // [R, V]
  BufferPtr sampled_;     // [R] i32
  BufferPtr expert_counts_;                 // [layers, experts] i32, when enabled
  std::vector<BufferPtr> layer_expert_counts_;  // a view per layer
  // The last eager step's metadata; step graphs keep their own.
  StepInputs step_inputs_;
  StepGraphs graphs_;
  bool use_graphs_ = true;
  // True while a step graph is being recorded with a tensor-parallel group: its sums are
  // enqueued on the backend's stream (recorded with the kernels) instead of waited for.
  bool stream_sums_ = false;
};

}  // namespace gemma::gemma4
