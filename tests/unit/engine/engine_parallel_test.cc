// The engine loop on replicas of several ranks (threads with in-process communicators): a tp=2
// replica (leader engine + a follower applying its step plans) and dp-ep replicas (an engine
// per data-parallel group, stepping in lockstep) serve 64 concurrent requests, preemption
// included, each output equal to the request run alone on one rank.
#include <chrono>
#include <cmath>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "glog/logging.h"
#include "gtest/gtest.h"
#include "tests/testing/compare.h"
#include "worker/backend/cpu/cpu_backend.h"
#include "worker/engine/engine.h"
#include "worker/engine/generate.h"
#include "common/model_config.h"
#include "eplb/placement.h"
#include "worker/replica/executor.h"
#include "worker/parallel/in_process_communicator.h"

namespace gemma::engine {
namespace {

const std::string kModel = "tiny-moe";

std::vector<Request> MakeRequests(int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int64_t> prompt_len(3, 24), max_tokens(4, 14);
  std::uniform_int_distribution<int32_t> pick(3, 511);
  std::vector<Request> requests;
  for (int i = 0; i < n; ++i) {
    Request r;
    r.prompt = {2};
    int64_t len = prompt_len(rng);
    while (static_cast<int64_t>(r.prompt.size()) < len) {
      int32_t id = pick(rng);
      if (id != 106 && id != 1) r.prompt.push_back(id);
    }
    r.max_tokens = max_tokens(rng);
    r.ignore_end_ids = true;
    if (i % 4 == 1) {  // some seeded sampling in the mix
      r.sampling.temperature = 0.9f;
      r.sampling.top_k = 20;
      r.sampling.seed = 77;
      r.sampling.request_key = static_cast<uint64_t>(i);
    }
    requests.push_back(r);
  }
  return requests;
}

std::vector<std::vector<int32_t>> RunAlone(const std::vector<Request>& requests) {
  CpuBackend backend(CpuBackendOptions{1});
  auto model = gemma4::Model::Load(testing::GoldenPath(kModel), backend);
  CHECK(model.ok()) << model.status();
  KvCacheOptions options;
  options.page_size = 4;
  options.default_tokens = 256;
  auto cache = KvCache::Create((*model)->config(), backend, options);
  CHECK(cache.ok());
  std::vector<std::vector<int32_t>> out;
  for (const Request& r : requests) {
    GenerateOptions g;
    g.max_new_tokens = r.max_tokens;
    g.sampling = r.sampling;
    auto tokens = Generate(**model, **cache, r.prompt, g);
    CHECK(tokens.ok()) << tokens.status();
    out.push_back(*tokens);
  }
  return out;
}

// One rank of the replica under test.
struct RankState {
  std::unique_ptr<CpuBackend> backend;
  std::unique_ptr<gemma4::Model> model;
  std::unique_ptr<KvCache> cache;
  std::unique_ptr<parallel::Communicator> tp, ep, control, leaders;
};

// Live placement switches during a run: `placements[0]` is offered to group `offer_group`'s
// leader after its step `first_offer`, each next one two steps after the one before is in use;
// every load stalls `load_delay`, and every step of that leader takes at least `step_time`
// (a model slower than the tiny one).
struct Switches {
  std::vector<eplb::Placement> placements;
  uint64_t first_offer = 3;
  std::chrono::milliseconds step_time{0};
  int offer_group = 0;
  std::chrono::milliseconds load_delay{0};
  // Filled in: per rank, the placement epoch its model ended with; per group, the steps its
  // leader ran.
  std::vector<uint64_t> final_epochs;
  std::vector<uint64_t> steps;
  // The offering leader's step after which each placement was offered, and its first step
  // with it (0: never).
  std::vector<uint64_t> offered_at, switched_at;
};

// Runs `requests` on a replica of `world` ranks: tp mode (dp_ep false) or dp-ep with groups of
// `tp` ranks, requests dealt round-robin to the groups. Returns each request's tokens and the
// total preemptions.
std::pair<std::vector<std::vector<int32_t>>, int64_t> RunReplica(
    const std::vector<Request>& requests, int world, int tp, bool dp_ep,
    Switches* switches = nullptr) {
  const int groups = dp_ep ? world / tp : 1;
  const int group_size = dp_ep ? tp : world;
  std::vector<std::unique_ptr<parallel::InProcessGroup>> tp_groups, control_groups;
  for (int g = 0; g < groups; ++g) {
    tp_groups.push_back(std::make_unique<parallel::InProcessGroup>(group_size));
    control_groups.push_back(std::make_unique<parallel::InProcessGroup>(group_size));
  }
  parallel::InProcessGroup ep_group(world), leader_group(groups);
  std::vector<std::vector<int32_t>> outputs(requests.size());
  std::vector<int64_t> preemptions(world, 0);
  if (switches != nullptr) {
    switches->final_epochs.assign(world, 0);
    switches->steps.assign(groups, 0);
  }
  const std::chrono::milliseconds delay =
      switches != nullptr ? switches->load_delay : std::chrono::milliseconds(0);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      const int group = r / group_size, tp_rank = r % group_size;
      RankState s;
      s.backend = std::make_unique<CpuBackend>(CpuBackendOptions{1});
      gemma4::ModelParallel p;
      p.layout = {group_size, tp_rank, dp_ep ? world : group_size, dp_ep ? r : tp_rank};
      if (group_size > 1) {
        s.tp = tp_groups[group]->communicator(tp_rank);
        p.tp_comm = s.tp.get();
      }
      if (dp_ep) {
        s.ep = ep_group.communicator(r);
        p.ep_comm = s.ep.get();
      }
      s.control = control_groups[group]->communicator(tp_rank);
      auto model = gemma4::Model::Load(testing::GoldenPath(kModel), *s.backend, p);
      ASSERT_TRUE(model.ok()) << model.status();
      s.model = std::move(*model);
      // Few full-layer pages per group: preemption must happen.
      KvCacheOptions options;
      options.page_size = 4;
      options.num_pages[kSlidingPool] = 400;
      options.num_pages[kFullPool] = 96 / groups;
      auto cache = KvCache::Create(s.model->config(), *s.backend, s.model->CacheOptions(options));
      ASSERT_TRUE(cache.ok()) << cache.status();
      s.cache = std::move(*cache);
      if (tp_rank != 0) {
        absl::Status followed = replica::FollowPlans(*s.model, *s.cache, s.control.get(), delay);
        EXPECT_TRUE(followed.ok()) << "rank " << r << ": " << followed;
        if (switches != nullptr) switches->final_epochs[r] = s.model->placement().epoch;
        return;
      }
      auto executor =
          std::make_unique<replica::LeaderExecutor>(s.model.get(), s.control.get(), delay);
      replica::LeaderExecutor* leader = executor.get();
      EngineOptions engine_options;
      engine_options.scheduler.max_step_tokens = 128;
      // Admitted by their first chunk, so that preemption happens (the machinery under test).
      engine_options.scheduler.admission = Admission::kFirstChunk;
      auto engine =
          Engine::Create(std::move(executor), s.model->config(), s.cache.get(), engine_options);
      ASSERT_TRUE(engine.ok()) << engine.status();
      for (size_t i = group; i < requests.size(); i += groups) {
        ASSERT_TRUE((*engine)
                        ->Submit(requests[i],
                                 [&outputs, i](const RequestOutput& out) {
                                   outputs[i].insert(outputs[i].end(), out.token_ids.begin(),
                                                     out.token_ids.end());
                                 })
                        .ok());
      }
      if (switches != nullptr && group == switches->offer_group) {
        switches->switched_at.assign(switches->placements.size(), 0);
        switches->offered_at.assign(switches->placements.size(), 0);
        (*engine)->set_step_observer([switches, leader](const StepStats& stats) {
          std::this_thread::sleep_for(switches->step_time);
          const uint64_t epoch = leader->ActivePlacement().epoch;
          for (size_t i = 0; i < switches->placements.size(); ++i) {
            if (epoch == switches->placements[i].epoch && switches->switched_at[i] == 0) {
              switches->switched_at[i] = stats.step;
            }
            const bool due = i == 0 ? stats.step >= switches->first_offer
                                    : switches->switched_at[i - 1] != 0 &&
                                          stats.step >= switches->switched_at[i - 1] + 2;
            if (due && switches->offered_at[i] == 0) {
              switches->offered_at[i] = stats.step;
              leader->OfferPlacement(switches->placements[i]);
            }
          }
        });
      }
      if (dp_ep || switches != nullptr) {
        if (dp_ep) s.leaders = leader_group.communicator(group);
        while (true) {
          auto ran = replica::LockstepStep(**engine, *leader, *s.cache, s.leaders.get());
          ASSERT_TRUE(ran.ok()) << "rank " << r << ": " << ran.status();
          if (!*ran) break;
        }
      } else {
        ASSERT_TRUE((*engine)->RunUntilIdle().ok());
      }
      if (switches != nullptr) {
        switches->final_epochs[r] = s.model->placement().epoch;
        switches->steps[group] = leader->steps_executed();
      }
      preemptions[r] = (*engine)->counters().preemptions;
      ASSERT_TRUE(leader->Stop().ok());
    });
  }
  for (auto& t : threads) t.join();
  int64_t total = 0;
  for (int64_t p : preemptions) total += p;
  return {outputs, total};
}

