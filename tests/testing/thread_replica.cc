#include "tests/testing/thread_replica.h"

#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "tests/testing/compare.h"

namespace gemma::testing {

ThreadReplica::ThreadReplica(ReplicaOptions options) : options_(std::move(options)) {
  const int world = options_.world;
  const int tp = options_.dp_ep ? options_.tp : world;
  options_.tp = tp;
  for (int g = 0; g < groups(); ++g) {
    tp_groups_.push_back(std::make_unique<parallel::InProcessGroup>(tp));
  }
  if (options_.dp_ep) ep_group_ = std::make_unique<parallel::InProcessGroup>(world);
  ranks_.resize(world);
  RunAll([&](int r) {
    ReplicaRank& rank = ranks_[r];
    auto backend = options_.make_backend(r, rank);
    ASSERT_TRUE(backend.ok()) << "rank " << r << ": " << backend.status();
    rank.backend = *std::move(backend);
    auto wrap = [&](std::unique_ptr<parallel::Communicator> comm) {
      return options_.wrap ? options_.wrap(r, std::move(comm), rank) : std::move(comm);
    };
    const int tp_rank = r % tp;
    gemma4::ModelParallel p;
    p.layout = {tp, tp_rank, options_.dp_ep ? world : tp, options_.dp_ep ? r : tp_rank};
    p.check_routing = options_.check_routing;
    if (options_.placement.has_value()) p.placement = &*options_.placement;
    p.ranks_per_node = options_.ranks_per_node;
    if (tp > 1) {
      rank.tp_comm = wrap(tp_groups_[group(r)]->communicator(tp_rank));
      p.tp_comm = rank.tp_comm.get();
    }
    if (options_.dp_ep) {
      rank.ep_comm = wrap(ep_group_->communicator(r));
      p.ep_comm = rank.ep_comm.get();
    }
    auto model = gemma4::Model::Load(GoldenPath(options_.model), *rank.backend, p);
    ASSERT_TRUE(model.ok()) << "rank " << r << ": " << model.status();
    rank.model = *std::move(model);
    KvCacheOptions cache_options;
    cache_options.page_size = options_.page_size;
    cache_options.default_tokens = options_.cache_tokens;
    auto cache = KvCache::Create(rank.model->config(), *rank.backend,
                                 rank.model->CacheOptions(cache_options));
    ASSERT_TRUE(cache.ok()) << "rank " << r << ": " << cache.status();
    rank.cache = *std::move(cache);
  });
}

void ThreadReplica::RunAll(const std::function<void(int)>& fn) {
  std::vector<std::thread> threads;
  for (int r = 0; r < options_.world; ++r) threads.emplace_back(fn, r);
  for (auto& t : threads) t.join();
}

std::string ReplicaCaseName(const ::testing::TestParamInfo<ReplicaCase>& info) {
  const ReplicaCase& c = info.param;
  std::string name = absl::StrCat(c.model, c.dp_ep ? "_dpep_w" : "_tp", c.world);
  if (c.dp_ep) absl::StrAppend(&name, "_t", c.tp);
  for (char& ch : name) {
    if (ch == '-') ch = '_';
  }
  return name;
}

std::vector<int32_t> RandomPrompt(int length, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> tokens = {2};
  while (static_cast<int>(tokens.size()) < length) tokens.push_back(5 + rng() % 500);
  return tokens;
}

GenerateOptions SampledOptions() {
  GenerateOptions o;
  o.max_new_tokens = 16;
  o.sampling.temperature = 0.9f;
  o.sampling.top_k = 40;
  o.sampling.top_p = 0.95f;
  o.sampling.seed = 1234;
  o.sampling.request_key = 5;
  return o;
}

GenerateOptions FullVocabSampledOptions() {
  GenerateOptions o = SampledOptions();
  o.sampling.top_k = 0;
  o.sampling.top_p = 1.0f;
  o.sampling.temperature = 1.3f;
  return o;
}

}  // namespace gemma::testing
