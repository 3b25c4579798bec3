// The engine loop on the tiny MoE checkpoint: batched greedy output equals each request run
// alone (also when pages run out and sequences are preempted and recomputed), chunked prefill
// of a long prompt while others decode, cancellation, seeded sampling, and the sliding bound.
#include <algorithm>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "glog/logging.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/unit/engine/engine_test_util.h"
#include "worker/backend/cpu/cpu_backend.h"
#include "worker/engine/generate.h"

namespace gemma::engine {
namespace {

using testing::Collector;

const std::string kModelDir = std::string(GEMMA_SOURCE_DIR) + "/tests/golden/data/tiny-moe";

std::vector<int32_t> RandomPrompt(std::mt19937& rng, int64_t length, int32_t vocab) {
  std::uniform_int_distribution<int32_t> pick(3, vocab - 1);
  std::vector<int32_t> prompt = {2};
  while (static_cast<int64_t>(prompt.size()) < length) {
    int32_t id = pick(rng);
    if (id != 106) prompt.push_back(id);
  }
  return prompt;
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    backend_ = new CpuBackend(CpuBackendOptions{2});
    auto model = gemma4::Model::Load(kModelDir, *backend_);
    CHECK(model.ok()) << model.status();
    model_ = model->release();
    KvCacheOptions options;
    options.page_size = 16;
    options.default_tokens = 8192;
    auto cache = KvCache::Create(model_->config(), *backend_, options);
    CHECK(cache.ok()) << cache.status();
    reference_cache_ = cache->release();
  }
  static void TearDownTestSuite() {
    delete reference_cache_;
    delete model_;
    delete backend_;
  }

  // A cache of `page_size` with the given pages per pool, for the engine under test.
  std::unique_ptr<KvCache> MakeCache(int64_t page_size, int64_t sliding_pages,
                                     int64_t full_pages) {
    KvCacheOptions options;
    options.page_size = page_size;
    options.num_pages[kSlidingPool] = sliding_pages;
    options.num_pages[kFullPool] = full_pages;
    auto cache = KvCache::Create(model_->config(), *backend_, options);
    CHECK(cache.ok()) << cache.status();
    return std::move(*cache);
  }

  std::unique_ptr<Engine> MakeEngine(KvCache* cache, int64_t max_step_tokens,
                                     Admission admission = Admission::kReserve,
                                     int64_t head_bypass_steps = 64) {
    EngineOptions options;
    options.scheduler.max_step_tokens = max_step_tokens;
    options.scheduler.admission = admission;
    options.scheduler.head_bypass_steps = head_bypass_steps;
    auto engine = Engine::Create(model_, cache, options);
    CHECK(engine.ok()) << engine.status();
    return std::move(*engine);
  }

  // The request run alone through the single-sequence path (whole prompt in one step).
  std::vector<int32_t> Alone(const Request& request) {
    GenerateOptions options;
    options.max_new_tokens = request.max_tokens;
    options.sampling = request.sampling;
    if (!request.ignore_end_ids) {
      for (int64_t id : model_->config().eos_token_ids) {
        options.stop_ids.push_back(static_cast<int32_t>(id));
      }
    }
    auto out = Generate(*model_, *reference_cache_, request.prompt, options);
    CHECK(out.ok()) << out.status();
    return *out;
  }

  // Steps `engine` until idle, checking its pages after every step.
  void RunChecked(Engine& engine, Collector& collector, int max_steps = 10000) {
    for (int step = 0; step < max_steps && engine.HasWork(); ++step) {
      collector.set_current_step(engine.counters().steps + 1);
      auto stats = engine.Step();
      ASSERT_TRUE(stats.ok()) << stats.status();
      CheckPages(engine, *stats);
    }
    ASSERT_FALSE(engine.HasWork()) << "the engine did not finish";
  }

