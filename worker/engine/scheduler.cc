#include "worker/engine/scheduler.h"

#include <algorithm>

#include "glog/logging.h"

namespace gemma::engine {
namespace {

// True when `a` is scheduled before `b`: higher priority, then earlier arrival.
bool Before(const Sequence* a, const Sequence* b) {
  if (a->request.priority != b->request.priority) {
    return a->request.priority > b->request.priority;
  }
  return a->arrival < b->arrival;
}

}  // namespace

Scheduler::Scheduler(KvCache* cache, const SchedulerOptions& options)
    : cache_(cache), options_(options) {}

Scheduler::~Scheduler() {
  for (auto& [id, sequence] : sequences_) cache_->Release(sequence->kv);
}

void Scheduler::Add(std::unique_ptr<Sequence> sequence) {
  sequence->state = SequenceState::kWaiting;
  Sequence* raw = sequence.get();
  sequences_[raw->id] = std::move(sequence);
  InsertOrdered(&waiting_, raw);
}

std::unique_ptr<Sequence> Scheduler::Remove(uint64_t id) {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) return nullptr;
  std::unique_ptr<Sequence> sequence = std::move(it->second);
  sequences_.erase(it);
  Erase(sequence->state == SequenceState::kRunning ? &running_ : &waiting_, sequence.get());
  cache_->Release(sequence->kv);
  return sequence;
}

Sequence* Scheduler::Find(uint64_t id) {
  auto it = sequences_.find(id);
  return it == sequences_.end() ? nullptr : it->second.get();
}

