// The Gemma 4 text decoder (31B dense and 26B-A4B MoE) written once against the Backend
// interface: one forward call over a batch of sequences, each at its own position, some in
// prefill and some in decode, reading and writing the paged KV cache.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model_config.h"
#include "common/safetensors.h"
#include "worker/backend/backend.h"
#include "worker/engine/kv_cache.h"
#include "worker/model/gemma4/weights.h"

namespace gemma::gemma4 {

// Which positions of a sequence produce logits.
enum class LogitsMode : uint8_t { kNone, kLast, kAll };

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

class Model {
 public:
  // Loads config.json and the weights of `model_dir` onto `backend`.
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& model_dir,
                                                     Backend& backend);
  static absl::StatusOr<std::unique_ptr<Model>> Create(const ModelConfig& config,
                                                       const Checkpoint& checkpoint,
                                                       Backend& backend);

  // Runs one step. Returns the logits of the requested positions, in sequence order, as a
  // device buffer [num_rows, vocab] (valid until the next Forward). INVALID_ARGUMENT for token
  // ids outside the vocabulary, empty steps, or positions past max_position_embeddings.
  absl::StatusOr<const Buffer*> Forward(std::span<const SequenceStep> steps, KvCache& cache);
  // Rows of logits produced by the last Forward.
  int64_t num_logit_rows() const { return num_logit_rows_; }
  // One token per logit row of the last Forward, drawn under params[row] (see SamplingParams).
  absl::StatusOr<std::vector<int32_t>> Sample(const std::vector<SamplingParams>& params);
  // The logits of the last Forward as host floats [num_logit_rows, vocab_size].
  absl::StatusOr<std::vector<float>> LogitsToHost();

  void set_observer(TensorObserver observer) { observer_ = std::move(observer); }
  const ModelConfig& config() const { return config_; }
  Backend& backend() { return backend_; }

 private:
  Model(const ModelConfig& config, Backend& backend) : config_(config), backend_(backend) {}
  absl::Status EnsureScratch(int64_t num_tokens, int64_t num_rows);
  void AttentionBlock(int layer_idx, const BatchLayout& layout, KvCache& cache);
  void FeedForwardBlock(int layer_idx);
  void Observe(std::string_view name, const Buffer& buffer, std::vector<int64_t> shape);

  ModelConfig config_;
  Backend& backend_;
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
  BufferPtr mlp_out_;     // [T, H]
  BufferPtr moe_in_;      // [T, H]
  BufferPtr moe_out_;     // [T, H]
  BufferPtr topk_ids_;    // [T, top_k]
  BufferPtr topk_weights_;// [T, top_k]
  BufferPtr rows_;        // [R] i32
  BufferPtr row_hidden_;  // [R, H]
  BufferPtr logits_;      // [R, V]
  BufferPtr sampled_;     // [R] i32
  // Step metadata.
  BufferPtr token_ids_, positions_, query_start_, seq_lens_;
  BufferPtr page_tables_[2], slots_[2];
};

}  // namespace gemma::gemma4
