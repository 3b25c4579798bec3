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

void Scheduler::Preempt(Sequence* sequence, Schedule* schedule) {
  VLOG(1) << "request " << sequence->id << ": preempted at " << sequence->kv.length
          << " cached positions (" << sequence->num_generated() << " generated)";
  Erase(&running_, sequence);
  cache_->Release(sequence->kv);
  sequence->state = SequenceState::kWaiting;
  ++sequence->num_preemptions;
  ++total_preemptions_;
  schedule->preempted.push_back(sequence->id);
  InsertOrdered(&waiting_, sequence);
}

Schedule Scheduler::Plan() {
  Schedule schedule;
  int64_t num_decodes = 0;
  for (const Sequence* s : running_) num_decodes += s->num_pending() == 1 ? 1 : 0;
  int64_t prefill_budget = std::max<int64_t>(0, options_.max_step_tokens - num_decodes);

  // Running sequences, oldest first. A victim is always the youngest, so never one already
  // planned in this step (or the current one itself).
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
      Sequence* victim = running_.back();
      Preempt(victim, &schedule);
      continue;  // retry s (or, if s was the victim, the loop ends at the shorter set)
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

  // Admissions: the head of the queue first; if it does not fit, nothing behind it jumps it.
  while (!waiting_.empty() && prefill_budget > 0 &&
         static_cast<int64_t>(running_.size()) < options_.max_running) {
    Sequence* s = waiting_.front();
    if (std::find(schedule.preempted.begin(), schedule.preempted.end(), s->id) !=
        schedule.preempted.end()) {
      break;
    }
    const int64_t n = FitTokens(*s, std::min(s->num_pending(), prefill_budget),
                                options_.headroom_pages);
    if (n == 0) break;
    waiting_.erase(waiting_.begin());
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