int64_t Scheduler::FitTokens(const Sequence& sequence, int64_t want, int64_t headroom) const {
  const SequenceKv& kv = sequence.kv;
  auto fits = [&](int64_t n) {
    for (int pool = 0; pool < 2; ++pool) {
      if (cache_->PagesNeeded(kv, kv.length + n, pool) + headroom > cache_->pool(pool).num_free()) {
        return false;
      }
    }
    return true;
  };
  if (want <= 0) return 0;
  if (fits(want)) return want;
  // Pages needed grow with n: binary search for the largest n that fits.
  int64_t lo = 0, hi = want;  // fits(lo) (or lo == 0), !fits(hi)
  while (hi - lo > 1) {
    int64_t mid = lo + (hi - lo) / 2;
    if (fits(mid)) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

int64_t Scheduler::PagesStillNeeded(const Sequence& s, int pool) const {
  // Its last position: the prompt plus everything it may generate (max_tokens counts the
  // resumed ids, which num_prompt_tokens leaves out).
  const int64_t final_length = s.num_prompt_tokens + std::max<int64_t>(1, s.request.max_tokens);
  if (pool == kFullPool) return cache_->PagesNeeded(s.kv, final_length, pool);
  // Sliding layers hold at most a window and a step's chunk (plus page rounding) at a time.
  const int64_t page = cache_->page_size();
  const int64_t cap = std::min<int64_t>(
      (final_length + page - 1) / page,
      (cache_->sliding_window() - 1 + options_.max_step_tokens + page - 1) / page + 1);
  return std::max<int64_t>(0, cap - HeldPages(s, pool));
}

bool Scheduler::NeedFits(const Sequence& s) const {
  for (int pool = 0; pool < 2; ++pool) {
    int64_t reserved = 0;
    for (const Sequence* r : running_) reserved += PagesStillNeeded(*r, pool);
    if (PagesStillNeeded(s, pool) + reserved + options_.headroom_pages >
        cache_->pool(pool).num_free()) {
      return false;
    }
  }
  return true;
}

int64_t Scheduler::HeldPages(const Sequence& s, int pool) {
  int64_t held = 0;
  for (int32_t p : s.kv.page_tables[pool]) held += p >= 0 ? 1 : 0;
  return held;
}

int64_t Scheduler::StepsLeft(const Sequence& s) const {
  const int64_t final_length = s.num_prompt_tokens + std::max<int64_t>(1, s.request.max_tokens);
  // One step per token still to generate, plus the prefill chunks still to feed.
  const int64_t to_generate =
      std::max<int64_t>(0, final_length - static_cast<int64_t>(s.tokens.size()));
  const int64_t to_prefill = std::max<int64_t>(0, s.num_pending() - 1);
  return std::max<int64_t>(1, to_generate + (to_prefill + options_.max_step_tokens - 1) /
                                                options_.max_step_tokens);
}

bool Scheduler::HeadShadow(const Sequence& head, Shadow* shadow) const {
  // What admission would have left in each pool after the head's need, now. A running sequence
  // that ends gives back everything it holds then: its pages now plus its reservation.
  int64_t spare[2];
  for (int pool = 0; pool < 2; ++pool) {
    spare[pool] = cache_->pool(pool).num_free() - options_.headroom_pages -
                  PagesStillNeeded(head, pool);
    for (const Sequence* r : running_) spare[pool] -= PagesStillNeeded(*r, pool);
  }
  std::vector<const Sequence*> by_end(running_.begin(), running_.end());
  std::sort(by_end.begin(), by_end.end(), [this](const Sequence* a, const Sequence* b) {
    return StepsLeft(*a) < StepsLeft(*b);
  });
  int64_t steps = 0;
  size_t next = 0;
  while (spare[0] < 0 || spare[1] < 0) {
    if (next == by_end.size()) return false;
    const Sequence* r = by_end[next++];
    steps = StepsLeft(*r);
    for (int pool = 0; pool < 2; ++pool) {
      spare[pool] += HeldPages(*r, pool) + PagesStillNeeded(*r, pool);
    }
  }
  shadow->steps = steps;
  shadow->spare[0] = spare[0];
  shadow->spare[1] = spare[1];
  return true;
}

Sequence* Scheduler::PickVictim(size_t first) const {
  for (size_t j = running_.size(); j-- > first;) {
    const Sequence* s = running_[j];
    if (s->generated_at_preemption < 0 || s->num_generated() > s->generated_at_preemption) {
      return running_[j];
    }
  }
  return running_.back();
}

void Scheduler::Preempt(Sequence* sequence, Schedule* schedule) {
  VLOG(1) << "request " << sequence->id << ": preempted at " << sequence->kv.length
          << " cached positions (" << sequence->num_generated() << " generated)";
  Erase(&running_, sequence);
  cache_->Release(sequence->kv);
  sequence->state = SequenceState::kWaiting;
  ++sequence->num_preemptions;
  sequence->generated_at_preemption = sequence->num_generated();
  ++total_preemptions_;
  schedule->preempted.push_back(sequence->id);
  InsertOrdered(&waiting_, sequence);
}

Schedule Scheduler::Plan() {
  Schedule schedule;
  ++step_;
  int64_t num_decodes = 0;
  for (const Sequence* s : running_) num_decodes += s->num_pending() == 1 ? 1 : 0;
  int64_t prefill_budget = std::max<int64_t>(0, options_.max_step_tokens - num_decodes);

  // Running sequences, oldest first. A victim comes from those not planned yet in this step
  // (the current one or younger).
  size_t i = 0;
  while (i < running_.size()) {
    Sequence* s = running_[i];
    const bool is_decode = s->num_pending() == 1;
    const int64_t want = is_decode ? 1 : std::min(s->num_pending(), prefill_budget);
    if (want == 0) {
      ++i;
      continue;
    }
    const int64_t n = FitTokens(*s, want, /*headroom=*/0);
    if (n == 0) {
      // Never one planned already in this step (before i): s itself or one after it.
      Preempt(PickVictim(i), &schedule);
      continue;  // retry s (or, if s was the victim, the sequence now at i)
    }
    CHECK(cache_->Grow(s->kv, s->kv.length + n).ok()) << "request " << s->id;
    schedule.chunks.push_back({s, n, is_decode, n == s->num_pending()});
    if (is_decode) {
      ++schedule.num_decode_tokens;
    } else {
      prefill_budget -= n;
      schedule.num_prefill_tokens += n;
    }
    ++i;
  }

  // Admissions in queue order. kReserve admits a sequence only when all it will need fits
  // beside the running ones' reservations; kFirstChunk when its first chunk fits. A head that
  // does not fit may be passed by later sequences that do: under kReserve only by those that
  // end before the head's shadow step or fit in what the head leaves spare then (backfilling,
  // which never delays the head); under kFirstChunk for head_bypass_steps steps.
  const bool reserve = options_.admission == Admission::kReserve;
  bool head = true;
  bool backfilling = false;  // kReserve: the head is blocked and `shadow` holds its shadow
  Shadow shadow;
  for (size_t w = 0; w < waiting_.size() && prefill_budget > 0 &&
                     static_cast<int64_t>(running_.size()) < options_.max_running;) {
    Sequence* s = waiting_[w];
    const bool just_preempted = std::find(schedule.preempted.begin(), schedule.preempted.end(),
                                          s->id) != schedule.preempted.end();
    int64_t n = 0;
    bool uses_spare = false;
    if (!just_preempted && (!reserve || NeedFits(*s))) {
      if (backfilling && StepsLeft(*s) > shadow.steps) {
        // It would still hold pages when the head is due: only from what the head leaves.
        uses_spare = PagesStillNeeded(*s, 0) <= shadow.spare[0] &&
                     PagesStillNeeded(*s, 1) <= shadow.spare[1];
        if (uses_spare) {
          n = FitTokens(*s, std::min(s->num_pending(), prefill_budget), options_.headroom_pages);
        }
      } else {
        n = FitTokens(*s, std::min(s->num_pending(), prefill_budget), options_.headroom_pages);
      }
    }
    if (n == 0) {
      if (head) {
        if (blocked_head_ != s->id) {
          blocked_head_ = s->id;
          blocked_since_ = step_;
        }
        if (reserve) {
          // A head that cannot fit even once all running ones end is passed freely (it waits
          // for nothing that admitting others would delay).
          backfilling = !just_preempted && HeadShadow(*s, &shadow);
        } else if (step_ - blocked_since_ >= options_.head_bypass_steps) {
          // Past its bypass steps the head keeps its place: nothing behind it goes first.
          break;
        }
      }
      head = false;
      ++w;
      continue;
    }
    if (uses_spare) {
      shadow.spare[0] -= PagesStillNeeded(*s, 0);
      shadow.spare[1] -= PagesStillNeeded(*s, 1);
    }
    waiting_.erase(waiting_.begin() + static_cast<std::ptrdiff_t>(w));
    if (s->id == blocked_head_) blocked_head_ = 0;
    s->state = SequenceState::kRunning;
    InsertOrdered(&running_, s);
    CHECK(cache_->Grow(s->kv, s->kv.length + n).ok()) << "request " << s->id;
    schedule.chunks.push_back({s, n, false, n == s->num_pending()});
    prefill_budget -= n;
    schedule.num_prefill_tokens += n;
  }

  for (ScheduledChunk& chunk : schedule.chunks) {
    chunk.sequence->last_chunk = chunk.num_tokens;
    chunk.sequence->sliding_positions_peak = cache_->SlidingPositionsHeld(chunk.sequence->kv);
  }
  return schedule;
}

void Scheduler::AfterStep(const Schedule& schedule) {
  for (const ScheduledChunk& chunk : schedule.chunks) cache_->TrimSliding(chunk.sequence->kv);
}

void Scheduler::InsertOrdered(std::vector<Sequence*>* queue, Sequence* sequence) {
  auto it = std::upper_bound(queue->begin(), queue->end(), sequence, Before);
  queue->insert(it, sequence);
}

void Scheduler::Erase(std::vector<Sequence*>* queue, Sequence* sequence) {
  auto it = std::find(queue->begin(), queue->end(), sequence);
  CHECK(it != queue->end()) << "request " << sequence->id << " is not in its queue";
  queue->erase(it);
}

}  // namespace gemma::engine