  // Checks that each running sequence's sliding pages stayed within window - 1 + chunk
  // positions (rounded out to whole pages) during the step, within window - 1 after trimming,
  // and that the pools' used pages are exactly the pages the sequences hold.
  void CheckPages(Engine& engine, const StepStats& stats) {
    const int64_t window = engine.cache().sliding_window();
    const int64_t page = engine.cache().page_size();
    int64_t held[2] = {0, 0};
    for (const SequenceView& s : engine.Sequences()) {
      held[0] += s.pages_held[0];
      held[1] += s.pages_held[1];
      if (s.state != SequenceState::kRunning) continue;
      const int64_t bound = (CeilDiv(window - 1 + s.last_chunk, page) + 1) * page;
      ASSERT_LE(s.sliding_positions_peak, bound) << "request " << s.id << " chunk "
                                                  << s.last_chunk;
      ASSERT_LE(s.sliding_positions_held, (CeilDiv(window - 1, page) + 1) * page)
          << "request " << s.id << " after trimming";
    }
    ASSERT_EQ(held[kSlidingPool], stats.pages_used[kSlidingPool]);
    ASSERT_EQ(held[kFullPool], stats.pages_used[kFullPool]);
  }


  static CpuBackend* backend_;
  static gemma4::Model* model_;
  static KvCache* reference_cache_;
};

CpuBackend* EngineTest::backend_ = nullptr;
gemma4::Model* EngineTest::model_ = nullptr;
KvCache* EngineTest::reference_cache_ = nullptr;

TEST_F(EngineTest, SixtyFourRequestsWithPreemptionMatchTheirSoloRuns) {
  std::mt19937 rng(11);
  std::vector<Request> requests;
  std::uniform_int_distribution<int64_t> prompt_len(3, 24), max_tokens(4, 16);
  for (int i = 0; i < 64; ++i) {
    Request r;
    r.prompt = RandomPrompt(rng, prompt_len(rng), 512);
    r.max_tokens = max_tokens(rng);
    requests.push_back(r);
  }
  // Page size 4: 64 sequences of up to 40 positions need up to 640 full pages; give 96.
  // Admitted by their first chunk, they outgrow the pool: preemption must happen.
  auto cache = MakeCache(4, 400, 96);
  auto engine = MakeEngine(cache.get(), 128, Admission::kFirstChunk);
  Collector collector;
  for (int i = 0; i < 64; ++i) {
    ASSERT_TRUE(engine->Submit(requests[i], collector.For(std::to_string(i))).ok());
  }
  RunChecked(*engine, collector);
  EXPECT_GT(engine->counters().preemptions, 0);
  // Every position but a request's last token is fed once; what preemptions dropped is fed
  // again, and counted so.
  int64_t positions = 0;
  for (int i = 0; i < 64; ++i) {
    positions += static_cast<int64_t>(requests[i].prompt.size() +
                                      collector[std::to_string(i)].tokens.size()) - 1;
  }
  EXPECT_GT(engine->counters().tokens_recomputed, 0);
  EXPECT_EQ(engine->counters().tokens_prefilled + engine->counters().tokens_decoded,
            positions + engine->counters().tokens_recomputed);
  for (int i = 0; i < 64; ++i) {
    const testing::Collected& c = collector[std::to_string(i)];
    EXPECT_TRUE(c.finished);
    EXPECT_EQ(c.num_final_events, 1);
    EXPECT_EQ(c.tokens, Alone(requests[i])) << "request " << i;
    EXPECT_TRUE(c.reason == FinishReason::kMaxTokens || c.reason == FinishReason::kEndId);
  }
  EXPECT_EQ(cache->pool(kSlidingPool).num_used(), 0);
  EXPECT_EQ(cache->pool(kFullPool).num_used(), 0);
}

TEST_F(EngineTest, LongPromptIsChunkedWhileEightSequencesDecodeEveryStep) {
  std::mt19937 rng(5);
  auto cache = MakeCache(16, 256, 512);
  auto engine = MakeEngine(cache.get(), 512);
  Collector collector;
  std::vector<Request> decoders;
  for (int i = 0; i < 8; ++i) {
    Request r;
    r.prompt = RandomPrompt(rng, 5 + i, 512);
    r.max_tokens = 30;
    r.ignore_end_ids = true;
    decoders.push_back(r);
    ASSERT_TRUE(engine->Submit(r, collector.For(std::to_string(i))).ok());
  }
  // Two steps: the eight prompts, then their first decode.
  for (int s = 0; s < 2; ++s) {
    collector.set_current_step(engine->counters().steps + 1);
    ASSERT_TRUE(engine->Step().ok());
  }
  Request long_request;
  long_request.prompt = RandomPrompt(rng, 4000, 512);
  long_request.max_tokens = 4;
  ASSERT_TRUE(engine->Submit(long_request, collector.For("long")).ok());
  int prefill_steps = 0;
  while (collector["long"].tokens.empty()) {
    std::vector<size_t> before;
    for (int i = 0; i < 8; ++i) before.push_back(collector[std::to_string(i)].tokens.size());
    collector.set_current_step(engine->counters().steps + 1);
    auto stats = engine->Step();
    ASSERT_TRUE(stats.ok()) << stats.status();
    ++prefill_steps;
    ASSERT_LE(stats->tokens_prefilled + stats->tokens_decoded, 512);
    CheckPages(*engine, *stats);
    for (int i = 0; i < 8; ++i) {
      ASSERT_EQ(collector[std::to_string(i)].tokens.size(), before[i] + 1)
          << "decoder " << i << " got no token in prefill step " << prefill_steps;
    }
    ASSERT_LT(prefill_steps, 20);
  }
  // 4000 tokens under a 512-token budget shared with 8 decodes: at least 8 steps.
  EXPECT_GE(prefill_steps, 8);
  RunChecked(*engine, collector);
  EXPECT_EQ(collector["long"].tokens, Alone(long_request));
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(collector[std::to_string(i)].tokens, Alone(decoders[i])) << "decoder " << i;
  }
}

