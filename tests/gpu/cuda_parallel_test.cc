// Several CUDA ranks on one GPU, as threads: each rank has its own CudaBackend, and the ranks'
// collectives go through in-process groups (host memory) behind staging communicators, since
// ranks sharing a GPU cannot share NCCL. tp = 2 and dp-ep (ep = 2, and tp = 2 inside ep = 4)
// against one CUDA rank on the same checkpoint: prompt logits, greedy and seeded sampled
// continuations. Also NCCL for real on one rank: the whole collective suite with host buffers
// staged through device memory. Skipped, saying so, where no CUDA device is present.
#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "common/status_macros.h"
#include "gtest/gtest.h"
#include "tests/testing/compare.h"
#include "tests/testing/thread_replica.h"
#include "tests/testing/tolerances.h"
#include "tests/gpu/cuda_test_util.h"
#include "tests/unit/parallel/collective_checks.h"
#include "worker/backend/cuda/cuda_backend.h"
#include "worker/backend/cuda/cuda_staging.h"
#include "worker/engine/generate.h"
#include "worker/model/gemma4/kv_cache.h"
#include "worker/model/gemma4/model.h"
#include "worker/parallel/expert_dispatch.h"
#include "worker/parallel/in_process_communicator.h"
#include "worker/parallel/nccl_communicator.h"
#include "worker/parallel/staging_communicator.h"
#include "worker/parallel/tcp_store.h"

