// Several CUDA ranks on one GPU, as threads: each rank has its own CudaBackend, and the ranks'
// collectives go through in-process groups (host memory) behind staging communicators, since
// ranks sharing a GPU cannot share NCCL. tp = 2 and dp-ep (ep = 2, and tp = 2 inside ep = 4)
// against one CUDA rank on the same checkpoint: prompt logits, greedy and seeded sampled
// continuations. Also NCCL for real on one rank: the whole collective suite with host buffers
// staged through device memory. Skipped, saying so, where no CUDA device is present.
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/testing/compare.h"
#include "tests/testing/tolerances.h"
#include "tests/unit/parallel/collective_checks.h"
#include "worker/backend/cuda/cuda_backend.h"
#include "worker/backend/cuda/cuda_staging.h"
#include "worker/engine/generate.h"
#include "worker/engine/kv_cache.h"
#include "worker/model/gemma4/model.h"
#include "worker/parallel/in_process_communicator.h"
#include "worker/parallel/nccl_communicator.h"
#include "worker/parallel/staging_communicator.h"
#include "worker/parallel/tcp_store.h"

namespace gemma {
namespace {

using gemma4::Model;
using gemma4::ModelParallel;

struct Rank {
  std::unique_ptr<CudaBackend> backend;
  std::unique_ptr<CudaMemorySpace> memory;
  parallel::StagingCounters counters;
  std::unique_ptr<parallel::Communicator> tp_comm, ep_comm;
  std::unique_ptr<Model> model;
  std::unique_ptr<KvCache> cache;
};

struct Outputs {
  std::vector<float> logits;
  std::vector<int32_t> greedy, sampled;
};

GenerateOptions Greedy() {
  GenerateOptions o;
  o.max_new_tokens = 12;
  return o;
}

GenerateOptions Sampled() {
  GenerateOptions o;
  o.max_new_tokens = 12;
  o.sampling.temperature = 0.9f;
  o.sampling.top_k = 40;
  o.sampling.top_p = 0.95f;
  o.sampling.seed = 1234;
  o.sampling.request_key = 5;
  return o;
}

// `world` CUDA ranks: tp mode (one group of `world`) or dp-ep (groups of `tp`, experts over all).
class CudaReplica {
 public:
  CudaReplica(const std::string& model, int world, int tp, bool dp_ep) : world_(world) {
    const int groups = dp_ep ? world / tp : 1;
    for (int g = 0; g < groups; ++g) {
      tp_groups_.push_back(std::make_unique<parallel::InProcessGroup>(dp_ep ? tp : world));
    }
    if (dp_ep) ep_group_ = std::make_unique<parallel::InProcessGroup>(world);
    ranks_.resize(world);
    RunAll([&](int r) {
      Rank& rank = ranks_[r];
      CudaBackendOptions options;
      options.arena_bytes = size_t{768} << 20;
      auto backend = CudaBackend::Create(options);
      ASSERT_TRUE(backend.ok()) << backend.status();
      rank.backend = *std::move(backend);
      rank.memory = std::make_unique<CudaMemorySpace>(*rank.backend);
      const int group = dp_ep ? r / tp : 0;
      const int tp_rank = dp_ep ? r % tp : r;
      const int tp_size = dp_ep ? tp : world;
      ModelParallel p;
      p.layout = {tp_size, tp_rank, dp_ep ? world : tp_size, dp_ep ? r : tp_rank};
      p.check_routing = true;
      if (tp_size > 1) {
        rank.tp_comm = parallel::WrapWithStaging(tp_groups_[group]->communicator(tp_rank),
                                                 parallel::CommunicatorMemory::kHost,
                                                 rank.memory.get(), &rank.counters);
        p.tp_comm = rank.tp_comm.get();
      }
      if (dp_ep) {
        rank.ep_comm = parallel::WrapWithStaging(ep_group_->communicator(r),
                                                 parallel::CommunicatorMemory::kHost,
                                                 rank.memory.get(), &rank.counters);
        p.ep_comm = rank.ep_comm.get();
      }
      auto m = Model::Load(testing::GoldenPath(model), *rank.backend, p);
      ASSERT_TRUE(m.ok()) << m.status();
      rank.model = *std::move(m);
      KvCacheOptions cache_options;
      cache_options.page_size = 4;
      cache_options.default_tokens = 256;
      auto cache = KvCache::Create(rank.model->config(), *rank.backend,
                                   rank.model->CacheOptions(cache_options));
      ASSERT_TRUE(cache.ok()) << cache.status();
      rank.cache = *std::move(cache);
    });
  }

  void RunAll(const std::function<void(int)>& fn) {
    std::vector<std::thread> threads;
    for (int r = 0; r < world_; ++r) threads.emplace_back(fn, r);
    for (auto& t : threads) t.join();
  }