TEST_F(EngineTest, CancellationFreesPagesWithinOneStepAndOthersCarryOn) {
  std::mt19937 rng(9);
  auto cache = MakeCache(4, 128, 128);
  auto engine = MakeEngine(cache.get(), 64);
  Collector collector;
  std::vector<Request> requests;
  std::vector<uint64_t> ids;
  for (int i = 0; i < 4; ++i) {
    Request r;
    r.prompt = RandomPrompt(rng, 10 + 3 * i, 512);
    r.max_tokens = 12;
    r.ignore_end_ids = true;
    requests.push_back(r);
    auto id = engine->Submit(r, collector.For(std::to_string(i)));
    ASSERT_TRUE(id.ok());
    ids.push_back(*id);
  }
  for (int s = 0; s < 4; ++s) ASSERT_TRUE(engine->Step().ok());
  int64_t cancelled_pages[2] = {0, 0};
  for (const SequenceView& s : engine->Sequences()) {
    if (s.id == ids[2]) {
      cancelled_pages[0] = s.pages_held[0];
      cancelled_pages[1] = s.pages_held[1];
    }
  }
  ASSERT_GT(cancelled_pages[kFullPool], 0);
  const size_t tokens_before = collector["2"].tokens.size();
  engine->Cancel(ids[2]);
  auto stats = engine->Step();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(collector["2"].reason, FinishReason::kCancelled);
  EXPECT_EQ(collector["2"].tokens.size(), tokens_before);
  int64_t held[2] = {0, 0};
  for (const SequenceView& s : engine->Sequences()) {
    EXPECT_NE(s.id, ids[2]);
    held[0] += s.pages_held[0];
    held[1] += s.pages_held[1];
  }
  EXPECT_EQ(stats->pages_used[kSlidingPool], held[kSlidingPool]);
  EXPECT_EQ(stats->pages_used[kFullPool], held[kFullPool]);
  Collector ignored;
  RunChecked(*engine, ignored);
  for (int i : {0, 1, 3}) {
    EXPECT_EQ(collector[std::to_string(i)].tokens, Alone(requests[i])) << "request " << i;
  }
  EXPECT_EQ(cache->pool(kFullPool).num_used(), 0);
}

