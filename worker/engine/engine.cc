#include "worker/engine/engine.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "glog/logging.h"

namespace gemma::engine {
namespace {

uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool Contains(const std::vector<int32_t>& ids, int32_t id) {
  return std::find(ids.begin(), ids.end(), id) != ids.end();
}

}  // namespace

const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone: return "none";
    case FinishReason::kEndId: return "end_id";
    case FinishReason::kStopToken: return "stop_token";
    case FinishReason::kStopString: return "stop_string";
    case FinishReason::kMaxTokens: return "max_tokens";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kError: return "error";
  }
  return "unknown";
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(gemma4::Model* model, KvCache* cache,
                                                       const EngineOptions& options) {
  if (model == nullptr) return absl::InvalidArgumentError("Engine::Create: no model");
  return Create(std::make_unique<SingleRankExecutor>(model), model->config(), cache, options);
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(std::unique_ptr<StepExecutor> executor,
                                                       const ModelConfig& config, KvCache* cache,
                                                       const EngineOptions& options) {
  if (executor == nullptr) return absl::InvalidArgumentError("Engine::Create: no executor");
  if (cache == nullptr) return absl::InvalidArgumentError("Engine::Create: no KV cache");
  const SchedulerOptions& s = options.scheduler;
  if (s.max_step_tokens < 1 || s.max_running < 1 || s.headroom_pages < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "scheduler options need max_step_tokens >= 1, max_running >= 1, headroom_pages >= 0; got ",
        s.max_step_tokens, ", ", s.max_running, ", ", s.headroom_pages));
  }
  // A decode needs the window's pages plus one in the sliding pool.
  const int64_t sliding_min =
      CeilDiv(std::max<int64_t>(1, cache->sliding_window()), cache->page_size()) + 1 +
      s.headroom_pages;
  if (cache->pool(kSlidingPool).num_pages() < sliding_min) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the sliding pool has ", cache->pool(kSlidingPool).num_pages(), " pages; one sequence needs ",
        sliding_min, " (window ", cache->sliding_window(), ", page size ", cache->page_size(),
        ", headroom ", s.headroom_pages, ")"));
  }
  return std::unique_ptr<Engine>(new Engine(std::move(executor), config, cache, options));
}

Engine::Engine(std::unique_ptr<StepExecutor> executor, const ModelConfig& config, KvCache* cache,
               const EngineOptions& options)
    : executor_(std::move(executor)),
      config_(config),
      cache_(cache),
      options_(options),
      scheduler_(cache, options.scheduler) {
  if (options_.end_ids.empty()) {
    for (int64_t id : config_.eos_token_ids) end_ids_.push_back(static_cast<int32_t>(id));
  } else {
    end_ids_ = options_.end_ids;
  }
  seed_state_ = options_.seed;
}

Engine::~Engine() = default;

