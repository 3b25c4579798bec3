// gemma-eplb-sim's pieces: the synthetic traces, the recorded-trace reader, the cost model and
// the replay loop (SimulateOne).
#include <sys/wait.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "eplb/cost_model.h"
#include "eplb/placement.h"
#include "eplb/simulate.h"
#include "eplb/traces.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace gemma::eplb {
namespace {

using ::testing::HasSubstr;

SyntheticParams Small(SyntheticKind kind) {
  SyntheticParams p;
  p.kind = kind;
  p.num_layers = 3;
  p.num_experts = 32;
  p.top_k = 4;
  p.tokens_per_window = 257;
  p.num_windows = 6;
  p.seed = 7;
  return p;
}

std::span<const int64_t> Layer(const Trace& t, int w, int l) {
  return std::span<const int64_t>(t.windows[w])
      .subspan(static_cast<size_t>(l) * t.num_experts, t.num_experts);
}

// The largest share of a layer's (token, expert) pairs that one expert takes, over the trace.
double HottestShare(const Trace& t) {
  double best = 0;
  for (size_t w = 0; w < t.windows.size(); ++w) {
    for (int l = 0; l < t.num_layers; ++l) {
      std::span<const int64_t> c = Layer(t, static_cast<int>(w), l);
      const double sum = static_cast<double>(std::accumulate(c.begin(), c.end(), int64_t{0}));
      best = std::max(best, static_cast<double>(*std::max_element(c.begin(), c.end())) / sum);
    }
  }
  return best;
}

TEST(SyntheticTraceTest, EveryKindIsDeterministicBySeedAndSumsToTokensTimesTopK) {
  for (SyntheticKind kind :
       {SyntheticKind::kZipf, SyntheticKind::kHotExpert, SyntheticKind::kHotRank,
        SyntheticKind::kRotating, SyntheticKind::kBurst}) {
    SCOPED_TRACE(SyntheticKindName(kind));
    const SyntheticParams p = Small(kind);
    absl::StatusOr<Trace> a = SyntheticTrace(p);
    absl::StatusOr<Trace> b = SyntheticTrace(p);
    SyntheticParams other = p;
    other.seed = 8;
    absl::StatusOr<Trace> c = SyntheticTrace(other);
    ASSERT_TRUE(a.ok() && b.ok() && c.ok()) << a.status();
    EXPECT_EQ(a->windows, b->windows);
    EXPECT_NE(a->windows, c->windows);
    ASSERT_EQ(a->windows.size(), 6u);
    for (int w = 0; w < 6; ++w) {
      for (int l = 0; l < 3; ++l) {
        std::span<const int64_t> counts = Layer(*a, w, l);
        EXPECT_EQ(std::accumulate(counts.begin(), counts.end(), int64_t{0}), 257 * 4);
        // Distinct experts per token: no expert is picked more often than there are tokens.
        EXPECT_LE(*std::max_element(counts.begin(), counts.end()), 257);
      }
    }
  }
}

TEST(SyntheticTraceTest, ZipfHasTheStatedSkewAndTopKOfAllExpertsIsEveryone) {
  SyntheticParams p;
  p.num_layers = 4;
  p.num_windows = 3;
  p.zipf_s = 1.2;
  absl::StatusOr<Trace> t = SyntheticTrace(p);
  ASSERT_TRUE(t.ok()) << t.status();
  // 128 experts: uniform would give 1/128 = 0.8% each; Zipf 1.2 gives the hottest about 1/8
  // of the pairs (it is in nearly every token's top-8).
  EXPECT_GT(HottestShare(*t), 8.0 / 128);

  SyntheticParams all = Small(SyntheticKind::kZipf);
  all.top_k = all.num_experts;  // every token takes every expert exactly once
  absl::StatusOr<Trace> every = SyntheticTrace(all);
  ASSERT_TRUE(every.ok());
  for (int64_t c : every->windows[0]) EXPECT_EQ(c, all.tokens_per_window);
}

TEST(SyntheticTraceTest, HotKindsPutTheirShareWhereTheySay) {
  SyntheticParams p = Small(SyntheticKind::kHotRank);
  p.hot_share = 0.8;
  p.hot_rank_blocks = 4;
  absl::StatusOr<Trace> t = SyntheticTrace(p);
  ASSERT_TRUE(t.ok());
  // One block of 8 experts per layer holds most of the pairs, and it is contiguous.
  for (int l = 0; l < 3; ++l) {
    std::span<const int64_t> c = Layer(*t, 0, l);
    int64_t best_block = 0, total = 0;
    for (int b = 0; b < 4; ++b) {
      best_block = std::max(best_block,
                            std::accumulate(c.begin() + 8 * b, c.begin() + 8 * b + 8, int64_t{0}));
    }
    total = std::accumulate(c.begin(), c.end(), int64_t{0});
    EXPECT_GT(static_cast<double>(best_block) / total, 0.5);
  }
  p = Small(SyntheticKind::kRotating);
  p.hot_share = 0.9;
  p.hot_experts = 1;
  p.rotate_every = 3;
  t = SyntheticTrace(p);
  ASSERT_TRUE(t.ok());
  auto hottest = [&](int w) {
    std::span<const int64_t> c = Layer(*t, w, 0);
    return std::max_element(c.begin(), c.end()) - c.begin();
  };
  EXPECT_EQ(hottest(0), hottest(2));
  // Redrawn at window 3 (1 in 32 chance of the same expert; seed 7 moves it).
  EXPECT_NE(hottest(2), hottest(3));
}

TEST(SyntheticTraceTest, RejectsOutOfRangeParametersNamingTheFlag) {
  SyntheticParams p = Small(SyntheticKind::kZipf);
  p.top_k = 33;
  EXPECT_THAT(std::string(SyntheticTrace(p).status().message()), HasSubstr("--top-k"));
  p = Small(SyntheticKind::kHotExpert);
  p.hot_share = 1.0;
  EXPECT_THAT(std::string(SyntheticTrace(p).status().message()), HasSubstr("--hot-share"));
  EXPECT_FALSE(ParseSyntheticKind("zipfian").ok());
  EXPECT_EQ(*ParseSyntheticKind("hot-rank"), SyntheticKind::kHotRank);
}

// As gemmactl experts --record writes them: proto field names, int64 as strings.
constexpr char kRecorded[] =
    R"({"replica_id":"r1","window":{"num_layers":2,"num_experts":3,"counts":["1","0","5","2","2","2"],"first_step":"1","last_step":"4","windows":"1","expert_ranks":1,"sequence":"1"}})"
    "\n"
    R"({"replicaId":"r2","window":{"numLayers":2,"numExperts":3,"counts":[7,0,0,0,0,7]}})"
    "\n\n"
    R"({"replica_id":"r1","window":{"num_layers":2,"num_experts":3,"counts":["0","0","9","1","1","1"]}})"
    "\n";

TEST(RecordedTraceTest, ReadsRecordedWindowsInFileOrderAndFiltersByReplica) {
  std::istringstream in(kRecorded);
  absl::StatusOr<Trace> all = ReadRecordedTrace(in, "rec.jsonl", "");
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->num_layers, 2);
  EXPECT_EQ(all->num_experts, 3);
  ASSERT_EQ(all->windows.size(), 3u);
  EXPECT_EQ(all->windows[0], (std::vector<int64_t>{1, 0, 5, 2, 2, 2}));
  EXPECT_EQ(all->windows[1], (std::vector<int64_t>{7, 0, 0, 0, 0, 7}));
  std::istringstream again(kRecorded);
  absl::StatusOr<Trace> r1 = ReadRecordedTrace(again, "rec.jsonl", "r1");
  ASSERT_TRUE(r1.ok());
  ASSERT_EQ(r1->windows.size(), 2u);
  EXPECT_EQ(r1->windows[1], (std::vector<int64_t>{0, 0, 9, 1, 1, 1}));
  std::istringstream none(kRecorded);
  absl::Status missing = ReadRecordedTrace(none, "rec.jsonl", "r9").status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.message()), HasSubstr("\"r1\", \"r2\""));
}