  // Every rank runs the same requests; rank 0's outputs are returned (all must agree).
  std::vector<Outputs> Run(const std::vector<int32_t>& prompt) {
    std::vector<Outputs> out(world_);
    RunAll([&](int r) {
      Rank& rank = ranks_[r];
      ASSERT_NE(rank.model, nullptr);
      auto logits = PromptLogits(*rank.model, *rank.cache, prompt);
      ASSERT_TRUE(logits.ok()) << "rank " << r << ": " << logits.status();
      out[r].logits = *std::move(logits);
      auto greedy = Generate(*rank.model, *rank.cache, prompt, Greedy());
      ASSERT_TRUE(greedy.ok()) << "rank " << r << ": " << greedy.status();
      out[r].greedy = *std::move(greedy);
      auto sampled = Generate(*rank.model, *rank.cache, prompt, Sampled());
      ASSERT_TRUE(sampled.ok()) << "rank " << r << ": " << sampled.status();
      out[r].sampled = *std::move(sampled);
    });
    return out;
  }

  Rank& rank(int r) { return ranks_[r]; }

 private:
  int world_;
  std::vector<std::unique_ptr<parallel::InProcessGroup>> tp_groups_;
  std::unique_ptr<parallel::InProcessGroup> ep_group_;
  std::vector<Rank> ranks_;
};

std::vector<int32_t> RandomPrompt(int length, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> tokens = {2};
  while (static_cast<int>(tokens.size()) < length) tokens.push_back(5 + rng() % 500);
  return tokens;
}

struct Case {
  std::string model;
  int world, tp;
  bool dp_ep;
};

class CudaParallelTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (CudaBackend::DeviceCount() == 0) {
      GTEST_SKIP() << "no CUDA device present: multi-rank CUDA test skipped";
    }
  }
};

TEST_P(CudaParallelTest, RanksMatchOneCudaRank) {
  const Case& c = GetParam();
  const std::vector<int32_t> prompt = RandomPrompt(23, 11);
  std::vector<Outputs> single;
  {
    CudaReplica one(c.model, 1, 1, false);
    single = one.Run(prompt);
  }
  CudaReplica replica(c.model, c.world, c.tp, c.dp_ep);
  std::vector<Outputs> ranks = replica.Run(prompt);
  for (int r = 0; r < c.world; ++r) {
    auto cmp = testing::Compare(ranks[r].logits, single[0].logits);
    EXPECT_FALSE(cmp.nan_mismatch);
    EXPECT_LE(cmp.Relative(), testing::kLogitRelTol) << "rank " << r << ": " << cmp.ToString();
    EXPECT_EQ(ranks[r].greedy, single[0].greedy) << "rank " << r;
    EXPECT_EQ(ranks[r].sampled, single[0].sampled) << "rank " << r;
    // Device buffers went through the host: the staging did run.
    if (c.tp > 1 || c.dp_ep) {
      EXPECT_GT(replica.rank(r).counters.calls_staged, 0u) << "rank " << r;
      EXPECT_GT(replica.rank(r).counters.bytes_to_host, 0u) << "rank " << r;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, CudaParallelTest,
    ::testing::Values(Case{"tiny-dense", 2, 2, false}, Case{"tiny-moe", 2, 2, false},
                      Case{"tiny-moe", 2, 1, true}, Case{"tiny-moe", 4, 2, true}),
    [](const ::testing::TestParamInfo<Case>& info) {
      const Case& c = info.param;
      std::string name = c.dp_ep ? absl::StrCat(c.model, "_dpep", c.world, "_tp", c.tp)
                                 : absl::StrCat(c.model, "_tp", c.world);
      for (char& ch : name) {
        if (ch == '-') ch = '_';
      }
      return name;
    });

// NCCL for real on one GPU: every collective with host buffers, staged through device memory
// (the model hands NCCL host buffers for routing checks and sampling candidates).
TEST(CudaNcclStagingTest, EveryCollectiveOverNcclWithHostBuffers) {
  std::string why_not;
  if (!parallel::NcclAvailable(&why_not)) GTEST_SKIP() << "NCCL test skipped: " << why_not;
  CudaBackendOptions options;
  options.arena_bytes = size_t{256} << 20;
  auto backend = CudaBackend::Create(options);
  ASSERT_TRUE(backend.ok()) << backend.status();
  CudaMemorySpace memory(**backend);
  auto server = parallel::TcpStoreServer::Start("127.0.0.1", 0);
  ASSERT_TRUE(server.ok()) << server.status();
  auto store = parallel::TcpStoreClient::Connect("127.0.0.1", (*server)->port());
  ASSERT_TRUE(store.ok()) << store.status();
  parallel::NcclOptions nccl;
  nccl.device = 0;
  nccl.timeout = std::chrono::seconds(30);
  auto comm = parallel::CreateNcclCommunicator(nccl, **store);
  ASSERT_TRUE(comm.ok()) << comm.status();
  parallel::StagingCounters counters;
  std::unique_ptr<parallel::Communicator> staged = parallel::WrapWithStaging(
      *std::move(comm), parallel::CommunicatorMemory::kDevice, &memory, &counters);
  for (uint64_t seed : {1u, 2u}) {
    absl::Status status = parallel::testing::RunAllCollectiveChecks(*staged, seed, true);
    EXPECT_TRUE(status.ok()) << status;
  }
  EXPECT_GT(counters.bytes_to_device, 0u);
  EXPECT_TRUE(staged->healthy());
}

}  // namespace
}  // namespace gemma
