// The same model spread over W ranks (threads with in-process communicators) gives the
// single-rank result: logits within kSelfRelTol, identical greedy continuations and identical
// seeded samples, in tp mode (tp 1, 2, 4: above the global layers' single KV head) and in
// dp-ep mode (groups of T = 1 and 2, each group with its own sequences, one group idle for
// several steps). Also: the traffic the byte counters record is what the design says.
#include <cmath>
#include <functional>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/child_process.h"
#include "tests/testing/compare.h"
#include "tests/testing/thread_replica.h"
#include "tests/testing/tolerances.h"
#include "worker/backend/cpu/cpu_backend.h"
#include "worker/engine/generate.h"
#include "worker/model/gemma4/model.h"
#include "worker/parallel/in_process_communicator.h"
#include "eplb/placement.h"
#include "common/model_config.h"

namespace gemma {
namespace {

using gemma4::LogitsMode;
using gemma4::Model;
using gemma4::ModelParallel;
using gemma4::SequenceStep;

using testing::FullVocabSampledOptions;
using testing::RandomPrompt;
using testing::ReplicaCase;
using testing::SampledOptions;
using Rank = testing::ReplicaRank;

// W CPU ranks of one thread each: tp mode when `dp_ep` is false (one group of W), else groups
// of `tp` ranks with experts over all W.
class Replica : public testing::ThreadReplica {
 public:
  Replica(const std::string& model, int world, int tp, bool dp_ep)
      : ThreadReplica(Options(model, world, tp, dp_ep)) {}