TEST_F(EngineTest, SeededSamplingIsTheSameAloneInABatchAndAfterPreemption) {
  std::mt19937 rng(21);
  Request seeded;
  seeded.prompt = RandomPrompt(rng, 12, 512);
  seeded.max_tokens = 16;
  seeded.ignore_end_ids = true;
  seeded.sampling.temperature = 0.9f;
  seeded.sampling.top_k = 50;
  seeded.sampling.top_p = 0.95f;
  seeded.sampling.seed = 1234;
  seeded.sampling.request_key = 77;

  // Alone, through the engine.
  std::vector<int32_t> alone;
  {
    auto cache = MakeCache(4, 64, 64);
    auto engine = MakeEngine(cache.get(), 128);
    Collector collector;
    ASSERT_TRUE(engine->Submit(seeded, collector.For("s")).ok());
    RunChecked(*engine, collector);
    alone = collector["s"].tokens;
  }
  ASSERT_EQ(alone.size(), 16u);
  EXPECT_EQ(alone, Alone(seeded));

  // A different seed draws differently, so the comparisons below can fail.
  Request other_seed = seeded;
  other_seed.sampling.seed = 4321;
  EXPECT_NE(Alone(other_seed), alone);

  // In a full batch of other sampled requests, then with pages so scarce that it is preempted
  // (submitted last, it is the youngest).
  for (int64_t full_pages : {int64_t{512}, int64_t{40}}) {
    auto cache = MakeCache(4, 400, full_pages);
    auto engine = MakeEngine(cache.get(), 64, Admission::kFirstChunk);
    Collector collector;
    for (int i = 0; i < 24; ++i) {
      Request r;
      r.prompt = RandomPrompt(rng, 8 + i % 7, 512);
      r.max_tokens = 16;
      r.ignore_end_ids = true;
      r.sampling.temperature = 1.0f;
      if (i % 2 == 0) r.sampling.seed = 1234;  // same seed, other keys
      r.sampling.request_key = static_cast<uint64_t>(i);
      ASSERT_TRUE(engine->Submit(r, collector.For(std::to_string(i))).ok());
    }
    auto id = engine->Submit(seeded, collector.For("s"));
    ASSERT_TRUE(id.ok());
    int64_t seeded_preemptions = 0;
    engine->set_step_observer([&](const StepStats&) {
      for (const SequenceView& s : engine->Sequences()) {
        if (s.id == *id) seeded_preemptions = std::max(seeded_preemptions, s.num_preemptions);
      }
    });
    RunChecked(*engine, collector);
    EXPECT_EQ(collector["s"].tokens, alone) << "full pages " << full_pages;
    if (full_pages == 40) {
      EXPECT_GT(seeded_preemptions, 0);
    } else {
      EXPECT_EQ(engine->counters().preemptions, 0);
      EXPECT_EQ(engine->counters().tokens_recomputed, 0);
    }
  }
}

TEST_F(EngineTest, HigherPriorityRequestsAreAdmittedFirst) {
  std::mt19937 rng(3);
  // Room for one sequence at a time: 8 full pages of 4 positions.
  auto cache = MakeCache(4, 64, 8);
  auto engine = MakeEngine(cache.get(), 64);
  Collector collector;
  std::vector<std::string> order;
  for (int i = 0; i < 3; ++i) {
    Request r;
    r.prompt = RandomPrompt(rng, 20, 512);
    r.max_tokens = 8;
    r.ignore_end_ids = true;
    r.priority = i;  // the last submitted has the highest priority
    std::string name = std::to_string(i);
    auto inner = collector.For(name);
    ASSERT_TRUE(engine->Submit(r, [&order, inner, name](const RequestOutput& out) {
                        inner(out);
                        if (out.finished) order.push_back(name);
                      }).ok());
  }
  RunChecked(*engine, collector);
  EXPECT_EQ(order, (std::vector<std::string>{"2", "1", "0"}));
}


