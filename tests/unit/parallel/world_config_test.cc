// WorldConfig: rank arithmetic in tp and dp-ep modes, validation, and dimension splitting.
#include "worker/parallel/world_config.h"

#include "absl/strings/match.h"
#include "glog/logging.h"
#include "gtest/gtest.h"

namespace gemma::parallel {
namespace {

WorldConfig MakeOrDie(WorldConfig::Options options) {
  absl::StatusOr<WorldConfig> config = WorldConfig::Create(options);
  CHECK(config.ok()) << config.status();
  return *config;
}

TEST(WorldConfigTest, TpModeDefaultsToOneGroupOverAllRanks) {
  WorldConfig config = MakeOrDie({.world_size = 4, .rank = 3});
  EXPECT_EQ(config.tp_size(), 4);
  EXPECT_EQ(config.ep_size(), 4);
  EXPECT_EQ(config.dp_size(), 1);
  EXPECT_EQ(config.dp_group(), 0);
  EXPECT_EQ(config.tp_rank(), 3);
  EXPECT_EQ(config.ep_rank(), 3);
  EXPECT_EQ(config.node(), 0);
  EXPECT_EQ(config.local_rank(), 3);
  EXPECT_FALSE(config.is_leader());
  EXPECT_EQ(config.TpGroupRanks(0), (std::vector<int>{0, 1, 2, 3}));
}

TEST(WorldConfigTest, DpEpModeGroupsNodesAndExperts) {
  // 8 ranks on 2 nodes of 4, tp groups of 2: rank 5 is group 2, tp rank 1, node 1, local 1.
  WorldConfig config = MakeOrDie(
      {.world_size = 8, .rank = 5, .mode = ParallelMode::kDpEp, .tp_size = 2, .ranks_per_node = 4});
  EXPECT_EQ(config.dp_size(), 4);
  EXPECT_EQ(config.dp_group(), 2);
  EXPECT_EQ(config.tp_rank(), 1);
  EXPECT_EQ(config.ep_rank(), 5);
  EXPECT_EQ(config.node(), 1);
  EXPECT_EQ(config.local_rank(), 1);
  EXPECT_EQ(config.num_nodes(), 2);
  EXPECT_EQ(config.TpGroupRanks(3), (std::vector<int>{6, 7}));
  EXPECT_EQ(config.DpGroupOf(7), 3);
  // 128 experts over 8 ranks: rank 5 owns [80, 96).
  absl::StatusOr<ShardRange> experts = config.ExpertShard(128, UnevenPolicy::kRequireDivisible);
  ASSERT_TRUE(experts.ok()) << experts.status();
  EXPECT_EQ(*experts, (ShardRange{80, 16}));
  // 32 heads over the tp group of 2: tp rank 1 owns [16, 32).
  absl::StatusOr<ShardRange> heads =
      config.TpShard(32, UnevenPolicy::kRequireDivisible, "num_attention_heads");
  ASSERT_TRUE(heads.ok());
  EXPECT_EQ(*heads, (ShardRange{16, 16}));
  EXPECT_NE(config.DebugString().find("dp-ep"), std::string::npos);
}

TEST(WorldConfigTest, DpEpDefaultsToTpOne) {
  WorldConfig config = MakeOrDie({.world_size = 3, .rank = 2, .mode = ParallelMode::kDpEp});
  EXPECT_EQ(config.tp_size(), 1);
  EXPECT_EQ(config.dp_size(), 3);
  EXPECT_EQ(config.dp_group(), 2);
  EXPECT_EQ(config.tp_rank(), 0);
}

void ExpectInvalid(WorldConfig::Options options, const char* needle) {
  absl::StatusOr<WorldConfig> config = WorldConfig::Create(options);
  ASSERT_FALSE(config.ok());
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(config.status().message(), needle)) << config.status();
}

TEST(WorldConfigTest, InvalidConfigsNameTheProblem) {
  ExpectInvalid({.world_size = 0}, "world_size must be positive");
  ExpectInvalid({.world_size = 2, .rank = 2}, "rank 2 out of range");
  ExpectInvalid({.world_size = 2, .rank = -1}, "rank -1 out of range");
  ExpectInvalid({.world_size = 4, .tp_size = 2}, "mode tp needs tp_size == world_size");
  ExpectInvalid({.world_size = 6, .mode = ParallelMode::kDpEp, .tp_size = 4},
                "not divisible by tp_size 4");
  ExpectInvalid({.world_size = 4, .mode = ParallelMode::kDpEp, .ep_size = 2},
                "needs ep_size == world_size");
  ExpectInvalid({.world_size = 4, .ranks_per_node = 3}, "not divisible by ranks_per_node 3");
  ExpectInvalid({.world_size = 4, .tp_size = -1}, "must be positive");
}

TEST(WorldConfigTest, ParsesModeNames) {
  EXPECT_EQ(*ParseParallelMode("tp"), ParallelMode::kTp);
  EXPECT_EQ(*ParseParallelMode("dp-ep"), ParallelMode::kDpEp);
  EXPECT_EQ(ParseParallelMode("pp").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(SplitDimensionTest, DivisibleSplitIsContiguousAndCovering) {
  int64_t next = 0;
  for (int r = 0; r < 4; ++r) {
    absl::StatusOr<ShardRange> shard =
        SplitDimension(262144, 4, r, UnevenPolicy::kRequireDivisible);
    ASSERT_TRUE(shard.ok());
    EXPECT_EQ(shard->offset, next);
    EXPECT_EQ(shard->size, 65536);
    next += shard->size;
  }
  EXPECT_EQ(next, 262144);
}

TEST(SplitDimensionTest, UnevenLengthIsRejectedOrFrontLoaded) {
  absl::StatusOr<ShardRange> strict =
      SplitDimension(10, 4, 0, UnevenPolicy::kRequireDivisible, "num_key_value_heads");
  ASSERT_FALSE(strict.ok());
  EXPECT_TRUE(absl::StrContains(strict.status().message(), "num_key_value_heads of 10"));
  // 10 over 4: sizes 3, 3, 2, 2.
  std::vector<ShardRange> want = {{0, 3}, {3, 3}, {6, 2}, {8, 2}};
  for (int r = 0; r < 4; ++r) {
    EXPECT_EQ(*SplitDimension(10, 4, r, UnevenPolicy::kFrontLoaded), want[r]);
  }
  // Fewer elements than shards: trailing shards are empty.
  EXPECT_EQ(*SplitDimension(2, 4, 3, UnevenPolicy::kFrontLoaded), (ShardRange{2, 0}));
}

TEST(SplitDimensionTest, BadArgumentsAreInvalid) {
  EXPECT_EQ(SplitDimension(8, 0, 0, UnevenPolicy::kFrontLoaded).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SplitDimension(8, 2, 2, UnevenPolicy::kFrontLoaded).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SplitDimension(-1, 2, 0, UnevenPolicy::kFrontLoaded).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace gemma::parallel