struct Case {
  int world, tp;
  bool dp_ep;
};

class EngineReplicaTest : public ::testing::TestWithParam<Case> {};

TEST_P(EngineReplicaTest, SixtyFourRequestsWithPreemptionMatchTheirSoloRuns) {
  const Case& c = GetParam();
  const std::vector<Request> requests = MakeRequests(64, 5);
  const auto alone = RunAlone(requests);
  auto [got, preemptions] = RunReplica(requests, c.world, c.tp, c.dp_ep);
  EXPECT_GT(preemptions, 0);
  for (size_t i = 0; i < requests.size(); ++i) {
    EXPECT_EQ(got[i], alone[i]) << "request " << i;
  }
}

// A positive temperature too small to divide by is greedy. On a tp replica the vocabulary-
// sharded sampler scales logits in f32, where 30 / 1e-38 is inf and the softmax NaN.
TEST(EngineReplicaSamplingTest, TinyTemperatureIsGreedyOnATpReplica) {
  std::vector<Request> greedy = MakeRequests(8, 9);
  for (Request& r : greedy) r.sampling = SamplingParams();
  std::vector<Request> tiny = greedy;
  for (Request& r : tiny) {
    r.sampling.temperature = 1e-38f;
    r.sampling.seed = 5;
  }
  const auto want = RunAlone(greedy);
  auto [got, preemptions] = RunReplica(tiny, 2, 2, false);
  for (size_t i = 0; i < greedy.size(); ++i) EXPECT_EQ(got[i], want[i]) << "request " << i;
}