absl::Status Engine::Validate(const Request& request) const {
  if (request.prompt.empty()) return absl::InvalidArgumentError("the prompt is empty");
  for (size_t i = 0; i < request.prompt.size(); ++i) {
    const int32_t id = request.prompt[i];
    if (id < 0 || id >= config_.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("prompt token ", i, " is ", id,
                                                     ", outside the vocabulary [0, ",
                                                     config_.vocab_size, ")"));
    }
  }
  if (request.max_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens must be >= 1, got ", request.max_tokens));
  }
  if (request.num_resumed < 0 ||
      request.num_resumed >= static_cast<int64_t>(request.prompt.size()) ||
      request.num_resumed >= request.max_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "num_resumed ", request.num_resumed, " must be >= 0, below the ", request.prompt.size(),
        " input ids and below max_tokens ", request.max_tokens));
  }
  const SamplingParams& sampling = request.sampling;
  if (!std::isfinite(sampling.temperature)) {
    return absl::InvalidArgumentError("temperature must be finite");
  }
  if (sampling.top_k < 0) {
    return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", sampling.top_k));
  }
  if (!(sampling.top_p > 0.0f && sampling.top_p <= 1.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_p must be in (0, 1], got ", sampling.top_p));
  }
  if (!request.stop_strings.empty() && options_.tokenizer == nullptr) {
    return absl::InvalidArgumentError("stop strings need an engine with a tokenizer");
  }
  // Prompt and generated tokens together within the model's positions, as the coordinator and
  // the OpenAI API count them (the last generated token is never fed, so the cache holds one
  // position fewer). Compared without forming the sum: max_tokens may be near INT64_MAX.
  const int64_t prompt_tokens = static_cast<int64_t>(request.prompt.size()) - request.num_resumed;
  const int64_t context = config_.max_position_embeddings;
  if (prompt_tokens >= context) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt of ", prompt_tokens, " tokens leaves no room to generate in the model's ",
        context, " positions; shorten the prompt to under ", context, " tokens"));
  }
  if (request.max_tokens > context - prompt_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt of ", prompt_tokens, " tokens plus max_tokens ", request.max_tokens,
        " does not fit the model's ", context, " positions; lower max_tokens to at most ",
        context - prompt_tokens, " or shorten the prompt"));
  }
  // More positions than the whole full-layer KV pool holds can never be served here: a
  // refusal that says what fits, not a "full, retry later".
  const int64_t positions = prompt_tokens + request.max_tokens - 1;
  const int64_t full_pages =
      CeilDiv(positions, cache_->page_size()) + options_.scheduler.headroom_pages;
  if (full_pages > cache_->pool(kFullPool).num_pages()) {
    const int64_t holds =
        (cache_->pool(kFullPool).num_pages() - options_.scheduler.headroom_pages) *
        cache_->page_size();
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt of ", prompt_tokens, " tokens plus max_tokens ", request.max_tokens,
        " needs ", positions, " KV-cache positions; this replica's cache holds at most ", holds,
        " for one request (the worker's --cache-tokens); ",
        holds - prompt_tokens + 1 > 0
            ? absl::StrCat("lower max_tokens to at most ", holds - prompt_tokens + 1,
                           " or shorten the prompt")
            : std::string("shorten the prompt")));
  }
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> Engine::Submit(Request request, OutputCallback callback) {
  if (request.max_tokens_up_to_context) {
    // What the model's context leaves, and what the full-layer KV pool can hold at all (the
    // cache holds prompt + max_tokens - 1 positions, past the scheduler's headroom).
    const int64_t prompt = static_cast<int64_t>(request.prompt.size()) - request.num_resumed;
    const int64_t pool_positions =
        (cache_->pool(kFullPool).num_pages() - options_.scheduler.headroom_pages) *
        cache_->page_size();
    // At least 1: a prompt that leaves no room is then refused for the prompt, not max_tokens.
    const int64_t room = std::max<int64_t>(
        1, std::min(config_.max_position_embeddings - prompt, pool_positions - prompt + 1));
    if (request.max_tokens > room) request.max_tokens = room;
  }
  RETURN_IF_ERROR(Validate(request));
  auto s = std::make_unique<Sequence>();
  s->tokens = request.prompt;
  s->num_prompt_tokens = static_cast<int64_t>(request.prompt.size()) - request.num_resumed;
  s->sampling = request.sampling;
  if (options_.tokenizer != nullptr) {
    s->decoder = std::make_unique<tokenizer::StreamDecoder>(
        options_.tokenizer,
        tokenizer::DecodeOptions{.skip_special_tokens = request.skip_special_tokens});
    if (!request.stop_strings.empty()) {
      s->matcher = std::make_unique<tokenizer::StopStringMatcher>(request.stop_strings);
    }
    // Bring the decoder and the matcher to where the failed replica left them: what they would
    // release now was delivered there; what they hold back was not.
    for (int64_t i = s->num_prompt_tokens; i < static_cast<int64_t>(s->tokens.size()); ++i) {
      std::string piece = s->decoder->Push(s->tokens[i]);
      if (s->matcher != nullptr) s->matcher->Push(piece);
    }
  }
  s->callback = std::move(callback);
  s->request = std::move(request);
  absl::MutexLock lock(&mutex_);
  s->id = next_id_++;
  s->arrival = s->id;
  if (!s->sampling.seed.has_value()) s->sampling.seed = SplitMix64(&seed_state_);
  VLOG(1) << "request " << s->id << " (" << s->request.client_id << "): submitted, "
          << s->num_prompt_tokens << " prompt tokens, max_tokens " << s->request.max_tokens;
  const uint64_t id = s->id;
  incoming_.push_back(std::move(s));
  ++num_live_;
  ++counters_.requests_submitted;
  return id;
}

