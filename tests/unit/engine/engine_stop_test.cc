// Stop conditions and request plumbing of the engine loop, on scripted tokens of the real test
// tokenizer: stop strings that span tokens, stop ids, end ids, max_tokens, finish reasons,
// validation, cancellation of waiting requests, and the threaded Run() loop with a queue.
#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "glog/logging.h"
#include "gtest/gtest.h"
#include "tests/unit/engine/engine_test_util.h"
#include "worker/backend/cpu/cpu_backend.h"

namespace gemma::engine {
namespace {

using testing::Collector;
using testing::ScriptedExecutor;

constexpr int64_t kPromptLength = 3;
const std::vector<int32_t> kPrompt = {2, 400, 401};

ModelConfig ScriptConfig(int64_t vocab) {
  ModelConfig c;
  c.vocab_size = vocab;
  c.num_hidden_layers = 2;
  c.layer_types = {LayerType::kSliding, LayerType::kFull};
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.num_global_key_value_heads = 1;
  c.head_dim = 4;
  c.global_head_dim = 8;
  c.attention_k_eq_v = true;
  c.sliding_window = 8;
  c.max_position_embeddings = 4096;
  c.eos_token_ids = {1, 106};
  return c;
}

class EngineStopTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto tok = tokenizer::Tokenizer::FromFile(std::string(GEMMA_SOURCE_DIR) +
                                              "/tests/golden/data/tokenizer/gemma4_test_tokenizer.json");
    ASSERT_TRUE(tok.ok()) << tok.status();
    tokenizer_ = std::move(*tok);
    config_ = ScriptConfig(tokenizer_->vocab_size());
    KvCacheOptions options;
    options.page_size = 4;
    options.num_pages[kSlidingPool] = 64;
    options.num_pages[kFullPool] = 64;
    auto cache = KvCache::Create(config_, backend_, options);
    ASSERT_TRUE(cache.ok()) << cache.status();
    cache_ = std::move(*cache);
  }

  // An engine playing `scripts` (request key -> generated tokens).
  std::unique_ptr<Engine> MakeEngine(absl::flat_hash_map<uint64_t, std::vector<int32_t>> scripts,
                                     bool with_tokenizer = true) {
    EngineOptions options;
    options.tokenizer = with_tokenizer ? tokenizer_.get() : nullptr;
    auto engine = Engine::Create(std::make_unique<ScriptedExecutor>(kPromptLength, std::move(scripts)),
                                 config_, cache_.get(), options);
    CHECK(engine.ok()) << engine.status();
    return std::move(*engine);
  }

  Request MakeRequest(uint64_t key, int64_t max_tokens) {
    Request r;
    r.prompt = kPrompt;
    r.sampling.request_key = key;
    r.max_tokens = max_tokens;
    return r;
  }

  std::vector<int32_t> Encode(const std::string& text) { return tokenizer_->Encode(text); }

  CpuBackend backend_;
  std::unique_ptr<tokenizer::Tokenizer> tokenizer_;
  ModelConfig config_;
  std::unique_ptr<KvCache> cache_;
};

TEST_F(EngineStopTest, StopStringSpanningTokensEndsAndIsWithheld) {
  const std::string text = "Hello world, stop here please.";
  const std::string stop = "lo wo";
  std::vector<int32_t> ids = Encode(text);
  // The claim needs a stop string that no single token contains.
  int tokens_touching = 0;
  for (int32_t id : ids) {
    std::string piece = tokenizer_->Decode(std::vector<int32_t>{id});
    ASSERT_EQ(piece.find(stop), std::string::npos) << "one token holds the stop string";
    for (char ch : piece) {
      if (stop.find(ch) != std::string::npos) {
        ++tokens_touching;
        break;
      }
    }
  }
  ASSERT_GE(tokens_touching, 2);
  // The request should stop at the first prefix of ids whose text contains the stop string.
  size_t expected_tokens = 0;
  for (size_t k = 1; k <= ids.size(); ++k) {
    std::vector<int32_t> prefix(ids.begin(), ids.begin() + k);
    if (tokenizer_->Decode(prefix).find(stop) != std::string::npos) {
      expected_tokens = k;
      break;
    }
  }
  ASSERT_GT(expected_tokens, 1u);

  auto engine = MakeEngine({{7, ids}});
  Collector collector;
  Request request = MakeRequest(7, 100);
  request.stop_strings = {"never appears", stop};
  ASSERT_TRUE(engine->Submit(request, collector.For("a")).ok());
  ASSERT_TRUE(engine->RunUntilIdle().ok());
  const testing::Collected& a = collector["a"];
  EXPECT_EQ(a.reason, FinishReason::kStopString);
  EXPECT_EQ(a.text, "Hel");
  EXPECT_EQ(a.tokens, std::vector<int32_t>(ids.begin(), ids.begin() + expected_tokens));
  EXPECT_EQ(a.num_final_events, 1);
  EXPECT_EQ(cache_->pool(kFullPool).num_used(), 0);
  EXPECT_EQ(cache_->pool(kSlidingPool).num_used(), 0);
}