TEST(RecordedTraceTest, RejectsAMalformedLineNamingItsNumber) {
  const std::vector<std::pair<std::string, std::string>> bad = {
      {R"({"replica_id":"r1","window":{"num_layers":2,"num_experts":3,"counts":["1","0"]}})",
       "counts has 2 entries"},
      {R"({"replica_id":"r1","window":{"num_layers":2,"num_experts":3,"counts":["1","0","x","1","1","1"]}})",
       "counts[2]"},
      {R"({"replica_id":"r1","window":{"num_layers":2,"num_experts":3,"counts":[1,0,-4,1,1,1]}})",
       "negative"},
      {R"({"replica_id":"r1","window":{"num_experts":3,"counts":[]}})", "num_layers"},
      {R"({"replica_id":"r1", "window": )", "not valid JSON"},
      {R"({"replica_id":"r1","window":{"num_layers":1,"num_experts":6,"counts":[1,1,1,1,1,1]}})",
       "pick one replica"},
  };
  for (const auto& [line, why] : bad) {
    std::istringstream in(std::string(kRecorded) + line + "\n");
    absl::Status s = ReadRecordedTrace(in, "rec.jsonl", "").status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << line;
    EXPECT_THAT(std::string(s.message()), HasSubstr("rec.jsonl:5:")) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(why)) << s;
  }
}

