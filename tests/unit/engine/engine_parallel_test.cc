// The engine loop on replicas of several ranks (threads with in-process communicators): a tp=2
// replica (leader engine + a follower applying its step plans) and dp-ep replicas (an engine
// per data-parallel group, stepping in lockstep) serve 64 concurrent requests, preemption
// included, each output equal to the request run alone on one rank.
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

// Runs `requests` on a replica of `world` ranks: tp mode (dp_ep false) or dp-ep with groups of
// `tp` ranks, requests dealt round-robin to the groups. Returns each request's tokens and the
// total preemptions.
std::pair<std::vector<std::vector<int32_t>>, int64_t> RunReplica(
    const std::vector<Request>& requests, int world, int tp, bool dp_ep) {
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
        absl::Status followed = replica::FollowPlans(*s.model, *s.cache, s.control.get());
        EXPECT_TRUE(followed.ok()) << "rank " << r << ": " << followed;
        return;
      }
      auto executor = std::make_unique<replica::LeaderExecutor>(s.model.get(), s.control.get());
      replica::LeaderExecutor* leader = executor.get();
      EngineOptions engine_options;
      engine_options.scheduler.max_step_tokens = 128;
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
      if (dp_ep) {
        s.leaders = leader_group.communicator(group);
        while (true) {
          auto ran = replica::LockstepStep(**engine, *leader, *s.cache, s.leaders.get());
          ASSERT_TRUE(ran.ok()) << "rank " << r << ": " << ran.status();
          if (!*ran) break;
        }
      } else {
        ASSERT_TRUE((*engine)->RunUntilIdle().ok());
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
