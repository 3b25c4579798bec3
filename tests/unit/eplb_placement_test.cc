// Expert placement: every constructor's placements are valid (every logical expert somewhere,
// slots full, never two copies of one expert on a rank), the balancer evens a skewed layer, is
// deterministic, prefers spreading a hot expert's copies over nodes, is never worse than
// round-robin on the next window of a stable skew, and copies are chosen as documented.
#include "eplb/placement.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>

#include "eplb/placement_json.h"

#include "gtest/gtest.h"

namespace gemma::eplb {
namespace {

// Zipf-like skew with a random expert order per layer: load[e] ~ 1 / rank(e)^s.
std::vector<int64_t> SkewedLoad(int layers, int experts, double s, uint64_t seed,
                                int64_t tokens = 100000) {
  std::mt19937_64 rng(seed);
  std::vector<int64_t> load(static_cast<size_t>(layers) * experts);
  for (int l = 0; l < layers; ++l) {
    std::vector<int> order(experts);
    for (int e = 0; e < experts; ++e) order[e] = e;
    std::shuffle(order.begin(), order.end(), rng);
    double norm = 0;
    for (int i = 0; i < experts; ++i) norm += 1.0 / std::pow(i + 1, s);
    for (int i = 0; i < experts; ++i) {
      load[l * experts + order[i]] = static_cast<int64_t>(tokens / std::pow(i + 1, s) / norm);
    }
  }
  return load;
}

// Adds noise of up to +-`jitter` relative to each count (the next window of the same workload).
std::vector<int64_t> Jitter(std::vector<int64_t> load, double jitter, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(1 - jitter, 1 + jitter);
  for (int64_t& v : load) v = static_cast<int64_t>(v * u(rng));
  return load;
}

TEST(PlacementShapeTest, RefusesCountsThatDoNotDivideOrNeedTwoCopiesOnARank) {
  EXPECT_TRUE(CheckShape(4, 16, 4, 0).ok());
  EXPECT_TRUE(CheckShape(4, 16, 4, 4).ok());
  absl::Status uneven = CheckShape(4, 16, 4, 3);
  EXPECT_EQ(uneven.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(uneven.message().find("multiple of 4"), std::string::npos) << uneven;
  EXPECT_FALSE(CheckShape(4, 4, 2, 6).ok());  // 10 slots over 2 ranks of 4 experts
  EXPECT_FALSE(CheckShape(4, 16, 0, 0).ok());
  EXPECT_FALSE(CheckShape(4, 16, 4, -4).ok());
}

TEST(PlacementValidityTest, EveryConstructorGivesValidPlacements) {
  for (int ranks : {1, 2, 4, 8, 16}) {
    for (int redundant : {0, 16, 32, 48}) {
      if (!CheckShape(3, 32, ranks, redundant).ok()) continue;
      SCOPED_TRACE(testing::Message() << ranks << " ranks, " << redundant << " redundant");
      auto s = StaticPlacement(3, 32, ranks, redundant);
      ASSERT_TRUE(s.ok()) << s.status();
      EXPECT_TRUE(Validate(*s).ok()) << Validate(*s);
      auto rr = RoundRobinPlacement(3, 32, ranks, redundant);
      ASSERT_TRUE(rr.ok()) << rr.status();
      EXPECT_TRUE(Validate(*rr).ok()) << Validate(*rr);
      for (int per_node : {1, 2, 4}) {
        if (ranks % per_node != 0) continue;
        auto b = BalancedPlacement(SkewedLoad(3, 32, 1.2, ranks * 100 + redundant), 3, 32,
                                   {ranks, per_node}, redundant);
        ASSERT_TRUE(b.ok()) << b.status();
        EXPECT_TRUE(Validate(*b).ok()) << Validate(*b);
        EXPECT_EQ(b->slots_per_rank, (32 + redundant) / ranks);
      }
    }
  }
}

TEST(PlacementValidityTest, ValidateNamesTheProblem) {
  Placement p = *StaticPlacement(2, 8, 2, 0);
  p.slots[1] = p.slots[0];  // layer 0 rank 0: expert 0 twice, expert 1 nowhere
  absl::Status s = Validate(p);
  EXPECT_NE(s.message().find("two copies of expert 0"), std::string::npos) << s;
  p = *StaticPlacement(2, 8, 2, 0);
  p.slots[3] = 99;
  s = Validate(p);
  EXPECT_NE(s.message().find("holds expert 99"), std::string::npos) << s;
  p = *StaticPlacement(2, 8, 2, 0);
  p.slots.pop_back();
  EXPECT_FALSE(Validate(p).ok());
}

TEST(PlacementStaticTest, IsTheContiguousBlocksAndItsCopyTableSaysSo) {
  Placement p = *StaticPlacement(2, 8, 4, 0);
  for (int r = 0; r < 4; ++r) {
    EXPECT_EQ(p.RankSlots(1, r)[0], 2 * r);
    EXPECT_EQ(p.RankSlots(1, r)[1], 2 * r + 1);
  }
  EXPECT_TRUE(CopyTable(p).contiguous());
  EXPECT_FALSE(CopyTable(*StaticPlacement(2, 8, 4, 4)).contiguous());
  EXPECT_FALSE(CopyTable(*RoundRobinPlacement(2, 8, 4, 0)).contiguous());
}

TEST(BalancedPlacementTest, EvensASkewedLayerFarBetterThanStatic) {
  const std::vector<int64_t> load = SkewedLoad(30, 128, 1.2, 7);
  Placement fixed = *StaticPlacement(30, 128, 16, 16);
  Placement ours = *BalancedPlacement(load, 30, 128, {16, 8}, 16);
  const double b_static = Balancedness(fixed, load), b_ours = Balancedness(ours, load);
  EXPECT_LT(b_static, 0.6);
  EXPECT_GE(b_ours, 0.9) << "static " << b_static;
}

TEST(BalancedPlacementTest, GivesTheHottestExpertsTheCopies) {
  std::vector<int64_t> load(16, 10);
  load[5] = 1000;
  load[9] = 400;
  Placement p = *BalancedPlacement(load, 1, 16, {4, 4}, 4);
  std::vector<int> copies(16, 0);
  for (int32_t e : p.slots) ++copies[e];
  EXPECT_EQ(copies[5], 4);  // 1000/4 = 250 > 400/2 = 200 after the first three
  EXPECT_EQ(copies[9], 2);
  EXPECT_EQ(copies[0], 1);
}

TEST(BalancedPlacementTest, IsDeterministicAndStaticForAnIdleLayer) {
  std::vector<int64_t> load = SkewedLoad(4, 32, 1.0, 3);
  std::fill(load.begin() + 32, load.begin() + 64, 0);  // layer 1 saw nothing
  Placement a = *BalancedPlacement(load, 4, 32, {8, 4}, 8);
  Placement b = *BalancedPlacement(load, 4, 32, {8, 4}, 8);
  EXPECT_TRUE(a.SameSlots(b));
  Placement fixed = *StaticPlacement(4, 32, 8, 8);
  for (int r = 0; r < 8; ++r) {
    EXPECT_TRUE(std::equal(a.RankSlots(1, r).begin(), a.RankSlots(1, r).end(),
                           fixed.RankSlots(1, r).begin()));
  }
}

TEST(BalancedPlacementTest, SpreadsAHotExpertsCopiesOverNodes) {
  std::vector<int64_t> load(32, 10);
  load[3] = 5000;
  Placement p = *BalancedPlacement(load, 1, 32, {8, 2}, 8);  // 4 nodes of 2 ranks
  std::vector<int> per_node(4, 0);
  for (int r = 0; r < 8; ++r) {
    for (int32_t e : p.RankSlots(0, r)) per_node[r / 2] += e == 3;
  }
  for (int n = 0; n < 4; ++n) EXPECT_GE(per_node[n], 1) << "node " << n;
}

TEST(BalancedPlacementTest, NeverWorseThanRoundRobinOnTheNextWindow) {
  // Fitted on one window, scored on the next: the same skew with +-30% noise per count.
  for (uint64_t seed = 1; seed <= 20; ++seed) {
    for (int ranks : {8, 16, 32}) {
      for (int redundant : {0, 32}) {
        const std::vector<int64_t> fit = SkewedLoad(6, 128, 0.6 + 0.05 * seed, seed);
        const std::vector<int64_t> next = Jitter(fit, 0.3, seed + 1000);
        Placement ours = *BalancedPlacement(fit, 6, 128, {ranks, 4}, redundant);
        Placement rr = *RoundRobinPlacement(6, 128, ranks, redundant);
        EXPECT_GE(Balancedness(ours, next), Balancedness(rr, next))
            << "seed " << seed << ", " << ranks << " ranks, " << redundant << " redundant";
      }
    }
  }
}

TEST(CopyChoiceTest, PrefersOwnRankThenNodeThenTakesCopiesInTurn) {
  const Topology topo{8, 4};  // two nodes of four ranks, 2 slots each
  const std::vector<int32_t> copies = {1 * 2 + 0, 5 * 2 + 1, 6 * 2 + 0};  // ranks 1, 5, 6
  EXPECT_EQ(ChooseCopy(copies, 2, 1, topo, 7), 2);     // its own rank
  EXPECT_EQ(ChooseCopy(copies, 2, 0, topo, 3), 2);     // node 0 has only rank 1's
  EXPECT_EQ(ChooseCopy(copies, 2, 4, topo, 0), 11);    // node 1: ranks 5 and 6 in turn
  EXPECT_EQ(ChooseCopy(copies, 2, 4, topo, 1), 12);
  EXPECT_EQ(ChooseCopy(copies, 2, 4, topo, 2), 11);
  const std::vector<int32_t> far = {0, 2};  // ranks 0 and 1 (1 slot each), node 0 only
  EXPECT_EQ(ChooseCopy(far, 1, 6, topo, 0), 0);
  EXPECT_EQ(ChooseCopy(far, 1, 6, topo, 1), 2);
}

TEST(PlacementSerializationTest, RoundTripsAndRejectsDamage) {
  Placement p = *BalancedPlacement(SkewedLoad(3, 16, 1.0, 9), 3, 16, {4, 2}, 4);
  p.epoch = 42;
  const std::string bytes = SerializePlacement(p);
  auto back = ParsePlacement(bytes);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->epoch, 42u);
  EXPECT_TRUE(back->SameSlots(p));
  EXPECT_EQ(ParsePlacement(bytes.substr(0, 10)).status().code(), absl::StatusCode::kDataLoss);
  std::string bad = bytes;
  bad[24] = static_cast<char>(bad[28]);  // layer 0 rank 0's first two slots now equal
  bad[25] = bad[29];
  bad[26] = bad[30];
  bad[27] = bad[31];
  EXPECT_EQ(ParsePlacement(bad).status().code(), absl::StatusCode::kInvalidArgument);
}


TEST(PlacementJsonTest, RoundTripsThroughTextAndFile) {
  Placement p = *BalancedPlacement(SkewedLoad(3, 16, 1.0, 5), 3, 16, {4, 2}, 4);
  p.epoch = 7;
  const std::string json = PlacementToJson(p);
  // Five header lines and the closing two, per layer its brackets and one line per rank.
  EXPECT_EQ(std::count(json.begin(), json.end(), '\n'), 1 + 5 + 3 * (2 + 4) + 2) << json;
  auto back = PlacementFromJson(json);
  ASSERT_TRUE(back.ok()) << back.status() << "\n" << json;
  EXPECT_EQ(back->epoch, 7u);
  EXPECT_TRUE(back->SameSlots(p));

  const std::string path =
      ::testing::TempDir() + "/eplb_placement_test_" + std::to_string(getpid()) + ".json";
  std::ofstream(path) << json;
  auto read = ReadPlacementFile(path);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_TRUE(read->SameSlots(p));
  std::remove(path.c_str());
  auto missing = ReadPlacementFile(path);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find(path), std::string::npos) << missing.status();
}

TEST(PlacementJsonTest, BadFieldsAreNamedByTheirPath) {
  // 2 layers of 4 experts over 2 ranks with 3 slots each.
  auto json = [](const std::string& layers, const std::string& head =
                                                 R"("num_experts": 4, "num_ranks": 2, )"
                                                 R"("slots_per_rank": 3)") {
    return "{" + head + R"(, "layers": )" + layers + "}";
  };
  const std::string good = "[[[0, 1, 2], [3, 0, 1]], [[3, 2, 1], [0, 1, 2]]]";
  ASSERT_TRUE(PlacementFromJson(json(good)).ok()) << PlacementFromJson(json(good)).status();
  struct Bad {
    std::string text;
    std::string expected;
  };
  const std::vector<Bad> cases = {
      {R"({"num_experts": 4,)", "line 1"},
      {"[1, 2]", "top level"},
      {json(good, R"("num_experts": 4, "slots_per_rank": 3)"), "num_ranks: missing"},
      {json(good, R"("num_experts": -4, "num_ranks": 2, "slots_per_rank": 3)"), "num_experts"},
      {json(good, R"("epoch": "x", "num_experts": 4, "num_ranks": 2, "slots_per_rank": 3)"),
       "epoch"},
      {json(good, R"("num_experts": 4, "num_ranks": 2, "slot_per_rank": 3)"), "slot_per_rank"},
      {json(R"({"a": 1})"), "layers: expected an array"},
      {json("[[[0, 1, 2], [3, 0, 1]], [[3, 2, 1]]]"), "layers[1]: expected an array of "
                                                      "num_ranks = 2"},
      {json("[[[0, 1, 2], [3, 0]], [[3, 2, 1], [0, 1, 2]]]"), "layers[0][1]: expected"},
      {json(R"([[[0, 1, 2], [3, 0, 1]], [[3, 2, 1], [0, "x", 2]]])"), "layers[1][1][1]"},
      {json("[[[0, 1, 2], [3, 0, 1]], [[3, 2, 1], [0, 1.5, 2]]]"), "layers[1][1][1]"},
      {json("[[[0, 1, 1], [3, 0, 2]], [[3, 2, 1], [0, 1, 2]]]"), "two copies of expert 1"},
      {json("[[[0, 1, 2], [0, 1, 2]], [[3, 2, 1], [0, 1, 2]]]"), "no copy of expert 3"},
      {json("[[[0, 1, 2], [3, 0, 9]], [[3, 2, 1], [0, 1, 2]]]"), "expert 9"},
  };
  for (const Bad& c : cases) {
    auto parsed = PlacementFromJson(c.text);
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument) << c.text;
    EXPECT_NE(parsed.status().message().find(c.expected), std::string::npos)
        << c.text << "\ngave: " << parsed.status();
  }
  const std::string path =
      ::testing::TempDir() + "/eplb_placement_bad_" + std::to_string(getpid()) + ".json";
  std::ofstream(path) << json(R"([[[0, 1, 2], [3, 0, 1]], [[3, 2, 1], [0, "x", 2]]])");
  auto read = ReadPlacementFile(path);
  std::remove(path.c_str());
  EXPECT_EQ(read.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(read.status().message().find(path + ": "), std::string::npos) << read.status();
  EXPECT_NE(read.status().message().find("layers[1][1][1]"), std::string::npos) << read.status();
}

}  // namespace
}  // namespace gemma::eplb