namespace gemma {
namespace {

using testing::ReplicaCase;
using testing::ReplicaRank;

// `c.world` CUDA ranks on this GPU, each with its own backend (768 MiB of device memory, an
// f32 KV cache) and its communicators behind staging over the in-process groups; what was
// staged is counted in counters[r]. The cache is f32 because the ranks are held to one rank's
// logits at 1e-4 and to its exact tokens: the split ranks sum o_proj and MLP partials in
// another order, and rounding those last-bit differences to bf16 in the cache would now and
// then turn one into a whole bf16 step of a key or value. What the cache holds is rank-local
// (cuda_ops_test checks the bf16 cache against the CPU).
testing::ReplicaOptions CudaRanks(const ReplicaCase& c,
                                  std::vector<parallel::StagingCounters>* counters) {
  counters->assign(c.world, {});
  testing::ReplicaOptions o;
  o.model = c.model;
  o.world = c.world;
  o.tp = c.tp;
  o.dp_ep = c.dp_ep;
  o.cache_tokens = 256;
  o.make_backend = [](int, ReplicaRank& rank) -> absl::StatusOr<std::unique_ptr<Backend>> {
    CudaBackendOptions options;
    options.arena_bytes = size_t{768} << 20;
    options.kv_dtype = DType::kF32;
    ASSIGN_OR_RETURN(std::unique_ptr<CudaBackend> backend, CudaBackend::Create(options));
    rank.state = std::make_shared<CudaMemorySpace>(*backend);
    return std::unique_ptr<Backend>(std::move(backend));
  };
  o.wrap = [counters](int r, std::unique_ptr<parallel::Communicator> comm, ReplicaRank& rank) {
    return parallel::WrapWithStaging(std::move(comm), parallel::CommunicatorMemory::kHost,
                                     static_cast<CudaMemorySpace*>(rank.state.get()),
                                     &(*counters)[r]);
  };
  return o;
}

struct Outputs {
  std::vector<float> logits;
  std::vector<int32_t> greedy, sampled;
};

// Every rank runs the same requests.
std::vector<Outputs> RunRequests(testing::ThreadReplica& replica, const std::vector<int32_t>& prompt) {
  std::vector<Outputs> out(replica.world());
  GenerateOptions greedy;
  greedy.max_new_tokens = 12;
  replica.RunAll([&](int r) {
    ReplicaRank& rank = replica.rank(r);
    ASSERT_NE(rank.model, nullptr) << "rank " << r << " did not load";
    auto logits = PromptLogits(*rank.model, *rank.cache, prompt);
    ASSERT_TRUE(logits.ok()) << "rank " << r << ": " << logits.status();
    out[r].logits = *std::move(logits);
    auto g = Generate(*rank.model, *rank.cache, prompt, greedy);
    ASSERT_TRUE(g.ok()) << "rank " << r << ": " << g.status();
    out[r].greedy = *std::move(g);
    auto s = Generate(*rank.model, *rank.cache, prompt, testing::SampledOptions());
    ASSERT_TRUE(s.ok()) << "rank " << r << ": " << s.status();
    out[r].sampled = *std::move(s);
  });
  return out;
}

class CudaParallelTest : public ::testing::TestWithParam<ReplicaCase> {
 protected:
  void SetUp() override {
    if (CudaBackend::DeviceCount() == 0) {
      GTEST_SKIP() << "no CUDA device present: multi-rank CUDA test skipped";
    }
  }
};

TEST_P(CudaParallelTest, RanksMatchOneCudaRank) {
  const ReplicaCase& c = GetParam();
  const std::vector<int32_t> prompt = testing::RandomPrompt(23, 11);
  std::vector<parallel::StagingCounters> counters;
  std::vector<Outputs> single;
  {
    testing::ThreadReplica one(CudaRanks({c.model, 1, 1, false}, &counters));
    single = RunRequests(one, prompt);
  }
  testing::ThreadReplica replica(CudaRanks(c, &counters));
  std::vector<Outputs> ranks = RunRequests(replica, prompt);
  ASSERT_EQ(single.size(), 1u);
  for (int r = 0; r < c.world; ++r) {
    auto cmp = testing::Compare(ranks[r].logits, single[0].logits);
    EXPECT_FALSE(cmp.nan_mismatch);
    EXPECT_LE(cmp.Relative(), testing::kLogitRelTol) << "rank " << r << ": " << cmp.ToString();
    EXPECT_EQ(ranks[r].greedy, single[0].greedy) << "rank " << r;
    EXPECT_EQ(ranks[r].sampled, single[0].sampled) << "rank " << r;
    // Device buffers reached the host-memory group through the staging: the tensor-parallel
    // reductions, and in dp-ep the expert dispatch's activation rows, which the dispatch keeps
    // in device memory (over NCCL they would go device to device).
    EXPECT_GT(counters[r].calls_staged, 0u) << "rank " << r;
    EXPECT_GT(counters[r].bytes_to_host, 0u) << "rank " << r;
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, CudaParallelTest,
                         ::testing::Values(ReplicaCase{"tiny-dense", 2, 2, false},
                                           ReplicaCase{"tiny-moe", 2, 2, false},
                                           ReplicaCase{"tiny-moe", 2, 1, true},
                                           ReplicaCase{"tiny-moe", 4, 2, true}),
                         testing::ReplicaCaseName);

// One NCCL rank on device 0 (its unique id through a TCP store of its own), behind a staging
// communicator over `memory` that counts into `counters`; null, with a test failure, when it
// cannot be made.
std::unique_ptr<parallel::Communicator> OneRankNccl(CudaMemorySpace& memory,
                                                    parallel::StagingCounters* counters) {
  auto server = parallel::TcpStoreServer::Start("127.0.0.1", 0);
  if (!server.ok()) {
    ADD_FAILURE() << server.status();
    return nullptr;
  }
  auto store = parallel::TcpStoreClient::Connect("127.0.0.1", (*server)->port());
  if (!store.ok()) {
    ADD_FAILURE() << store.status();
    return nullptr;
  }
  parallel::NcclOptions nccl;
  nccl.device = 0;
  nccl.timeout = std::chrono::seconds(30);
  auto comm = parallel::CreateNcclCommunicator(nccl, **store);
  if (!comm.ok()) {
    ADD_FAILURE() << comm.status();
    return nullptr;
  }
  return parallel::WrapWithStaging(*std::move(comm), parallel::CommunicatorMemory::kDevice,
                                   &memory, counters);
}

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
  parallel::StagingCounters counters;
  std::unique_ptr<parallel::Communicator> staged = OneRankNccl(memory, &counters);
  ASSERT_NE(staged, nullptr);
  for (uint64_t seed : {1u, 2u}) {
    absl::Status status = parallel::testing::RunAllCollectiveChecks(*staged, seed, true);
    EXPECT_TRUE(status.ok()) << status;
  }
  EXPECT_GT(counters.bytes_to_device, 0u);
  EXPECT_TRUE(staged->healthy());
}

// The expert dispatch on the device through NCCL (one rank: NCCL sends to itself), against the
// CPU backend's dispatch over the in-process group: the same rows, and no activation row
// through the host (only the routing plan and counts are staged).
class CudaDispatchTest : public testing::CudaVsCpuTest {};

TEST_F(CudaDispatchTest, DeviceDispatchOverNcclMatchesTheCpuPathWithoutHostActivations) {
  std::string why_not;
  if (!parallel::NcclAvailable(&why_not)) GTEST_SKIP() << "NCCL test skipped: " << why_not;
  const int64_t tokens = 5, hidden = 64, inter = 32, experts = 8, top_k = 2;
  testing::Pair gate_up = Weight(Random(experts * 2 * inter * hidden, 0.3f), DType::kF32);
  testing::Pair down = Weight(Random(experts * hidden * inter, 0.3f), DType::kF32);
  std::vector<int32_t> ids;
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<int32_t> all(experts);
    for (int32_t e = 0; e < experts; ++e) all[e] = e;
    std::shuffle(all.begin(), all.end(), rng_);
    std::sort(all.begin(), all.begin() + top_k);
    ids.insert(ids.end(), all.begin(), all.begin() + top_k);
  }
  testing::Pair id = I32(ids);
  std::vector<float> w = Random(tokens * top_k);
  for (float& v : w) v = std::fabs(v);
  testing::Pair weights = F32(w);
  testing::Pair x = F32(Random(tokens * hidden));
  testing::Pair out = Poisoned(DType::kF32, tokens * hidden);
  auto placement = eplb::StaticPlacement(1, experts, 1, 0);
  ASSERT_TRUE(placement.ok()) << placement.status();
  const eplb::CopyTable copies(*placement);
  const parallel::ExpertDispatchShape shape{
      .num_tokens = tokens, .hidden = hidden, .top_k = top_k, .layer = 0};
  auto local_experts = [&](Backend& backend, const Buffer& gu, const Buffer& dn) {
    return [&backend, &gu, &dn](const Buffer& xs, const Buffer& slots, const Buffer& ws,
                                int64_t rows, int64_t k, Buffer& o) {
      MoeExpertsArgs a;
      a.x = &xs;
      a.topk_ids = &slots;
      a.topk_weights = &ws;
      a.gate_up = &gu;
      a.down = &dn;
      a.num_tokens = rows;
      a.hidden = 64;
      a.inter = 32;
      a.top_k = k;
      a.num_local_experts = 8;
      a.out = &o;
      backend.MoeExperts(a);
    };
  };