TEST(RecordedTraceTest, ReadsAFileAndNamesItByItsBaseName) {
  const std::string path = ::testing::TempDir() + "/eplb_sim_test_trace.jsonl";
  {
    std::ofstream out(path);
    out << kRecorded;
  }
  absl::StatusOr<Trace> t = ReadRecordedTraceFile(path, "r1");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->name, "eplb_sim_test_trace.jsonl (r1)");
  EXPECT_EQ(ReadRecordedTraceFile(path + ".missing", "").status().code(),
            absl::StatusCode::kNotFound);
  std::remove(path.c_str());
}

TEST(CostModelTest, EvenPlacementWithoutCopiesModelsToTheIdeal) {
  const CostModel model;
  for (int nodes : {1, 2, 4}) {
    SCOPED_TRACE(nodes);
    const Topology topo{8, 8 / nodes};
    absl::StatusOr<Placement> p = StaticPlacement(1, 32, 8, 0);
    ASSERT_TRUE(p.ok());
    const CopyTable copies(*p);
    for (int64_t per_expert : {3, 300, 5000}) {
      const std::vector<int64_t> load(32, per_expert);
      const LayerTime t = ModelLayerTime(model, *p, copies, topo, 0, load);
      const LayerTime ideal = IdealLayerTime(model, topo, load);
      EXPECT_GT(t.total_s(), 0);
      EXPECT_NEAR(t.gemm_s, ideal.gemm_s, 1e-12 * ideal.gemm_s);
      EXPECT_NEAR(t.comm_s, ideal.comm_s, 1e-12 * ideal.comm_s + 1e-18);
    }
  }
}

TEST(CostModelTest, LoadOnOneRankRaisesTheTime) {
  const CostModel model;
  const Topology topo{8, 4};
  absl::StatusOr<Placement> p = StaticPlacement(1, 32, 8, 0);
  ASSERT_TRUE(p.ok());
  const CopyTable copies(*p);
  const std::vector<int64_t> even(32, 1000);
  std::vector<int64_t> skewed(32, 0);
  // The same 32000 pairs, all on rank 0's experts 0..3.
  for (int e = 0; e < 4; ++e) skewed[e] = 8000;
  const LayerTime t_even = ModelLayerTime(model, *p, copies, topo, 0, even);
  const LayerTime t_skewed = ModelLayerTime(model, *p, copies, topo, 0, skewed);
  EXPECT_GT(t_skewed.gemm_s, 4 * t_even.gemm_s);
  EXPECT_GT(t_skewed.comm_s, 4 * t_even.comm_s);
  // Copies of the hot experts on every rank make their tokens local: no all-to-all for them.
  absl::StatusOr<Placement> spread =
      BalancedPlacement(std::vector<int64_t>(skewed), 1, 32, topo, 24);
  ASSERT_TRUE(spread.ok()) << spread.status();
  const LayerTime t_spread = ModelLayerTime(model, *spread, CopyTable(*spread), topo, 0, skewed);
  EXPECT_LT(t_spread.total_s(), t_skewed.total_s() / 4);
}

