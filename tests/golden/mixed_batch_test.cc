// A batch mixing prefills and decodes of different lengths in one forward call gives each
// sequence the logits it gets when run alone.
#include <memory>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "tests/testing/compare.h"
#include "tests/testing/tolerances.h"
#include "worker/backend/cpu/cpu_backend.h"
#include "worker/engine/generate.h"
#include "worker/model/gemma4/kv_cache.h"
#include "worker/model/gemma4/model.h"

namespace gemma {
namespace {

using gemma4::LogitsMode;
using gemma4::SequenceStep;

class MixedBatchTest : public ::testing::TestWithParam<std::string> {};

TEST_P(MixedBatchTest, MixedPrefillAndDecodeEqualsEachSequenceAlone) {
  CpuBackend backend;
  auto model = gemma4::Model::Load(testing::GoldenPath(GetParam()), backend);
  ASSERT_TRUE(model.ok()) << model.status();
  const int64_t vocab = (*model)->config().vocab_size;
  KvCacheOptions options;
  options.page_size = 4;
  options.default_tokens = 512;
  auto cache = KvCache::Create((*model)->config(), backend, options);
  ASSERT_TRUE(cache.ok()) << cache.status();

  // Four sequences; each row of `schedule` says how many new tokens each takes in that step
  // (0 = not in the step).
  const std::vector<int64_t> lengths = {23, 7, 14, 3};
  const std::vector<std::vector<int64_t>> schedule = {
      {10, 5, 0, 0}, {13, 1, 12, 0}, {0, 1, 1, 1}, {0, 0, 1, 1}, {0, 0, 0, 1}};
  std::mt19937 rng(7);
  std::vector<std::vector<int32_t>> tokens(lengths.size());
  for (size_t s = 0; s < lengths.size(); ++s) {
    tokens[s].push_back(2);
    while (static_cast<int64_t>(tokens[s].size()) < lengths[s]) {
      tokens[s].push_back(static_cast<int32_t>(5 + rng() % (vocab - 5)));
    }
  }
  std::vector<SequenceKv> kv(lengths.size());
  std::vector<std::vector<float>> batched(lengths.size());
  for (const auto& step_counts : schedule) {
    std::vector<SequenceStep> steps;
    std::vector<size_t> members;
    for (size_t s = 0; s < lengths.size(); ++s) {
      if (step_counts[s] == 0) continue;
      int64_t begin = kv[s].length;
      ASSERT_LE(begin + step_counts[s], lengths[s]);
      ASSERT_TRUE((*cache)->Grow(kv[s], begin + step_counts[s]).ok());
      steps.push_back({std::span<const int32_t>(tokens[s]).subspan(begin, step_counts[s]),
                       &kv[s], LogitsMode::kAll});
      members.push_back(s);
    }
    auto logits = (*model)->Forward(steps, **cache);
    ASSERT_TRUE(logits.ok()) << logits.status();
    auto host = ReadLogits(backend, **logits, (*model)->num_logit_rows(), vocab);
    ASSERT_TRUE(host.ok());
    int64_t row = 0;
    for (size_t i = 0; i < members.size(); ++i) {
      int64_t n = step_counts[members[i]];
      batched[members[i]].insert(batched[members[i]].end(), host->begin() + row * vocab,
                                 host->begin() + (row + n) * vocab);
      row += n;
      (*cache)->TrimSliding(kv[members[i]]);
    }
  }
  for (size_t s = 0; s < lengths.size(); ++s) {
    ASSERT_EQ(kv[s].length, lengths[s]) << "schedule did not finish sequence " << s;
    (*cache)->Release(kv[s]);
    auto alone = PromptLogits(**model, **cache, tokens[s]);
    ASSERT_TRUE(alone.ok()) << alone.status();
    auto cmp = testing::Compare(batched[s], *alone);
    EXPECT_LE(cmp.Relative(), testing::kSelfRelTol) << "sequence " << s << ": " << cmp.ToString();
  }
}

INSTANTIATE_TEST_SUITE_P(Models, MixedBatchTest, ::testing::Values("tiny-dense", "tiny-moe"));

}  // namespace
}  // namespace gemma