// A request resumed after k generated tokens (they end its prompt, num_resumed = k) yields the
// rest of the uninterrupted run: the same tokens, the same finish, and exactly the text not yet
// delivered, also when the resume point falls inside a held-back stop-string prefix.
TEST_F(EngineStopTest, ResumedRequestDeliversExactlyTheRest) {
  const std::string text = "Hello world, stop here please.";
  const std::vector<int32_t> ids = Encode(text);
  ASSERT_GE(ids.size(), 6u);
  for (const std::vector<std::string>& stops :
       {std::vector<std::string>{}, std::vector<std::string>{"lo wo"},
        std::vector<std::string>{"here pl"}}) {
    auto engine = MakeEngine({{7, ids}});
    Collector collector;
    Request whole = MakeRequest(7, static_cast<int64_t>(ids.size()));
    whole.stop_strings = stops;
    ASSERT_TRUE(engine->Submit(whole, collector.For("whole")).ok());
    ASSERT_TRUE(engine->RunUntilIdle().ok());
    const testing::Collected full = collector["whole"];
    ASSERT_TRUE(full.finished);
    for (size_t k = 1; k < full.tokens.size(); ++k) {
      SCOPED_TRACE(::testing::Message() << "stops " << stops.size() << ", resumed after " << k);
      Request resumed = whole;
      resumed.prompt.insert(resumed.prompt.end(), full.tokens.begin(), full.tokens.begin() + k);
      resumed.num_resumed = static_cast<int64_t>(k);
      const std::string name = absl::StrCat("resumed", k, "_", stops.size());
      ASSERT_TRUE(engine->Submit(resumed, collector.For(name)).ok());
      ASSERT_TRUE(engine->RunUntilIdle().ok());
      const testing::Collected& rest = collector[name];
      EXPECT_EQ(rest.tokens, std::vector<int32_t>(full.tokens.begin() + k, full.tokens.end()));
      EXPECT_EQ(rest.reason, full.reason);
      std::string delivered;  // what the first run had sent after k tokens (one per event)
      for (size_t e = 0; e < k; ++e) delivered += full.event_texts[e];
      EXPECT_EQ(delivered + rest.text, full.text);
    }
  }
}

// A resumed request reserves the KV pages of its whole length (prompt plus every token it may
// generate, the resumed ones included), so a request admitted beside it never makes it run out
// of pages: with 64 full pages of 4, a resumed request of 3 + 200 positions (51 pages) and a
// fresh one of 3 + 120 (31 pages) cannot both be reserved, and the second waits instead of
// forcing a preemption later.
TEST_F(EngineStopTest, AResumedRequestReservesItsWholeLength) {
  std::vector<int32_t> long_script(200), short_script(120);
  for (size_t i = 0; i < long_script.size(); ++i) long_script[i] = 400 + static_cast<int32_t>(i % 50);
  for (size_t i = 0; i < short_script.size(); ++i) short_script[i] = 450 + static_cast<int32_t>(i % 40);
  auto engine = MakeEngine({{1, long_script}, {2, short_script}}, /*with_tokenizer=*/false);
  Request resumed = MakeRequest(1, 200);
  resumed.prompt.insert(resumed.prompt.end(), long_script.begin(), long_script.begin() + 100);
  resumed.num_resumed = 100;
  Collector collector;
  ASSERT_TRUE(engine->Submit(resumed, collector.For("resumed")).ok());
  ASSERT_TRUE(engine->Submit(MakeRequest(2, 120), collector.For("fresh")).ok());
  ASSERT_TRUE(engine->RunUntilIdle().ok());
  EXPECT_EQ(collector["resumed"].tokens,
            std::vector<int32_t>(long_script.begin() + 100, long_script.end()));
  EXPECT_EQ(collector["fresh"].tokens, short_script);
  EXPECT_EQ(engine->counters().preemptions, 0);
}