void Engine::Cancel(uint64_t request_id) {
  absl::MutexLock lock(&mutex_);
  cancels_.push_back(request_id);
}

bool Engine::HasWork() const {
  absl::MutexLock lock(&mutex_);
  return num_live_ > 0;
}

EngineCounters Engine::counters() const {
  absl::MutexLock lock(&mutex_);
  return counters_;
}

bool Engine::OnToken(Sequence& s, int32_t token, RequestOutput* output) {
  s.tokens.push_back(token);
  output->request_id = s.id;
  output->token_ids.push_back(token);
  output->num_generated = s.num_generated();
  FinishReason reason = FinishReason::kNone;
  if (!s.request.ignore_end_ids && Contains(end_ids_, token)) {
    reason = FinishReason::kEndId;
  } else if (Contains(s.request.stop_token_ids, token)) {
    reason = FinishReason::kStopToken;
  } else if (s.decoder != nullptr) {
    std::string piece = s.decoder->Push(token);
    if (s.matcher != nullptr) {
      tokenizer::StopStringMatcher::Result r = s.matcher->Push(piece);
      output->text += r.release;
      if (r.stopped) reason = FinishReason::kStopString;
    } else {
      output->text += piece;
    }
  }
  if (reason == FinishReason::kNone && s.num_generated() >= s.request.max_tokens) {
    reason = FinishReason::kMaxTokens;
  }
  if (reason == FinishReason::kNone) return false;
  Finish(s, reason, output);
  return true;
}

void Engine::Finish(Sequence& s, FinishReason reason, RequestOutput* output) {
  output->request_id = s.id;
  output->num_generated = s.num_generated();
  if (s.decoder != nullptr && reason != FinishReason::kStopString) {
    std::string tail = s.decoder->Finish();
    if (s.matcher != nullptr) {
      tokenizer::StopStringMatcher::Result r = s.matcher->Push(tail);
      output->text += r.release;
      if (r.stopped) {
        reason = FinishReason::kStopString;
      } else {
        output->text += s.matcher->Flush();
      }
    } else {
      output->text += tail;
    }
  }
  output->finished = true;
  output->finish_reason = reason;
  VLOG(1) << "request " << s.id << " (" << s.request.client_id << "): finished ("
          << FinishReasonName(reason) << ") after " << s.num_generated() << " tokens, "
          << s.num_preemptions << " preemptions";
}

void Engine::Deliver(std::vector<Event>* events) {
  for (Event& event : *events) {
    if (event.callback) event.callback(event.output);
  }
  events->clear();
}