 private:
  static testing::ReplicaOptions Options(const std::string& model, int world, int tp,
                                         bool dp_ep) {
    testing::ReplicaOptions o;
    o.model = model;
    o.world = world;
    o.tp = tp;
    o.dp_ep = dp_ep;
    o.make_backend = [](int, Rank&) -> absl::StatusOr<std::unique_ptr<Backend>> {
      return std::make_unique<CpuBackend>(CpuBackendOptions{1});
    };
    return o;
  }
};

struct Single {
  std::vector<float> logits;
  std::vector<int32_t> greedy, sampled;
};

Single RunSingle(const std::string& model, const std::vector<int32_t>& prompt) {
  Replica one(model, 1, 1, false);
  Rank& r = one.rank(0);
  Single s;
  s.logits = *PromptLogits(*r.model, *r.cache, prompt);
  GenerateOptions greedy;
  greedy.max_new_tokens = 20;
  s.greedy = *Generate(*r.model, *r.cache, prompt, greedy);
  s.sampled = *Generate(*r.model, *r.cache, prompt, SampledOptions());
  auto full = *Generate(*r.model, *r.cache, prompt, FullVocabSampledOptions());
  s.sampled.insert(s.sampled.end(), full.begin(), full.end());
  return s;
}

class EquivalenceTest : public ::testing::TestWithParam<ReplicaCase> {};

TEST_P(EquivalenceTest, LogitsGreedyAndSeededSamplesEqualOneRank) {
  const ReplicaCase& c = GetParam();
  Replica replica(c.model, c.world, c.tp, c.dp_ep);
  const int groups = c.dp_ep ? c.world / c.tp : 1;
  // Each data-parallel group gets its own prompt; tp ranks of a group share it.
  std::vector<std::vector<int32_t>> prompts;
  std::vector<Single> expected;
  for (int g = 0; g < groups; ++g) {
    prompts.push_back(RandomPrompt(19 + 7 * g, 100 + g));
    expected.push_back(RunSingle(c.model, prompts[g]));
  }
  std::vector<Single> got(c.world);
  replica.RunAll([&](int r) {
    Rank& rank = replica.rank(r);
    const auto& prompt = prompts[c.dp_ep ? r / c.tp : 0];
    auto logits = PromptLogits(*rank.model, *rank.cache, prompt);
    ASSERT_TRUE(logits.ok()) << logits.status();
    got[r].logits = *logits;
    GenerateOptions greedy;
    greedy.max_new_tokens = 20;
    auto g = Generate(*rank.model, *rank.cache, prompt, greedy);
    ASSERT_TRUE(g.ok()) << g.status();
    got[r].greedy = *g;
    auto s = Generate(*rank.model, *rank.cache, prompt, SampledOptions());
    ASSERT_TRUE(s.ok()) << s.status();
    got[r].sampled = *s;
    auto f = Generate(*rank.model, *rank.cache, prompt, FullVocabSampledOptions());
    ASSERT_TRUE(f.ok()) << f.status();
    got[r].sampled.insert(got[r].sampled.end(), f->begin(), f->end());
  });
  for (int r = 0; r < c.world; ++r) {
    const Single& want = expected[c.dp_ep ? r / c.tp : 0];
    auto cmp = testing::Compare(got[r].logits, want.logits);
    EXPECT_LE(cmp.Relative(), testing::kSelfRelTol) << "rank " << r << ": " << cmp.ToString();
    EXPECT_EQ(got[r].greedy, want.greedy) << "rank " << r;
    EXPECT_EQ(got[r].sampled, want.sampled) << "rank " << r;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Modes, EquivalenceTest,
    ::testing::Values(ReplicaCase{"tiny-dense", 2, 2, false}, ReplicaCase{"tiny-dense", 4, 4, false},
                      ReplicaCase{"tiny-moe", 2, 2, false}, ReplicaCase{"tiny-moe", 4, 4, false},
                      ReplicaCase{"tiny-moe", 2, 1, true}, ReplicaCase{"tiny-moe", 4, 1, true},
                      ReplicaCase{"tiny-moe", 4, 2, true}),
    testing::ReplicaCaseName);

// The trained demo model over ranks: logits within the same tolerance and identical greedy
// continuations, on held-out text. (Seeded samples are not compared: a trained model's
// distribution has long flat tails, and the last-bit differences tp's reductions make in the
// logits can move a draw across a boundary between two tokens; the random tiny models' peaked
// distributions keep them identical, which the test above checks.)
class DemoModelEquivalenceTest : public ::testing::TestWithParam<ReplicaCase> {};

TEST_P(DemoModelEquivalenceTest, LogitsAndGreedyEqualOneRank) {
  const ReplicaCase& c = GetParam();
  Replica replica(c.model, c.world, c.tp, c.dp_ep);
  const nlohmann::json manifest = nlohmann::json::parse(testing::ReadFileToString(
      testing::GoldenPath("reference/kjv-moe/manifest.json")));
  const std::vector<int32_t> prompt = manifest["prompts"][3]["tokens"].get<std::vector<int32_t>>();
  Replica one(c.model, 1, 1, false);
  auto want_logits = PromptLogits(*one.rank(0).model, *one.rank(0).cache, prompt);
  ASSERT_TRUE(want_logits.ok()) << want_logits.status();
  GenerateOptions greedy;
  greedy.max_new_tokens = 24;
  auto want_greedy = Generate(*one.rank(0).model, *one.rank(0).cache, prompt, greedy);
  ASSERT_TRUE(want_greedy.ok()) << want_greedy.status();
  std::vector<std::vector<float>> logits(c.world);
  std::vector<std::vector<int32_t>> continuations(c.world);
  replica.RunAll([&](int r) {
    Rank& rank = replica.rank(r);
    auto l = PromptLogits(*rank.model, *rank.cache, prompt);
    ASSERT_TRUE(l.ok()) << l.status();
    logits[r] = *l;
    auto g = Generate(*rank.model, *rank.cache, prompt, greedy);
    ASSERT_TRUE(g.ok()) << g.status();
    continuations[r] = *g;
  });
  for (int r = 0; r < c.world; ++r) {
    auto cmp = testing::Compare(logits[r], *want_logits);
    EXPECT_LE(cmp.Relative(), testing::kSelfRelTol) << "rank " << r << ": " << cmp.ToString();
    EXPECT_EQ(continuations[r], *want_greedy) << "rank " << r;
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, DemoModelEquivalenceTest,
                         ::testing::Values(ReplicaCase{"kjv-moe", 2, 2, false},
                                           ReplicaCase{"kjv-moe", 2, 1, true}),
                         testing::ReplicaCaseName);

// Random expert placements, hot experts with several copies, in every mode: the experts' outputs
// are summed in expert order wherever they ran, so logits stay within the same tolerance of one
// rank and greedy continuations are identical.
struct PlacementCase {
  ReplicaCase replica;
  int redundant;
  int ranks_per_node;
};
void PrintTo(const PlacementCase& c, std::ostream* os) {
  *os << c.replica.model << " world " << c.replica.world << " tp " << c.replica.tp
      << (c.replica.dp_ep ? " dp-ep" : "") << ", " << c.redundant << " redundant, "
      << c.ranks_per_node << " ranks per node";
}

class PlacementEquivalenceTest : public ::testing::TestWithParam<PlacementCase> {};

TEST_P(PlacementEquivalenceTest, RandomPlacementsWithCopiesEqualOneRank) {
  const PlacementCase& pc = GetParam();
  const ReplicaCase& c = pc.replica;
  const ModelConfig config = *LoadModelConfig(testing::GoldenPath(c.model));
  const int ep = c.dp_ep ? c.world : c.tp;
  for (uint64_t seed : {1u, 2u}) {
    // A random, steep skew makes the balancer give a few experts several copies.
    std::mt19937_64 rng(seed);
    std::vector<int64_t> load(static_cast<size_t>(config.num_hidden_layers) * config.num_experts);
    for (int64_t& v : load) v = static_cast<int64_t>(std::exp2(rng() % 12));
    auto placement = eplb::BalancedPlacement(load, config.num_hidden_layers, config.num_experts,
                                             {ep, pc.ranks_per_node}, pc.redundant);
    ASSERT_TRUE(placement.ok()) << placement.status();
    ASSERT_FALSE(eplb::CopyTable(*placement).contiguous());
    testing::ReplicaOptions o;
    o.model = c.model;
    o.world = c.world;
    o.tp = c.tp;
    o.dp_ep = c.dp_ep;
    o.placement = *placement;
    o.ranks_per_node = pc.ranks_per_node;
    o.make_backend = [](int, Rank&) -> absl::StatusOr<std::unique_ptr<Backend>> {
      return std::make_unique<CpuBackend>(CpuBackendOptions{1});
    };
    testing::ThreadReplica replica(o);
    const int groups = replica.groups();
    std::vector<std::vector<int32_t>> prompts;
    std::vector<Single> expected;
    for (int g = 0; g < groups; ++g) {
      prompts.push_back(RandomPrompt(23 + 5 * g, 300 + g + 10 * static_cast<int>(seed)));
      expected.push_back(RunSingle(c.model, prompts[g]));
    }
    std::vector<Single> got(c.world);
    replica.RunAll([&](int r) {
      Rank& rank = replica.rank(r);
      EXPECT_TRUE(rank.model->placement().SameSlots(*placement));
      const auto& prompt = prompts[replica.group(r)];
      auto logits = PromptLogits(*rank.model, *rank.cache, prompt);
      ASSERT_TRUE(logits.ok()) << logits.status();
      got[r].logits = *logits;
      GenerateOptions greedy;
      greedy.max_new_tokens = 20;
      auto g = Generate(*rank.model, *rank.cache, prompt, greedy);
      ASSERT_TRUE(g.ok()) << g.status();
      got[r].greedy = *g;
    });
    for (int r = 0; r < c.world; ++r) {
      const Single& want = expected[replica.group(r)];
      auto cmp = testing::Compare(got[r].logits, want.logits);
      EXPECT_LE(cmp.Relative(), testing::kSelfRelTol)
          << "seed " << seed << " rank " << r << ": " << cmp.ToString();
      EXPECT_EQ(got[r].greedy, want.greedy) << "seed " << seed << " rank " << r;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Placements, PlacementEquivalenceTest,
    ::testing::Values(PlacementCase{{"tiny-moe", 2, 2, false}, 4, 2},
                      PlacementCase{{"tiny-moe", 4, 4, false}, 8, 2},
                      PlacementCase{{"tiny-moe", 2, 1, true}, 6, 1},
                      PlacementCase{{"tiny-moe", 4, 1, true}, 12, 2},
                      PlacementCase{{"tiny-moe", 4, 2, true}, 4, 4},
                      PlacementCase{{"kjv-moe", 4, 1, true}, 8, 2}),
    [](const ::testing::TestParamInfo<PlacementCase>& info) {
      return absl::StrCat(testing::ReplicaCaseName({info.param.replica, info.index}), "_r",
                          info.param.redundant, "_n", info.param.ranks_per_node);
    });

class DpEpIdleTest : public ::testing::TestWithParam<int> {};

TEST_P(DpEpIdleTest, IdleGroupRunsEmptyStepsWhileTheOtherDecodes) {
  // Two groups of one rank: group 0 decodes 12 tokens, group 1 only GetParam() (0: idle from
  // the very first step), then runs empty steps (its rank still serves its experts to group
  // 0's tokens). A small all-reduce per step carries the number of active groups, and both
  // stop together.
  Replica replica("tiny-moe", 2, 1, true);
  std::vector<int32_t> prompts[2] = {RandomPrompt(11, 7), RandomPrompt(6, 8)};
  const int budget[2] = {12, GetParam()};
  std::vector<Single> expected = {RunSingle("tiny-moe", prompts[0]),
                                  RunSingle("tiny-moe", prompts[1])};
  std::vector<std::vector<int32_t>> out(2);
  std::vector<int> empty_steps(2, 0);
  replica.RunAll([&](int r) {
    Rank& rank = replica.rank(r);
    SequenceKv kv;
    std::vector<int32_t> pending = prompts[r];
    while (true) {
      int64_t active = static_cast<int64_t>(out[r].size()) < budget[r] ? 1 : 0;
      ASSERT_TRUE(rank.ep_comm->AllReduce(&active, 1, DType::kI64).ok());
      if (active == 0) break;
      std::vector<SequenceStep> steps;
      if (static_cast<int64_t>(out[r].size()) < budget[r]) {
        ASSERT_TRUE(rank.cache->Grow(kv, kv.length + static_cast<int64_t>(pending.size())).ok());
        steps.push_back({pending, &kv, LogitsMode::kLast});
      } else {
        ++empty_steps[r];
      }
      auto logits = rank.model->Forward(steps, *rank.cache);
      ASSERT_TRUE(logits.ok()) << logits.status();
      if (!steps.empty()) {
        rank.cache->TrimSliding(kv);
        auto next = rank.model->Sample({SamplingParams{}});
        ASSERT_TRUE(next.ok());
        out[r].push_back((*next)[0]);
        pending = {(*next)[0]};
      }
    }
    rank.cache->Release(kv);
  });
  EXPECT_EQ(empty_steps[1], budget[0] - budget[1]);
  EXPECT_EQ(empty_steps[0], 0);
  for (int r = 0; r < 2; ++r) {
    std::vector<int32_t> want(expected[r].greedy.begin(), expected[r].greedy.begin() + budget[r]);
    EXPECT_EQ(out[r], want) << "group " << r;
  }
}

INSTANTIATE_TEST_SUITE_P(Budgets, DpEpIdleTest, ::testing::Values(3, 0));

TEST(TrafficTest, TpAllReducesCarryWhatTheDesignSays) {
  // tp 2 on the MoE: per step one all-reduce of [T, H] after the embedding, one after each
  // attention block, and one of [2, T, H] (dense and expert partials together) per layer.
  Replica replica("tiny-moe", 2, 2, false);
  const std::vector<int32_t> prompt = RandomPrompt(13, 3);
  replica.RunAll([&](int r) {
    Rank& rank = replica.rank(r);
    const auto& c = rank.model->config();
    SequenceKv kv;
    ASSERT_TRUE(rank.cache->Grow(kv, static_cast<int64_t>(prompt.size())).ok());
    SequenceStep step{prompt, &kv, LogitsMode::kNone};
    rank.tp_comm->ResetTraffic();
    ASSERT_TRUE(rank.model->Forward({&step, 1}, *rank.cache).ok());
    const auto& traffic = rank.tp_comm->traffic();
    const uint64_t t = prompt.size(), h = c.hidden_size, layers = c.num_hidden_layers;
    // W = 2: an all-reduce of N bytes sends N bytes (half in reduce-scatter, half in gather).
    const uint64_t expected = 4 * (t * h + layers * (t * h + 2 * t * h));
    EXPECT_EQ(traffic.BytesSent(parallel::CollectiveOp::kAllReduce), expected) << "rank " << r;
    EXPECT_EQ(traffic.Calls(parallel::CollectiveOp::kAllReduce), 1u + 2u * layers);
    EXPECT_EQ(traffic.BytesSent(parallel::CollectiveOp::kAllToAllV), 0u);
    rank.cache->Release(kv);
  });
}

TEST(TrafficTest, DpEpDispatchSendsOnlyTokensRoutedOffRank) {
  // dp-ep over 2 ranks of one: each MoE layer's all-to-alls carry the counts, one activation
  // row and its expert metadata per (token, other rank) pair, and one result row back per
  // (token, expert) this rank served, so the source sums them in expert order: never whole
  // activations.
  Replica replica("tiny-moe", 2, 1, true);
  std::vector<int32_t> prompts[2] = {RandomPrompt(17, 11), RandomPrompt(9, 12)};
  std::vector<std::vector<std::vector<int32_t>>> routing(2);  // [rank][layer] -> ids
  std::vector<uint64_t> sent(2);
  replica.RunAll([&](int r) {
    Rank& rank = replica.rank(r);
    rank.model->set_observer([&](std::string_view name, const Buffer& b,
                                 const std::vector<int64_t>& shape) {
      if (name.find(".router_ids") == std::string_view::npos) return;
      std::vector<int32_t> ids(shape[0] * shape[1]);
      ASSERT_TRUE(rank.backend->Read(b, ids.data(), ids.size() * sizeof(int32_t)).ok());
      routing[r].push_back(ids);
    });
    SequenceKv kv;
    ASSERT_TRUE(rank.cache->Grow(kv, static_cast<int64_t>(prompts[r].size())).ok());
    SequenceStep step{prompts[r], &kv, LogitsMode::kNone};
    rank.ep_comm->ResetTraffic();
    ASSERT_TRUE(rank.model->Forward({&step, 1}, *rank.cache).ok());
    sent[r] = rank.ep_comm->traffic().BytesSent(parallel::CollectiveOp::kAllToAllV);
    rank.cache->Release(kv);
  });
  const auto& c = replica.rank(0).model->config();
  const uint64_t h = c.hidden_size, k = c.top_k_experts, per_rank = c.num_experts / 2;
  // pairs[src][layer]: tokens of rank src that need an expert on the other rank.
  auto off_rank_pairs = [&](int src, int layer) {
    uint64_t n = 0;
    const auto& ids = routing[src][layer];
    for (size_t tok = 0; tok < ids.size() / k; ++tok) {
      bool other = false;
      for (uint64_t j = 0; j < k; ++j) other |= ids[tok * k + j] / static_cast<int>(per_rank) != src;
      n += other;
    }
    return n;
  };
  // entries[src][layer]: (token, expert) choices of rank src's tokens served by the other rank.
  auto off_rank_entries = [&](int src, int layer) {
    uint64_t n = 0;
    for (int32_t e : routing[src][layer]) n += e / static_cast<int>(per_rank) != src;
    return n;
  };
  for (int r = 0; r < 2; ++r) {
    uint64_t expected = 0, pairs = 0;
    for (int l = 0; l < c.num_hidden_layers; ++l) {
      expected += 16;                                       // pair and entry counts
      expected += off_rank_pairs(r, l) * (h + 2 * k) * 4;   // dispatch rows + metadata
      expected += off_rank_entries(1 - r, l) * h * 4;       // results returned to the other
      pairs += off_rank_pairs(r, l);
    }
    EXPECT_EQ(sent[r], expected) << "rank " << r;
    // Tokens whose experts all live on their own rank travel nowhere, so fewer rows leave than
    // an all-gather of every token would send.
    EXPECT_LT(pairs, c.num_hidden_layers * prompts[r].size()) << "rank " << r;
  }
}

TEST(ParallelConfigTest, SplitsThatDoNotDivideAreRefusedAtStartUp) {
  ModelConfig c = *LoadModelConfig(testing::GoldenPath("tiny-moe"));
  auto three = gemma4::ComputeLocalDims(c, {3, 0, 3, 0});
  ASSERT_FALSE(three.ok());
  EXPECT_NE(three.status().message().find("num_attention_heads"), std::string::npos)
      << three.status();
  auto experts = gemma4::ComputeLocalDims(c, {1, 0, 32, 0});
  ASSERT_FALSE(experts.ok());
  EXPECT_NE(experts.status().message().find("num_experts"), std::string::npos) << experts.status();
  // tp 4 exceeds the full layers' single KV head: it is replicated, not refused.
  auto four = gemma4::ComputeLocalDims(c, {4, 3, 4, 3});
  ASSERT_TRUE(four.ok()) << four.status();
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    if (c.IsFull(l)) {
      EXPECT_EQ(four->layers[l].kv_heads, 1);
    }
  }
}

}  // namespace
}  // namespace gemma