// Live placement switches in the middle of 64 requests: every rank moves to each offered
// placement at the same step (a mismatch would break the expert all-to-all or the routing
// check), and no output changes. With loads stalled 60 ms the steps go on meanwhile.
class PlacementSwitchTest : public ::testing::TestWithParam<Case> {};

TEST_P(PlacementSwitchTest, SwitchesMidRunChangeNoOutput) {
  const Case& c = GetParam();
  const std::vector<Request> requests = MakeRequests(64, 11);
  const auto alone = RunAlone(requests);
  const ModelConfig config = *LoadModelConfig(testing::GoldenPath(kModel));
  const int ep = c.dp_ep ? c.world : c.tp;
  Switches switches;
  for (uint64_t epoch : {1u, 2u}) {
    std::mt19937_64 rng(epoch);
    std::vector<int64_t> load(static_cast<size_t>(config.num_hidden_layers) * config.num_experts);
    for (int64_t& v : load) v = static_cast<int64_t>(std::exp2(rng() % 10));
    auto p = eplb::BalancedPlacement(load, config.num_hidden_layers, config.num_experts,
                                     {ep, 1}, 16 % ep == 0 ? ep : 0);
    ASSERT_TRUE(p.ok()) << p.status();
    p->epoch = epoch;
    switches.placements.push_back(*p);
  }
  switches.offer_group = c.dp_ep ? c.world / c.tp - 1 : 0;  // dp-ep: the last group's leader
  switches.load_delay = std::chrono::milliseconds(60);
  switches.step_time = std::chrono::milliseconds(4);
  auto [got, preemptions] = RunReplica(requests, c.world, c.tp, c.dp_ep, &switches);
  for (size_t i = 0; i < requests.size(); ++i) EXPECT_EQ(got[i], alone[i]) << "request " << i;
  for (int r = 0; r < c.world; ++r) EXPECT_EQ(switches.final_epochs[r], 2u) << "rank " << r;
  // Steps went on while each placement loaded (60 ms; a step here takes about 4 ms, several
  // times that on a loaded machine): more steps than agreeing and voting take.
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_GT(switches.offered_at[i], 0u) << "placement " << i + 1;
    EXPECT_GT(switches.switched_at[i], switches.offered_at[i] + 3) << "placement " << i + 1;
  }
}

INSTANTIATE_TEST_SUITE_P(Replicas, PlacementSwitchTest,
                         ::testing::Values(Case{2, 2, false}, Case{2, 1, true},
                                           Case{4, 2, true}),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           const Case& c = info.param;
                           return c.dp_ep ? "dpep_w" + std::to_string(c.world) + "_t" +
                                                std::to_string(c.tp)
                                          : "tp" + std::to_string(c.world);
                         });

INSTANTIATE_TEST_SUITE_P(Replicas, EngineReplicaTest,
                         ::testing::Values(Case{2, 2, false}, Case{2, 1, true},
                                           Case{4, 2, true}),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           const Case& c = info.param;
                           return c.dp_ep ? "dpep_w" + std::to_string(c.world) + "_t" +
                                                std::to_string(c.tp)
                                          : "tp" + std::to_string(c.world);
                         });

}  // namespace
}  // namespace gemma::engine