absl::StatusOr<StepStats> Engine::Step() {
  std::vector<Event> events;
  std::vector<std::unique_ptr<Sequence>> incoming;
  std::vector<uint64_t> cancels;
  {
    absl::MutexLock lock(&mutex_);
    incoming.swap(incoming_);
    cancels.swap(cancels_);
  }
  for (auto& s : incoming) scheduler_.Add(std::move(s));
  int64_t num_finished = 0;
  int64_t num_cancelled = 0;
  for (uint64_t id : cancels) {
    Sequence* s = scheduler_.Find(id);
    if (s == nullptr) continue;
    Event event{s->callback, {}};
    Finish(*s, FinishReason::kCancelled, &event.output);
    events.push_back(std::move(event));
    scheduler_.Remove(id);
    released_.push_back(id);
    ++num_finished;
    ++num_cancelled;
  }

  Schedule schedule = scheduler_.Plan();
  released_.insert(released_.end(), schedule.preempted.begin(), schedule.preempted.end());
  for (uint64_t id : schedule.preempted) {
    LOG(INFO) << "request " << id << ": preempted (KV pages ran out), will be recomputed";
  }

  StepStats stats;
  absl::Status step_status;
  if (!schedule.chunks.empty()) {
    stats.step = ++step_number_;
    StepBatch batch;
    batch.step_number = stats.step;
    batch.released = std::move(released_);
    released_.clear();
    for (const ScheduledChunk& chunk : schedule.chunks) {
      Sequence& s = *chunk.sequence;
      StepEntry entry;
      entry.sequence_id = s.id;
      entry.tokens = std::span<const int32_t>(s.tokens).subspan(s.kv.length, chunk.num_tokens);
      entry.kv = &s.kv;
      entry.sample = chunk.samples;
      entry.sampling = s.sampling;
      entry.sampling.position = s.kv.length + chunk.num_tokens;
      batch.entries.push_back(entry);
      stats.tokens_recomputed += std::clamp<int64_t>(s.positions_computed - s.kv.length, 0,
                                                     chunk.num_tokens);
      s.positions_computed =
          std::max(s.positions_computed, s.kv.length + chunk.num_tokens);
    }
    absl::StatusOr<std::vector<int32_t>> sampled = executor_->Execute(batch, *cache_);
    if (sampled.ok()) {
      int64_t rows = 0;
      for (const ScheduledChunk& chunk : schedule.chunks) rows += chunk.samples ? 1 : 0;
      if (static_cast<int64_t>(sampled->size()) != rows) {
        sampled = absl::InternalError(absl::StrCat("the step executor returned ", sampled->size(),
                                                   " tokens for ", rows, " sampling rows"));
      }
    }
    if (!sampled.ok()) {
      step_status = sampled.status();
      LOG(ERROR) << "step " << stats.step << " failed, failing its " << schedule.chunks.size()
                 << " requests: " << step_status;
      for (const ScheduledChunk& chunk : schedule.chunks) {
        const uint64_t id = chunk.sequence->id;
        Event event{chunk.sequence->callback, {}};
        event.output.status = step_status;
        Finish(*chunk.sequence, FinishReason::kError, &event.output);
        events.push_back(std::move(event));
        scheduler_.Remove(id);
        released_.push_back(id);
        ++num_finished;
      }
    } else {
      scheduler_.AfterStep(schedule);
      size_t row = 0;
      for (const ScheduledChunk& chunk : schedule.chunks) {
        if (!chunk.samples) continue;
        Sequence& s = *chunk.sequence;
        Event event{s.callback, {}};
        const bool finished = OnToken(s, (*sampled)[row++], &event.output);
        events.push_back(std::move(event));
        if (finished) {
          const uint64_t id = s.id;
          scheduler_.Remove(id);
          released_.push_back(id);
          ++num_finished;
        }
      }
    }
  }

  stats.num_running = static_cast<int64_t>(scheduler_.running().size());
  stats.num_waiting = static_cast<int64_t>(scheduler_.waiting().size());
  stats.num_scheduled = static_cast<int64_t>(schedule.chunks.size());
  stats.num_preempted = static_cast<int64_t>(schedule.preempted.size());
  stats.tokens_prefilled = schedule.num_prefill_tokens;
  stats.tokens_decoded = schedule.num_decode_tokens;
  stats.num_finished = num_finished;
  for (int pool = 0; pool < 2; ++pool) {
    stats.pages_used[pool] = cache_->pool(pool).num_used();
    stats.pages_total[pool] = cache_->pool(pool).num_pages();
  }
  {
    absl::MutexLock lock(&mutex_);
    num_live_ -= num_finished;
    if (stats.step != 0) ++counters_.steps;
    counters_.preemptions += stats.num_preempted;
    counters_.tokens_prefilled += stats.tokens_prefilled;
    counters_.tokens_decoded += stats.tokens_decoded;
    counters_.tokens_recomputed += stats.tokens_recomputed;
    counters_.requests_finished += num_finished;
    counters_.requests_cancelled += num_cancelled;
  }
  // Also after a step that only cancelled, so observers see the freed pages.
  if ((stats.step != 0 || num_finished > 0) && step_observer_) step_observer_(stats);
  Deliver(&events);
  if (!step_status.ok()) return step_status;
  return stats;
}

