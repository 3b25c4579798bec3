// The engine loop's scheduler: waiting queue and running set, per-step chunks under a token
// budget, admission by free KV pages, preemption of the youngest sequence when pages run out.
// Owns no model and no threads; grows and releases pages in the KvCache it is given.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "common/tokenizer/stop_matcher.h"
#include "common/tokenizer/stream_decoder.h"
#include "worker/backend/backend.h"
#include "worker/model/gemma4/kv_cache.h"
#include "worker/engine/request.h"

namespace gemma::engine {

enum class SequenceState : uint8_t { kWaiting, kRunning };

// One request inside the engine. tokens = prompt then generated ids; the positions
// [kv.length, tokens.size()) still have to be fed (one for a decode, more for a prefill or for
// the recomputation that follows a preemption).
struct Sequence {
  uint64_t id = 0;
  uint64_t arrival = 0;  // submission order; preempted sequences keep theirs
  Request request;
  SamplingParams sampling;  // resolved seed; position is set per step
  OutputCallback callback;
  std::vector<int32_t> tokens;
  int64_t num_prompt_tokens = 0;
  SequenceKv kv;
  SequenceState state = SequenceState::kWaiting;
  int64_t num_preemptions = 0;
  // Text streaming (engines with a tokenizer only).
  std::unique_ptr<tokenizer::StreamDecoder> decoder;
  std::unique_ptr<tokenizer::StopStringMatcher> matcher;
  // Of the latest step that scheduled it: tokens fed, and the sliding positions held once its
  // pages were grown for them (the most the sliding pool held for it during that step).
  int64_t last_chunk = 0;
  int64_t sliding_positions_peak = 0;
  // The most positions it ever had computed (kv.length's high-water mark): after a preemption,
  // positions below it are fed again (recomputed).
  int64_t positions_computed = 0;
  // num_generated() when it was last preempted (-1: never): until it generates more, it is
  // not chosen as a victim again if another can be.
  int64_t generated_at_preemption = -1;

  int64_t num_generated() const {
    return static_cast<int64_t>(tokens.size()) - num_prompt_tokens;
  }
  int64_t num_pending() const { return static_cast<int64_t>(tokens.size()) - kv.length; }
};

// How a waiting sequence is admitted.
enum class Admission : uint8_t {
  // By what it will need: its prompt plus max_tokens must fit in the free pages of each pool
  // less what the running sequences may still grow into (their own prompt plus max_tokens; on
  // the sliding pool at most a window and a step's chunk). Running sequences then never run out
  // of pages, so nothing is preempted; a request that stops early frees its reservation.
  kReserve,
  // By its first chunk only (more running at once, more preemptions when they all grow).
  kFirstChunk,
};

struct SchedulerOptions {
  int64_t max_step_tokens = 512;  // tokens fed per step, decodes and prefill chunks together
  int64_t max_running = 256;      // sequences in the running set
  int64_t headroom_pages = 1;     // free pages per pool left after admitting a first chunk
  Admission admission = Admission::kReserve;
  // kFirstChunk: when the head of the waiting queue does not fit, sequences behind it that fit
  // are admitted for at most this many steps; then nothing jumps the head until it is admitted.
  // (kReserve backfills instead: see Scheduler::Plan.)
  int64_t head_bypass_steps = 64;
};

// A sequence's work in the step being planned.
struct ScheduledChunk {
  Sequence* sequence = nullptr;
  int64_t num_tokens = 0;
  bool is_decode = false;  // one pending token of an already running decode
  bool samples = false;    // the chunk reaches the last known token: its logits give a new one
};

struct Schedule {
  std::vector<ScheduledChunk> chunks;
  std::vector<uint64_t> preempted;  // sequences preempted while planning this step
  int64_t num_decode_tokens = 0;
  int64_t num_prefill_tokens = 0;
};

// Not thread-safe: the engine calls it from its stepping thread.
class Scheduler {
 public:
  Scheduler(KvCache* cache, const SchedulerOptions& options);
  ~Scheduler();

  // Queues a new sequence (state kWaiting, no pages).
  void Add(std::unique_ptr<Sequence> sequence);
  // Takes a sequence out of the scheduler, its pages released; nullptr if unknown.
  std::unique_ptr<Sequence> Remove(uint64_t id);
  Sequence* Find(uint64_t id);

  // Plans one step: running sequences oldest first (decodes always, prefill chunks within the
  // budget left after the decodes), then admissions from the waiting queue while the budget
  // and free pages allow. kReserve backfills: when the head of the queue does not fit, it is
  // given the earliest step at which it will (its shadow: running sequences end at the latest
  // after their max_tokens), and a sequence behind it is admitted only if it fits now and
  // either ends by that step or fits in what the head leaves free then; so short requests keep
  // flowing while a long one waits, and the head is never delayed by them. Pages are grown for every chunk; when a running sequence cannot get
  // a page, the youngest running sequence is preempted (pages released, back to the waiting
  // queue for recomputation), possibly itself.
  Schedule Plan();
  // After the step ran: returns the sliding pages no future query of each chunk's sequence sees.
  void AfterStep(const Schedule& schedule);

  const std::vector<Sequence*>& running() const { return running_; }
  const std::vector<Sequence*>& waiting() const { return waiting_; }
  int64_t total_preemptions() const { return total_preemptions_; }
  const SchedulerOptions& options() const { return options_; }

 private:
  // Largest n <= want whose pages fit in the free pages of both pools, less `headroom` each.
  int64_t FitTokens(const Sequence& sequence, int64_t want, int64_t headroom) const;
  // kReserve: the pages of `pool` the sequence may still need until it ends.
  int64_t PagesStillNeeded(const Sequence& sequence, int pool) const;
  // kReserve: whether the sequence's whole need fits beside the running sequences' reservations.
  bool NeedFits(const Sequence& sequence) const;
  // Pages of `pool` the sequence holds now.
  static int64_t HeldPages(const Sequence& sequence, int pool);
  // Steps until the sequence ends at the latest (it generates max_tokens).
  int64_t StepsLeft(const Sequence& sequence) const;
  // kReserve backfilling: for a waiting head that does not fit, the steps until it fits at the
  // latest and the pages of each pool it leaves free then. False when it would not fit even
  // with every running sequence ended.
  struct Shadow {
    int64_t steps = 0;
    int64_t spare[2] = {0, 0};
  };
  bool HeadShadow(const Sequence& head, Shadow* shadow) const;
  // The running sequence to preempt, from running_[first..]: the youngest that has made
  // progress since it was last preempted (none has: the youngest), so that no sequence is
  // preempted over and over while others advance.
  Sequence* PickVictim(size_t first) const;
  void Preempt(Sequence* sequence, Schedule* schedule);
  // Inserts by (priority desc, arrival asc).
  static void InsertOrdered(std::vector<Sequence*>* queue, Sequence* sequence);
  static void Erase(std::vector<Sequence*>* queue, Sequence* sequence);

  KvCache* cache_;
  SchedulerOptions options_;
  absl::flat_hash_map<uint64_t, std::unique_ptr<Sequence>> sequences_;
  std::vector<Sequence*> running_;
  std::vector<Sequence*> waiting_;
  int64_t total_preemptions_ = 0;
  int64_t step_ = 0;
  // The waiting head that did not fit, and the step it first did not.
  uint64_t blocked_head_ = 0;
  int64_t blocked_since_ = 0;
};

}  // namespace gemma::engine