TEST_F(EngineStopTest, ResumeBeyondItsLimitsIsInvalid) {
  auto engine = MakeEngine({{7, Encode("Hello world")}});
  Request r = MakeRequest(7, 4);
  r.num_resumed = 3;  // the prompt has 3 ids: nothing of the original prompt would be left
  EXPECT_EQ(engine->Submit(r, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  r.prompt.push_back(500);
  r.prompt.push_back(501);
  r.prompt.push_back(502);
  r.prompt.push_back(503);
  r.num_resumed = 4;  // as many as max_tokens: the request was already complete
  EXPECT_EQ(engine->Submit(r, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineStopTest, TextWithoutStopIsReleasedWhole) {
  const std::string text = "Hello world";
  std::vector<int32_t> ids = Encode(text);
  auto engine = MakeEngine({{1, ids}});
  Collector collector;
  Request request = MakeRequest(1, static_cast<int64_t>(ids.size()));
  request.stop_strings = {"world!"};  // a prefix of it ends the text: held, then flushed
  ASSERT_TRUE(engine->Submit(request, collector.For("a")).ok());
  ASSERT_TRUE(engine->RunUntilIdle().ok());
  EXPECT_EQ(collector["a"].reason, FinishReason::kMaxTokens);
  EXPECT_EQ(collector["a"].text, text);
  EXPECT_EQ(collector["a"].tokens, ids);
}

// skip_special_tokens leaves special tokens (here <bos> and a control token) out of the text,
// and out of what stop strings see, while the ids keep them; without it they are text.
TEST_F(EngineStopTest, SkipSpecialTokensKeepsThemOutOfTheTextOnly) {
  const int32_t bos = tokenizer_->TokenToId("<bos>");
  const int32_t turn = tokenizer_->TokenToId("<|turn>");
  ASSERT_GE(bos, 0);
  ASSERT_GE(turn, 0);
  std::vector<int32_t> ids = Encode("Hello");
  ids.insert(ids.begin() + 1, bos);
  ids.push_back(turn);
  const std::vector<int32_t> world = Encode(" world");
  ids.insert(ids.end(), world.begin(), world.end());
  auto engine = MakeEngine({{1, ids}, {2, ids}});
  Collector collector;
  Request skip = MakeRequest(1, static_cast<int64_t>(ids.size()));
  skip.skip_special_tokens = true;
  Request keep = MakeRequest(2, static_cast<int64_t>(ids.size()));
  ASSERT_TRUE(engine->Submit(skip, collector.For("skip")).ok());
  ASSERT_TRUE(engine->Submit(keep, collector.For("keep")).ok());
  ASSERT_TRUE(engine->RunUntilIdle().ok());
  EXPECT_EQ(collector["skip"].text, tokenizer_->Decode(ids, {.skip_special_tokens = true}));
  EXPECT_EQ(collector["skip"].text.find("<"), std::string::npos) << collector["skip"].text;
  EXPECT_EQ(collector["keep"].text, tokenizer_->Decode(ids));
  EXPECT_NE(collector["keep"].text.find("<|turn>"), std::string::npos) << collector["keep"].text;
  EXPECT_EQ(collector["skip"].tokens, ids);
  EXPECT_EQ(collector["keep"].tokens, ids);
}

TEST_F(EngineStopTest, EndIdsStopTokensAndMaxTokensReportTheirReasons) {
  std::vector<int32_t> hello = Encode("Hello world");
  ASSERT_GE(hello.size(), 2u);
  std::vector<int32_t> with_eos = {hello[0], 1, hello[1]};
  std::vector<int32_t> with_turn_end = {hello[0], hello[1], 106, hello[0]};
  std::vector<int32_t> with_stop_id = {hello[0], 450, hello[1]};
  std::vector<int32_t> plain = {hello[0], hello[1], hello[0], hello[1], hello[0]};
  auto engine = MakeEngine(
      {{1, with_eos}, {2, with_turn_end}, {3, with_stop_id}, {4, plain}, {5, with_eos}});
  Collector collector;
  ASSERT_TRUE(engine->Submit(MakeRequest(1, 10), collector.For("eos")).ok());
  ASSERT_TRUE(engine->Submit(MakeRequest(2, 10), collector.For("turn")).ok());
  Request stop_id = MakeRequest(3, 10);
  stop_id.stop_token_ids = {450};
  ASSERT_TRUE(engine->Submit(stop_id, collector.For("stop_id")).ok());
  ASSERT_TRUE(engine->Submit(MakeRequest(4, 4), collector.For("max")).ok());
  Request ignore = MakeRequest(5, 3);
  ignore.ignore_end_ids = true;
  ASSERT_TRUE(engine->Submit(ignore, collector.For("ignore")).ok());
  ASSERT_TRUE(engine->RunUntilIdle().ok());

  EXPECT_EQ(collector["eos"].reason, FinishReason::kEndId);
  EXPECT_EQ(collector["eos"].tokens, (std::vector<int32_t>{hello[0], 1}));
  EXPECT_EQ(collector["eos"].text, tokenizer_->Decode(std::vector<int32_t>{hello[0]}));
  EXPECT_EQ(collector["turn"].reason, FinishReason::kEndId);
  EXPECT_EQ(collector["turn"].tokens, (std::vector<int32_t>{hello[0], hello[1], 106}));
  EXPECT_EQ(collector["turn"].text, tokenizer_->Decode(std::vector<int32_t>{hello[0], hello[1]}));
  EXPECT_EQ(collector["stop_id"].reason, FinishReason::kStopToken);
  EXPECT_EQ(collector["stop_id"].tokens, (std::vector<int32_t>{hello[0], 450}));
  EXPECT_EQ(collector["max"].reason, FinishReason::kMaxTokens);
  EXPECT_EQ(collector["max"].tokens.size(), 4u);
  EXPECT_EQ(collector["ignore"].reason, FinishReason::kMaxTokens);
  EXPECT_EQ(collector["ignore"].tokens, with_eos);
  for (const char* name : {"eos", "turn", "stop_id", "max", "ignore"}) {
    EXPECT_EQ(collector[name].num_final_events, 1) << name;
    // One event per token, the last of which is the final one.
    EXPECT_EQ(collector[name].num_events, static_cast<int>(collector[name].tokens.size())) << name;
  }
  EXPECT_EQ(engine->counters().requests_finished, 5);
}

TEST_F(EngineStopTest, SubmitRejectsBadRequests) {
  auto engine = MakeEngine({}, /*with_tokenizer=*/false);
  Request empty = MakeRequest(1, 4);
  empty.prompt.clear();
  EXPECT_EQ(engine->Submit(empty, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  Request bad_id = MakeRequest(1, 4);
  bad_id.prompt.push_back(static_cast<int32_t>(config_.vocab_size));
  EXPECT_EQ(engine->Submit(bad_id, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine->Submit(MakeRequest(1, 0), nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  Request stop = MakeRequest(1, 4);
  stop.stop_strings = {"x"};
  EXPECT_EQ(engine->Submit(stop, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  Request top_p = MakeRequest(1, 4);
  top_p.sampling.top_p = 0.0f;
  EXPECT_EQ(engine->Submit(top_p, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine->Submit(MakeRequest(1, 5000), nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  // The largest max_tokens: prompt + max_tokens would overflow; refused, never admitted.
  const absl::Status huge = engine->Submit(MakeRequest(1, INT64_MAX), nullptr).status();
  EXPECT_EQ(huge.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(huge.message()).find("does not fit"), std::string::npos) << huge;
  // 64 full pages of 4 positions cannot hold 300 positions: refused for good, saying what fits.
  const absl::Status too_big = engine->Submit(MakeRequest(1, 300), nullptr).status();
  EXPECT_EQ(too_big.code(), absl::StatusCode::kInvalidArgument) << too_big;
  EXPECT_NE(std::string(too_big.message()).find("lower max_tokens to at most 250"),
            std::string::npos)
      << too_big;
  EXPECT_FALSE(engine->HasWork());
}

// Prompt and max_tokens together within max_position_embeddings (4096), as the coordinator
// and the OpenAI API count them; with max_tokens_up_to_context a larger max_tokens is lowered
// to the room left instead; a prompt that fills the context is refused either way.
TEST_F(EngineStopTest, ContextLimitCountsPromptAndMaxTokensAndCanGiveWay) {
  auto engine = MakeEngine({}, /*with_tokenizer=*/false);
  auto with_prompt = [&](int64_t length, int64_t max_tokens, bool up_to_context) {
    Request r = MakeRequest(1, max_tokens);
    r.prompt.assign(length, 400);
    r.prompt[0] = 2;
    r.max_tokens_up_to_context = up_to_context;
    return engine->Submit(r, nullptr).status();
  };
  // The KV pool (64 pages of 4, one of headroom: 252 positions) cannot hold such prompts, so
  // these stop at the context check or pass it and meet the pool's, each naming its limit.
  auto says = [](const absl::Status& status, const std::string& what) {
    return status.code() == absl::StatusCode::kInvalidArgument &&
           std::string(status.message()).find(what) != std::string::npos;
  };
  const absl::Status over = with_prompt(4090, 7, false);
  EXPECT_TRUE(says(over, "lower max_tokens to at most 6")) << over;
  const absl::Status pool = with_prompt(4090, 6, false);
  EXPECT_TRUE(says(pool, "cache holds at most 252")) << pool;
  EXPECT_TRUE(says(pool, "shorten the prompt")) << pool;
  const absl::Status pool_given_way = with_prompt(4090, 1024, true);
  EXPECT_TRUE(says(pool_given_way, "cache holds at most 252")) << pool_given_way;
  // A max_tokens that gives way gives way to the KV pool too, rather than being refused.
  EXPECT_TRUE(says(with_prompt(100, 1024, false), "lower max_tokens to at most 153"));
  EXPECT_TRUE(with_prompt(100, 1024, true).ok());
  const absl::Status full = with_prompt(4096, 1, true);
  EXPECT_EQ(full.code(), absl::StatusCode::kInvalidArgument) << full;
  EXPECT_NE(std::string(full.message()).find("leaves no room"), std::string::npos) << full;
}

TEST_F(EngineStopTest, CancelOfAWaitingRequestAnswersAtTheNextStep) {
  std::vector<int32_t> ids = Encode("Hello world, stop here please.");
  auto engine = MakeEngine({{1, ids}});
  Collector collector;
  auto id = engine->Submit(MakeRequest(1, 5), collector.For("a"));
  ASSERT_TRUE(id.ok());
  engine->Cancel(*id);
  auto stats = engine->Step();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->num_scheduled, 0);
  EXPECT_EQ(collector["a"].reason, FinishReason::kCancelled);
  EXPECT_TRUE(collector["a"].tokens.empty());
  EXPECT_FALSE(engine->HasWork());
  EXPECT_EQ(engine->counters().requests_cancelled, 1);
}

TEST_F(EngineStopTest, RunLoopServesRequestsSubmittedFromAnotherThread) {
  std::vector<int32_t> ids = Encode("Hello world, stop here please.");
  auto engine = MakeEngine({{1, ids}, {2, ids}});
  std::atomic<bool> stop{false};
  absl::Status run_status;
  std::thread loop([&] { run_status = engine->Run(&stop); });
  OutputQueue queue_a, queue_b;
  ASSERT_TRUE(engine->Submit(MakeRequest(1, 4), queue_a.AsCallback()).ok());
  ASSERT_TRUE(engine->Submit(MakeRequest(2, 6), queue_b.AsCallback()).ok());
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  auto drain = [&](OutputQueue& queue) {
    std::vector<int32_t> tokens;
    FinishReason reason = FinishReason::kNone;
    while (reason == FinishReason::kNone) {
      std::optional<RequestOutput> out = queue.PopUntil(deadline);
      if (!out.has_value()) break;
      tokens.insert(tokens.end(), out->token_ids.begin(), out->token_ids.end());
      if (out->finished) reason = out->finish_reason;
    }
    return std::make_pair(tokens, reason);
  };
  auto [a_tokens, a_reason] = drain(queue_a);
  auto [b_tokens, b_reason] = drain(queue_b);
  stop = true;
  loop.join();
  EXPECT_TRUE(run_status.ok()) << run_status;
  EXPECT_EQ(a_reason, FinishReason::kMaxTokens);
  EXPECT_EQ(a_tokens, std::vector<int32_t>(ids.begin(), ids.begin() + 4));
  EXPECT_EQ(b_reason, FinishReason::kMaxTokens);
  EXPECT_EQ(b_tokens, std::vector<int32_t>(ids.begin(), ids.begin() + 6));
}

}  // namespace
}  // namespace gemma::engine