absl::Status Engine::RunUntilIdle() {
  int idle_steps = 0;
  while (HasWork()) {
    ASSIGN_OR_RETURN(StepStats stats, Step());
    if (stats.num_scheduled > 0 || stats.num_finished > 0) {
      idle_steps = 0;
    } else if (++idle_steps > 1) {
      return absl::InternalError(absl::StrCat(
          "the engine has ", stats.num_waiting, " waiting requests but cannot schedule any"));
    }
  }
  return absl::OkStatus();
}

bool Engine::WaitForWork(absl::Duration timeout) {
  absl::MutexLock lock(&mutex_);
  auto ready = [this]() ABSL_SHARED_LOCKS_REQUIRED(mutex_) {
    return num_live_ > 0 || !cancels_.empty();
  };
  return mutex_.AwaitWithTimeout(absl::Condition(&ready), timeout);
}

absl::Status Engine::Run(const std::atomic<bool>* stop) {
  while (!stop->load()) {
    if (WaitForWork(absl::Milliseconds(20))) RETURN_IF_ERROR(Step().status());
  }
  return absl::OkStatus();
}

std::vector<SequenceView> Engine::Sequences() const {
  std::vector<SequenceView> views;
  auto add = [&](const Sequence* s) {
    SequenceView v;
    v.id = s->id;
    v.state = s->state;
    v.cached_positions = s->kv.length;
    v.num_generated = s->num_generated();
    for (int pool = 0; pool < 2; ++pool) {
      for (int32_t page : s->kv.page_tables[pool]) v.pages_held[pool] += page >= 0 ? 1 : 0;
    }
    v.sliding_positions_held = cache_->SlidingPositionsHeld(s->kv);
    v.sliding_positions_peak = s->sliding_positions_peak;
    v.last_chunk = s->last_chunk;
    v.num_preemptions = s->num_preemptions;
    views.push_back(v);
  };
  for (const Sequence* s : scheduler_.running()) add(s);
  for (const Sequence* s : scheduler_.waiting()) add(s);
  return views;
}

OutputCallback OutputQueue::AsCallback() {
  return [this](const RequestOutput& output) { Push(output); };
}

void OutputQueue::Push(const RequestOutput& output) {
  absl::MutexLock lock(&mutex_);
  events_.push_back(output);
}

std::optional<RequestOutput> OutputQueue::PopUntil(absl::Time deadline) {
  absl::MutexLock lock(&mutex_);
  auto nonempty = [this]() ABSL_SHARED_LOCKS_REQUIRED(mutex_) { return !events_.empty(); };
  mutex_.AwaitWithDeadline(absl::Condition(&nonempty), deadline);
  if (events_.empty()) return std::nullopt;
  RequestOutput output = std::move(events_.front());
  events_.pop_front();
  return output;
}

std::optional<RequestOutput> OutputQueue::TryPop() {
  return PopUntil(absl::InfinitePast());
}

}  // namespace gemma::engine
