// How Gemma 4's weights and work split over ranks: the one table from weight name to shard spec,
// and each rank's local dimensions (heads, KV heads, MLP columns, experts, vocabulary rows).
// Knows the model's tensor names; knows nothing of communicators or backends.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model_config.h"

namespace gemma::gemma4 {

// Which range of which dimension a tensor's split follows.
enum class ShardDim : uint8_t { kNone, kQueryHeads, kKvHeads, kIntermediate, kExperts, kVocab };

enum class ShardKind : uint8_t {
  kReplicated,   // every rank holds the whole tensor
  kSplitRows,    // axis 0 split (output rows of a projection: column-parallel)
  kSplitCols,    // axis 1 split (input columns: row-parallel, produces a partial sum)
  kExpertOwned,  // axis 0 of a [experts, ...] tensor: whole experts per rank
};

struct ShardSpec {
  ShardKind kind = ShardKind::kReplicated;
  ShardDim dim = ShardDim::kNone;
};

// The spec of a text-decoder tensor, by its name below the prefix ("embed_tokens.weight",
// "layers.3.self_attn.q_proj.weight", ...). Unknown names are replicated.
ShardSpec ShardSpecFor(const std::string& name);

// A rank's place in the splits: tensor parallelism over `tp_size` ranks (attention, MLP,
// vocabulary), expert ownership over `ep_size` ranks.
struct ShardLayout {
  int tp_size = 1;
  int tp_rank = 0;
  int ep_size = 1;
  int ep_rank = 0;
};

// Per-layer local dimensions of one rank.
struct LocalLayerDims {
  int64_t head_dim = 0;
  int64_t q_heads = 0, q_head_offset = 0;   // query heads held
  int64_t kv_heads = 0, kv_head_offset = 0; // KV heads held (replicated when tp > KV heads)
  int64_t inter = 0, inter_offset = 0;      // dense MLP columns held
};

struct LocalDims {
  std::vector<LocalLayerDims> layers;
  int64_t experts = 0, expert_offset = 0;  // experts owned
  int64_t vocab = 0, vocab_offset = 0;     // vocabulary rows held (embedding and LM head)
  // The element range [begin, end) of `dim` held on the split axis.
  int64_t RangeBegin(ShardDim dim, int layer_idx) const;
  int64_t RangeSize(ShardDim dim, int layer_idx) const;
};

// Checks that the split is possible and computes this rank's dims. INVALID_ARGUMENT naming the
// quantity when tp_size does not divide the query heads, the KV heads (or is not a multiple of
// them), the intermediate size or the vocabulary, or ep_size does not divide the experts.
absl::StatusOr<LocalDims> ComputeLocalDims(const ModelConfig& config, const ShardLayout& layout);

}  // namespace gemma::gemma4