TEST(CostModelTest, ExpectationMatchesRoutingEveryTokenThroughChooseCopy) {
  // Copies fitted to a skewed load, then 840 tokens per expert from every rank (840 divides
  // evenly over any 1..8 copies, so the expectation is exact).
  const CostModel model;
  const Topology topo{8, 4};
  std::vector<int64_t> skew(16);
  for (int e = 0; e < 16; ++e) skew[e] = 4000 / (e + 1);
  absl::StatusOr<Placement> p = BalancedPlacement(skew, 1, 16, topo, 16);
  ASSERT_TRUE(p.ok()) << p.status();
  const CopyTable copies(*p);
  constexpr int64_t kPerSource = 840;
  std::vector<double> pairs(8, 0), intra_in(8, 0), intra_out(8, 0), inter_in(8, 0), inter_out(8, 0);
  int max_copies = 0;
  for (int e = 0; e < 16; ++e) {
    max_copies = std::max(max_copies, static_cast<int>(copies.Copies(0, e).size()));
    for (int s = 0; s < 8; ++s) {
      for (int64_t nth = 0; nth < kPerSource; ++nth) {
        const int r =
            ChooseCopy(copies.Copies(0, e), p->slots_per_rank, s, topo, nth) / p->slots_per_rank;
        ++pairs[r];
        if (r == s) continue;
        const bool same_node = topo.NodeOf(r) == topo.NodeOf(s);
        ++(same_node ? intra_in : inter_in)[r];
        ++(same_node ? intra_out : inter_out)[s];
      }
    }
  }
  ASSERT_GT(max_copies, 2);  // the check needs real copies
  double gemm = 0, comm = 0;
  for (int r = 0; r < 8; ++r) {
    // Every slot gets hundreds of tokens: one read each.
    gemm = std::max(gemm,
                    std::max(p->slots_per_rank * model.ExpertWeightBytes() / model.hbm_bytes_per_s,
                             pairs[r] * model.FlopsPerToken() / model.peak_flops));
    comm = std::max(comm, model.WireBytesPerToken() *
                              (std::max(intra_in[r], intra_out[r]) / model.intra_node_bytes_per_s +
                               std::max(inter_in[r], inter_out[r]) / model.inter_node_bytes_per_s));
  }
  const LayerTime t =
      ModelLayerTime(model, *p, copies, topo, 0, std::vector<int64_t>(16, 8 * kPerSource));
  EXPECT_NEAR(t.gemm_s, gemm, 1e-9 * gemm);
  EXPECT_NEAR(t.comm_s, comm, 1e-9 * comm);
}

TEST(CostModelTest, ExpectedReadsFollowTheTokensInASlot) {
  CostModel model;
  model.peak_flops = 1e30;  // weight reads only
  const Topology topo{4, 4};
  absl::StatusOr<Placement> p = StaticPlacement(1, 4, 4, 0);
  ASSERT_TRUE(p.ok());
  const CopyTable copies(*p);
  const double one_read = model.ExpertWeightBytes() / model.hbm_bytes_per_s;
  const LayerTime cold =
      ModelLayerTime(model, *p, copies, topo, 0, std::vector<int64_t>{0, 0, 0, 0});
  EXPECT_EQ(cold.gemm_s, 0);
  const LayerTime hot =
      ModelLayerTime(model, *p, copies, topo, 0, std::vector<int64_t>{100, 0, 0, 0});
  EXPECT_NEAR(hot.gemm_s, one_read, 1e-9 * one_read);
}

TEST(SimulateOneTest, BalancedBeatsStaticAndRoundRobinOnSkewedZipfAtEp16Redundant16) {
  SyntheticParams p;  // 30 layers, 128 experts, top-8, 4096 tokens a window
  p.zipf_s = 1.2;
  p.num_windows = 6;
  p.seed = 1;
  absl::StatusOr<Trace> trace = SyntheticTrace(p);
  ASSERT_TRUE(trace.ok());
  for (int nodes : {1, 4}) {
    SCOPED_TRACE(nodes);
    SimConfig config;
    config.topology = Topology{16, 16 / nodes};
    config.redundant = 16;
    absl::StatusOr<SimResult> r = SimulateOne(*trace, config);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->scored_windows, 5);
    EXPECT_GE(r->balanced.balancedness, r->static_blocks.balancedness);
    EXPECT_GE(r->balanced.balancedness, r->round_robin.balancedness);
    EXPECT_LE(r->balanced.layer_time.total_s(), r->static_blocks.layer_time.total_s());
    EXPECT_LE(r->balanced.layer_time.total_s(), r->round_robin.layer_time.total_s());
    // The issue's target.
    EXPECT_GE(r->balanced.balancedness, 0.90);
    EXPECT_GT(r->SpeedupOverStatic(), 1.0);
  }
}