  parallel::InProcessGroup group(1);
  std::unique_ptr<parallel::Communicator> host_comm = group.communicator(0);
  absl::Status cpu_status = parallel::DispatchExperts(
      *cpu_, *host_comm, shape, copies, {.num_ranks = 1, .ranks_per_node = 1}, *id.cpu,
      *weights.cpu, *x.cpu, *out.cpu, local_experts(*cpu_, *gate_up.cpu, *down.cpu));
  ASSERT_TRUE(cpu_status.ok()) << cpu_status;

  CudaMemorySpace memory(*gpu_);
  parallel::StagingCounters counters;
  std::unique_ptr<parallel::Communicator> staged = OneRankNccl(memory, &counters);
  ASSERT_NE(staged, nullptr);
  absl::Status gpu_status = parallel::DispatchExperts(
      *gpu_, *staged, shape, copies, {.num_ranks = 1, .ranks_per_node = 1}, *id.gpu,
      *weights.gpu, *x.gpu, *out.gpu, local_experts(*gpu_, *gate_up.gpu, *down.gpu));
  ASSERT_TRUE(gpu_status.ok()) << gpu_status;
  ExpectClose(out, tokens * hidden, "dispatched experts over NCCL");
  // The plan (counts, slots, weights) crossed through the host; one activation row alone is
  // hidden floats, and the tokens' rows went out and came back device to device.
  EXPECT_LT(counters.bytes_to_host, static_cast<uint64_t>(hidden * sizeof(float)));
  EXPECT_EQ(staged->traffic().Calls(parallel::CollectiveOp::kAllToAllV), 4u);
}

// A tensor-parallel group over NCCL (one rank: NCCL sums with itself) lets decode steps be
// recorded as CUDA graphs with their sums (NCCL in stream capture): the graph steps give the
// eager steps' tokens, and each replay, awaited through the communicator's watchdog, leaves it
// healthy. One rank's sum changes nothing; several GPUs are needed to see sums add up.
TEST(CudaNcclGraphTest, DecodeGraphsHoldTheirNcclSums) {
  std::string why_not;
  if (!parallel::NcclAvailable(&why_not)) GTEST_SKIP() << "NCCL test skipped: " << why_not;
  CudaBackendOptions options;
  options.arena_bytes = size_t{768} << 20;
  options.kv_dtype = DType::kF32;
  auto backend = CudaBackend::Create(options);
  ASSERT_TRUE(backend.ok()) << backend.status();
  CudaMemorySpace memory(**backend);
  parallel::StagingCounters counters;
  std::unique_ptr<parallel::Communicator> tp = OneRankNccl(memory, &counters);
  ASSERT_NE(tp, nullptr);
  ASSERT_TRUE(tp->SupportsStreamOrdered());
  for (const char* name : {"tiny-dense", "tiny-moe"}) {
    SCOPED_TRACE(name);
    gemma4::ModelParallel parallel;
    parallel.tp_comm = tp.get();
    auto model = gemma4::Model::Load(testing::GoldenPath(name), **backend, parallel);
    ASSERT_TRUE(model.ok()) << model.status();
    KvCacheOptions cache_options;
    cache_options.page_size = 16;
    cache_options.default_tokens = 256;
    auto cache = KvCache::Create((*model)->config(), **backend, (*model)->CacheOptions(cache_options));
    ASSERT_TRUE(cache.ok()) << cache.status();
    const std::vector<int32_t> prompt = testing::RandomPrompt(24, 7);
    GenerateOptions greedy;
    greedy.max_new_tokens = 16;
    (*model)->set_use_graphs(false);
    auto eager = Generate(**model, **cache, prompt, greedy);
    ASSERT_TRUE(eager.ok()) << eager.status();
    (*model)->set_use_graphs(true);
    auto graph = Generate(**model, **cache, prompt, greedy);
    ASSERT_TRUE(graph.ok()) << graph.status();
    EXPECT_EQ(*graph, *eager);
    EXPECT_GT((*model)->graph_captures(), 0);
    EXPECT_GT((*model)->graph_replays(), (*model)->graph_captures());
    EXPECT_TRUE(tp->healthy());
  }
}

}  // namespace
}  // namespace gemma
