#include "worker/parallel/world_config.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "glog/logging.h"

namespace gemma::parallel {

const char* ParallelModeName(ParallelMode mode) {
  switch (mode) {
    case ParallelMode::kTp:
      return "tp";
    case ParallelMode::kDpEp:
      return "dp-ep";
  }
  return "unknown";
}

absl::StatusOr<ParallelMode> ParseParallelMode(absl::string_view name) {
  if (name == "tp") return ParallelMode::kTp;
  if (name == "dp-ep") return ParallelMode::kDpEp;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown parallel mode \"", name, "\" (expected \"tp\" or \"dp-ep\")"));
}

absl::StatusOr<ShardRange> SplitDimension(int64_t length, int num_shards, int shard,
                                          UnevenPolicy policy, absl::string_view what) {
  if (num_shards <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot split ", what, " into ", num_shards, " shards"));
  }
  if (shard < 0 || shard >= num_shards) {
    return absl::InvalidArgumentError(
        absl::StrCat("shard ", shard, " of ", what, " out of range [0, ", num_shards, ")"));
  }
  if (length < 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has negative length ", length));
  }
  if (policy == UnevenPolicy::kRequireDivisible && length % num_shards != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " of ", length, " is not divisible into ", num_shards, " equal shards"));
  }
  return SplitEvenly(length, num_shards, shard);
}

ShardRange SplitEvenly(int64_t length, int num_shards, int shard) {
  CHECK_GT(num_shards, 0) << "SplitEvenly needs at least one shard";
  CHECK(shard >= 0 && shard < num_shards) << "shard " << shard << " of " << num_shards;
  CHECK_GE(length, 0) << "SplitEvenly of a negative length";
  const int64_t base = length / num_shards;
  const int64_t extra = length % num_shards;
  ShardRange range;
  range.size = base + (shard < extra ? 1 : 0);
  range.offset = base * shard + std::min<int64_t>(shard, extra);
  return range;
}

absl::StatusOr<WorldConfig> WorldConfig::Create(const Options& options) {
  WorldConfig config;
  if (options.world_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("world_size must be positive, got ", options.world_size));
  }
  config.world_size_ = options.world_size;
  if (options.rank < 0 || options.rank >= options.world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", options.rank, " out of range for world_size ", options.world_size));
  }
  config.rank_ = options.rank;
  config.mode_ = options.mode;

  if (options.tp_size < 0 || options.ep_size < 0 || options.ranks_per_node < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tp_size, ep_size and ranks_per_node must be positive (or 0 for the default), got tp=",
        options.tp_size, " ep=", options.ep_size, " ranks_per_node=", options.ranks_per_node));
  }
  const int default_tp = options.mode == ParallelMode::kTp ? options.world_size : 1;
  config.tp_size_ = options.tp_size == 0 ? default_tp : options.tp_size;
  config.ep_size_ = options.ep_size == 0 ? options.world_size : options.ep_size;
  config.ranks_per_node_ =
      options.ranks_per_node == 0 ? options.world_size : options.ranks_per_node;

  if (options.mode == ParallelMode::kTp && config.tp_size_ != config.world_size_) {
    return absl::InvalidArgumentError(
        absl::StrCat("mode tp needs tp_size == world_size, got tp_size=", config.tp_size_,
                     " world_size=", config.world_size_));
  }
  if (config.world_size_ % config.tp_size_ != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "world_size ", config.world_size_, " is not divisible by tp_size ", config.tp_size_));
  }
  if (config.ep_size_ != config.world_size_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "mode ", ParallelModeName(options.mode), " needs ep_size == world_size, got ep_size=",
        config.ep_size_, " world_size=", config.world_size_));
  }
  if (config.world_size_ % config.ranks_per_node_ != 0) {
    return absl::InvalidArgumentError(absl::StrCat("world_size ", config.world_size_,
                                                   " is not divisible by ranks_per_node ",
                                                   config.ranks_per_node_));
  }
  return config;
}

int WorldConfig::DpGroupOf(int rank) const {
  CHECK(rank >= 0 && rank < world_size_) << "rank " << rank << " of " << world_size_;
  return rank / tp_size_;
}

int WorldConfig::TpRankOf(int rank) const {
  CHECK(rank >= 0 && rank < world_size_) << "rank " << rank << " of " << world_size_;
  return rank % tp_size_;
}

int WorldConfig::NodeOf(int rank) const {
  CHECK(rank >= 0 && rank < world_size_) << "rank " << rank << " of " << world_size_;
  return rank / ranks_per_node_;
}

int WorldConfig::LocalRankOf(int rank) const {
  CHECK(rank >= 0 && rank < world_size_) << "rank " << rank << " of " << world_size_;
  return rank % ranks_per_node_;
}

std::vector<int> WorldConfig::TpGroupRanks(int group) const {
  CHECK(group >= 0 && group < dp_size()) << "dp group " << group << " of " << dp_size();
  std::vector<int> ranks(tp_size_);
  for (int t = 0; t < tp_size_; ++t) ranks[t] = group * tp_size_ + t;
  return ranks;
}

absl::StatusOr<ShardRange> WorldConfig::TpShard(int64_t length, UnevenPolicy policy,
                                                absl::string_view what) const {
  return SplitDimension(length, tp_size_, tp_rank(), policy, what);
}

absl::StatusOr<ShardRange> WorldConfig::ExpertShard(int64_t num_experts,
                                                    UnevenPolicy policy) const {
  return SplitDimension(num_experts, ep_size_, ep_rank(), policy, "num_experts");
}

std::string WorldConfig::DebugString() const {
  return absl::StrCat("rank ", rank_, "/", world_size_, " mode=", ParallelModeName(mode_),
                      " tp=", tp_size_, " (group ", dp_group(), ", tp rank ", tp_rank(),
                      ") ep=", ep_size_, " node ", node(), " local ", local_rank());
}

}  // namespace gemma::parallel