// Six long requests and forty short ones on a small cache. Admitted by what they will need,
// nothing is ever preempted, every output equals its solo run, and the short ones, passing the
// long ones that wait for room, are all done before the last long one (they do not wait behind
// it). Admitted by their first chunk instead, the same load preempts.
TEST_F(EngineTest, ReservedAdmissionNeverPreemptsAndShortRequestsPassWaitingLongOnes) {
  std::mt19937 rng(21);
  std::vector<Request> requests;
  for (int i = 0; i < 46; ++i) {
    Request r;
    r.prompt = RandomPrompt(rng, 10, 512);
    r.max_tokens = i < 6 ? 200 : 8;  // 210 positions: 53 pages of 4; 18: 5 pages
    r.ignore_end_ids = true;
    requests.push_back(r);
  }
  for (Admission admission : {Admission::kReserve, Admission::kFirstChunk}) {
    SCOPED_TRACE(admission == Admission::kReserve ? "reserve" : "first chunk");
    auto cache = MakeCache(4, 400, 200);  // three long ones at a time, and room beside them
    auto engine = MakeEngine(cache.get(), 128, admission);
    Collector collector;
    for (int i = 0; i < 46; ++i) {
      ASSERT_TRUE(engine->Submit(requests[i], collector.For(std::to_string(i))).ok());
    }
    RunChecked(*engine, collector);
    if (admission == Admission::kFirstChunk) {
      EXPECT_GT(engine->counters().preemptions, 0);
      continue;
    }
    EXPECT_EQ(engine->counters().preemptions, 0);
    EXPECT_EQ(engine->counters().tokens_recomputed, 0);
    uint64_t last_long = 0, last_short = 0;
    for (int i = 0; i < 46; ++i) {
      const testing::Collected& c = collector[std::to_string(i)];
      EXPECT_EQ(c.tokens, Alone(requests[i])) << "request " << i;
      (i < 6 ? last_long : last_short) = std::max(i < 6 ? last_long : last_short, c.last_step);
    }
    EXPECT_LT(last_short, last_long) << "short requests waited behind the long ones";
  }
}

// A long request at the head of the queue while short ones keep arriving two a step. Admitted
// by reservation, short ones pass it only if they end before the step at which it fits at the
// latest (or fit in what it leaves spare then): they keep flowing while it waits, and it gets
// in as soon as the short ones admitted before it have ended, however many keep arriving.
TEST_F(EngineTest, ShortRequestsBackfillAroundAWaitingLongOneWithoutDelayingIt) {
  std::mt19937 rng(31);
  auto make = [&](int64_t max_tokens) {
    Request r;
    r.prompt = RandomPrompt(rng, 8, 512);
    r.max_tokens = max_tokens;
    r.ignore_end_ids = true;
    return r;
  };
  auto cache = MakeCache(4, 400, 70);  // the long one needs 52 pages, a short one 3 to 6
  auto engine = MakeEngine(cache.get(), 128, Admission::kReserve);
  Collector collector;
  int n = 0;
  // Staggered lengths (at most 15 steps), so that the short ones never all finish together.
  for (; n < 14; ++n) {
    ASSERT_TRUE(engine->Submit(make(2 + n), collector.For(absl::StrCat(n))).ok());
  }
  Request long_request = make(200);
  ASSERT_TRUE(engine->Submit(long_request, collector.For("long")).ok());
  constexpr int kArrivalSteps = 150;
  int step = 0;
  for (; step < 5000 && engine->HasWork(); ++step) {
    if (step < kArrivalSteps) {
      for (int k = 0; k < 2; ++k, ++n) {
        ASSERT_TRUE(engine->Submit(make(4 + n % 11), collector.For(absl::StrCat(n))).ok());
      }
    }
    collector.set_current_step(static_cast<uint64_t>(step) + 1);
    ASSERT_TRUE(engine->Step().ok());
  }
  ASSERT_FALSE(engine->HasWork());
  EXPECT_EQ(engine->counters().preemptions, 0);
  const testing::Collected& long_one = collector["long"];
  ASSERT_TRUE(long_one.finished);
  EXPECT_EQ(long_one.tokens, Alone(long_request));
  // Every short one that was there before it ends by step 16 (its prefill step gives its first
  // token, then one a step); nothing that came later may hold it back.
  EXPECT_LE(long_one.first_step, 17u) << "the long request was delayed";
  // Short ones arriving while it waited were admitted and served meanwhile.
  int passed = 0;
  for (int i = 14; i < n; ++i) {
    const testing::Collected& c = collector[absl::StrCat(i)];
    ASSERT_TRUE(c.finished) << i;
    passed += c.first_step < long_one.first_step ? 1 : 0;
  }
  EXPECT_GT(passed, 0) << "short requests waited behind the long one";
  // And beside it: short ones ran while it decoded.
  int beside = 0;
  for (int i = 14; i < n; ++i) {
    const testing::Collected& c = collector[absl::StrCat(i)];
    beside += c.first_step > long_one.first_step && c.last_step < long_one.last_step ? 1 : 0;
  }
  EXPECT_GT(beside, 50);
}

}  // namespace
}  // namespace gemma::engine
