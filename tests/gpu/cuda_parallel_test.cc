// Several CUDA ranks on one GPU, as threads: each rank has its own CudaBackend, and the ranks'
// collectives go through in-process groups (host memory) behind staging communicators, since
// ranks sharing a GPU cannot share NCCL. tp = 2 and dp-ep (ep = 2, and tp = 2 inside ep = 4)
// against one CUDA rank on the same checkpoint: prompt logits, greedy and seeded sampled
// continuations. Also NCCL for real on one rank: the whole collective suite with host buffers
// staged through device memory. Skipped, saying so, where no CUDA device is present.
#include <memory>
#include <string>
#include <vector>

#include "common/status_macros.h"
#include "gtest/gtest.h"
#include "tests/testing/compare.h"
#include "tests/testing/thread_replica.h"
#include "tests/testing/tolerances.h"
#include "tests/unit/parallel/collective_checks.h"
#include "worker/backend/cuda/cuda_backend.h"
#include "worker/backend/cuda/cuda_staging.h"
#include "worker/engine/generate.h"
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
    if (!c.dp_ep || c.tp > 1) {
      // Tensor-parallel reductions of device buffers went through the host: the staging ran.
      EXPECT_GT(counters[r].calls_staged, 0u) << "rank " << r;
      EXPECT_GT(counters[r].bytes_to_host, 0u) << "rank " << r;
    } else {
      // One rank per group has no tensor-parallel reduction, and the expert dispatch hands
      // the communicator host arrays it filled itself: nothing for the staging to move.
      EXPECT_EQ(counters[r].bytes_to_host, 0u) << "rank " << r;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, CudaParallelTest,
                         ::testing::Values(ReplicaCase{"tiny-dense", 2, 2, false},
                                           ReplicaCase{"tiny-moe", 2, 2, false},
                                           ReplicaCase{"tiny-moe", 2, 1, true},
                                           ReplicaCase{"tiny-moe", 4, 2, true}),
                         testing::ReplicaCaseName);

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