TEST(SimulateOneTest, RejectsShapesThatMakeNoPlacementAndTooShortTraces) {
  absl::StatusOr<Trace> trace = SyntheticTrace(Small(SyntheticKind::kZipf));
  ASSERT_TRUE(trace.ok());
  SimConfig config;
  config.topology = Topology{64, 8};  // 32 experts leave ranks without a slot
  EXPECT_EQ(SimulateOne(*trace, config).status().code(), absl::StatusCode::kInvalidArgument);
  config.topology = Topology{8, 3};
  EXPECT_THAT(std::string(SimulateOne(*trace, config).status().message()),
              HasSubstr("do not split into nodes"));
  trace->windows.resize(1);
  config.topology = Topology{8, 4};
  EXPECT_THAT(std::string(SimulateOne(*trace, config).status().message()), HasSubstr("at least 2"));
}

TEST(SimulateOneTest, ScoresThePlacementFittedOnEarlierWindowsNeverOnTheScoredOne) {
  // The hot expert moves every window, so a placement fitted on window w - 1 misses window w.
  SyntheticParams p = Small(SyntheticKind::kRotating);
  p.hot_experts = 1;
  p.hot_share = 0.9;
  p.rotate_every = 1;
  absl::StatusOr<Trace> trace = SyntheticTrace(p);
  ASSERT_TRUE(trace.ok());
  SimConfig config;
  config.topology = Topology{8, 4};
  config.redundant = 8;
  config.ema = 1.0;  // fit on the last window only
  absl::StatusOr<SimResult> r = SimulateOne(*trace, config);
  ASSERT_TRUE(r.ok()) << r.status();
  double stale = 0, hindsight = 0;
  for (size_t w = 1; w < trace->windows.size(); ++w) {
    auto fit = [&](const std::vector<int64_t>& load) {
      absl::StatusOr<Placement> placement =
          BalancedPlacement(load, p.num_layers, p.num_experts, config.topology, 8);
      EXPECT_TRUE(placement.ok());
      return Balancedness(*placement, trace->windows[w]);
    };
    stale += fit(trace->windows[w - 1]);
    hindsight += fit(trace->windows[w]);
  }
  const int scored = static_cast<int>(trace->windows.size()) - 1;
  EXPECT_NEAR(r->balanced.balancedness, stale / scored, 1e-12);
  EXPECT_LT(r->balanced.balancedness, hindsight / scored - 0.1);
}

#ifdef GEMMA_BINARY_DIR
TEST(EplbSimBinaryTest, HelpExitsZeroAndBadFlagsExitTwo) {
  const std::string bin = std::string(GEMMA_BINARY_DIR) + "/bin/gemma-eplb-sim";
  if (!std::ifstream(bin)) GTEST_SKIP() << bin << " is not built";
  EXPECT_EQ(std::system((bin + " --help > /dev/null").c_str()), 0);
  EXPECT_EQ(WEXITSTATUS(std::system((bin + " --synthetic zipf --ep 8,x 2> /dev/null").c_str())), 2);
  EXPECT_EQ(WEXITSTATUS(std::system((bin + " --synthetic nope 2> /dev/null").c_str())), 2);
  EXPECT_EQ(WEXITSTATUS(std::system((bin + " 2> /dev/null").c_str())), 2);
  EXPECT_EQ(std::system((bin + " --synthetic zipf --layers 2 --experts 16 --top-k 4 --windows 3 "
                               "--tokens-per-window 64 --ep 4,8 --redundant 0,4 --nodes 1,2 "
                               "--format json > /dev/null")
                            .c_str()),
            0);
}
#endif

}  // namespace
}  // namespace gemma::eplb
