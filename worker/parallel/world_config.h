// WorldConfig: the one place for rank arithmetic inside a replica (tp and dp-ep modes, groups,
// nodes) and for splitting a dimension into contiguous per-rank shards.
// Knows nothing of communicators, models or weights: callers pass lengths (heads, vocab, experts).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace gemma::parallel {

// design.md, "Parallelism inside a replica".
enum class ParallelMode : uint8_t {
  kTp,    // every rank sees every token; tp_size == world_size
  kDpEp,  // tp groups of tp_size ranks, data-parallel across groups, experts over all ranks
};

const char* ParallelModeName(ParallelMode mode);  // "tp", "dp-ep"
// Parses "tp" or "dp-ep"; INVALID_ARGUMENT otherwise.
absl::StatusOr<ParallelMode> ParseParallelMode(absl::string_view name);

// A contiguous shard [offset, offset + size) of a dimension.
struct ShardRange {
  int64_t offset = 0;
  int64_t size = 0;
  bool operator==(const ShardRange&) const = default;
};

enum class UnevenPolicy : uint8_t {
  kRequireDivisible,  // num_shards must divide length
  kFrontLoaded,       // the first length % num_shards shards get one extra element
};

// Shard `shard` of `num_shards` of a dimension of `length`. INVALID_ARGUMENT (naming `what`, e.g.
// "num_attention_heads") when num_shards <= 0, shard is out of range, length < 0, or the policy
// requires divisibility and it does not hold.
absl::StatusOr<ShardRange> SplitDimension(int64_t length, int num_shards, int shard,
                                          UnevenPolicy policy,
                                          absl::string_view what = "dimension");

// Front-loaded split that cannot fail; CHECKs its arguments. For internal bookkeeping.
ShardRange SplitEvenly(int64_t length, int num_shards, int shard);

class WorldConfig {
 public:
  struct Options {
    int world_size = 1;
    int rank = 0;
    ParallelMode mode = ParallelMode::kTp;
    int tp_size = 0;         // 0: world_size in kTp, 1 in kDpEp
    int ep_size = 0;         // 0: world_size; must equal world_size when given
    int ranks_per_node = 0;  // 0: world_size (one node)
  };

  // Validates and fills defaults; INVALID_ARGUMENT naming the offending field and values.
  static absl::StatusOr<WorldConfig> Create(const Options& options);

  int world_size() const { return world_size_; }
  int rank() const { return rank_; }
  ParallelMode mode() const { return mode_; }
  int tp_size() const { return tp_size_; }
  int ep_size() const { return ep_size_; }
  // Number of data-parallel groups: world_size / tp_size.
  int dp_size() const { return world_size_ / tp_size_; }
  int ranks_per_node() const { return ranks_per_node_; }
  int num_nodes() const { return world_size_ / ranks_per_node_; }

  // This rank's data-parallel group, its rank inside the tp group, its expert-parallel rank.
  int dp_group() const { return DpGroupOf(rank_); }
  int tp_rank() const { return TpRankOf(rank_); }
  int ep_rank() const { return rank_; }
  int node() const { return NodeOf(rank_); }
  int local_rank() const { return LocalRankOf(rank_); }
  bool is_leader() const { return rank_ == 0; }

  // The same for any rank (CHECKs 0 <= rank < world_size).
  int DpGroupOf(int rank) const;
  int TpRankOf(int rank) const;
  int NodeOf(int rank) const;
  int LocalRankOf(int rank) const;
  // Global ranks of dp group `group`, in tp-rank order.
  std::vector<int> TpGroupRanks(int group) const;

  // This rank's shard of a dimension split over the tp group (heads, MLP columns, vocab rows).
  absl::StatusOr<ShardRange> TpShard(int64_t length, UnevenPolicy policy,
                                     absl::string_view what) const;
  // This rank's experts: a contiguous range of `num_experts` split over ep ranks.
  absl::StatusOr<ShardRange> ExpertShard(int64_t num_experts, UnevenPolicy policy) const;

  // "rank 3/8 mode=dp-ep tp=2 (group 1, tp rank 1) ep=8 node 0 local 3"
  std::string DebugString() const;

 private:
  WorldConfig() = default;

  int world_size_ = 1;
  int rank_ = 0;
  ParallelMode mode_ = ParallelMode::kTp;
  int tp_size_ = 1;
  int ep_size_ = 1;
  int ranks_per_node_ = 1;
};

}  // namespace gemma::parallel
