#include "worker/parallel/step_plan.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/fnv.h"
#include "common/status_macros.h"
#include "glog/logging.h"

namespace gemma::parallel {
namespace {

class Writer {
 public:
  void U32(uint32_t v) { Raw(&v, sizeof(v)); }
  void U64(uint64_t v) { Raw(&v, sizeof(v)); }
  void I32(int32_t v) { Raw(&v, sizeof(v)); }
  void F32(float v) { Raw(&v, sizeof(v)); }
  void I32s(const std::vector<int32_t>& v) {
    U32(static_cast<uint32_t>(v.size()));
    for (int32_t x : v) I32(x);
  }
  void Bytes(const std::string& v) {
    U32(static_cast<uint32_t>(v.size()));
    Raw(v.data(), v.size());
  }
  std::string Take() { return std::move(out_); }

 private:
  // The build targets little-endian hosts (x86-64, aarch64), so native order is the wire order.
  void Raw(const void* p, size_t n) { out_.append(static_cast<const char*>(p), n); }
  std::string out_;
};

class Reader {
 public:
  explicit Reader(absl::string_view data) : data_(data) {}
  bool U32(uint32_t* v) { return Raw(v, sizeof(*v)); }
  bool U64(uint64_t* v) { return Raw(v, sizeof(*v)); }
  bool I32(int32_t* v) { return Raw(v, sizeof(*v)); }
  bool F32(float* v) { return Raw(v, sizeof(*v)); }
  // A count of elements of `elem_size` bytes, checked against what is left.
  bool Count(size_t elem_size, uint32_t* n) {
    return U32(n) && static_cast<uint64_t>(*n) * elem_size <= data_.size();
  }
  bool I32s(std::vector<int32_t>* v) {
    uint32_t n;
    if (!Count(4, &n)) return false;
    v->resize(n);
    for (int32_t& x : *v) I32(&x);
    return true;
  }
  bool Bytes(std::string* v) {
    uint32_t n;
    if (!Count(1, &n)) return false;
    v->assign(data_.data(), n);
    data_.remove_prefix(n);
    return true;
  }
  bool done() const { return data_.empty(); }

 private:
  bool Raw(void* p, size_t n) {
    if (data_.size() < n) return false;
    std::memcpy(p, data_.data(), n);
    data_.remove_prefix(n);
    return true;
  }
  absl::string_view data_;
};

constexpr uint32_t kStepPlanFormat = 4;

void WriteSampling(Writer& w, const SamplingParams& s) {
  w.F32(s.temperature);
  w.I32(s.top_k);
  w.F32(s.top_p);
  w.U32(s.seed.has_value() ? 1 : 0);
  w.U64(s.seed.value_or(0));
  w.U64(s.request_key);
  w.U64(static_cast<uint64_t>(s.position));
}

bool ReadSampling(Reader& r, SamplingParams* s) {
  uint32_t has_seed;
  uint64_t seed, position;
  if (!(r.F32(&s->temperature) && r.I32(&s->top_k) && r.F32(&s->top_p) && r.U32(&has_seed) &&
        r.U64(&seed) && r.U64(&s->request_key) && r.U64(&position))) {
    return false;
  }
  s->seed.reset();
  if (has_seed != 0) s->seed = seed;
  s->position = static_cast<int64_t>(position);
  return true;
}

absl::Status Malformed(absl::string_view what) {
  return absl::DataLossError(absl::StrCat("malformed step plan: ", what));
}

}  // namespace

std::string SerializeStepPlan(const StepPlan& plan) {
  Writer w;
  w.U32(kStepPlanFormat);
  w.U64(plan.sequence_number);
  w.U64(plan.placement_epoch);
  w.U32(static_cast<uint32_t>(plan.finished.size()));
  for (uint64_t id : plan.finished) w.U64(id);
  w.U32(static_cast<uint32_t>(plan.entries.size()));
  for (const StepEntry& e : plan.entries) {
    w.U64(e.sequence_id);
    w.I32(e.num_new_tokens);
    w.I32(e.start_position);
    w.I32s(e.token_ids);
    w.U32((e.sample ? 1u : 0u) | (e.all_logits ? 2u : 0u));
    WriteSampling(w, e.sampling);
  }
  w.U32((plan.stop ? 1u : 0u) | (plan.vote_placement ? 2u : 0u));
  w.Bytes(plan.offered_placement);
  return w.Take();
}

absl::StatusOr<StepPlan> ParseStepPlan(absl::string_view bytes) {
  Reader r(bytes);
  StepPlan plan;
  uint32_t format;
  if (!r.U32(&format)) return Malformed("truncated header");
  if (format != kStepPlanFormat) {
    return Malformed(absl::StrCat("unknown format ", format));
  }
  if (!r.U64(&plan.sequence_number) || !r.U64(&plan.placement_epoch)) {
    return Malformed("truncated header");
  }
  uint32_t num_finished;
  if (!r.Count(8, &num_finished)) return Malformed("finished count");
  plan.finished.resize(num_finished);
  for (uint64_t& id : plan.finished) r.U64(&id);
  uint32_t num_entries;
  // An entry takes at least 8 + 4 + 4 + 4 + 4 + 40 bytes.
  if (!r.Count(64, &num_entries)) return Malformed("entry count");
  plan.entries.resize(num_entries);
  for (StepEntry& e : plan.entries) {
    uint32_t sample;
    if (!r.U64(&e.sequence_id) || !r.I32(&e.num_new_tokens) || !r.I32(&e.start_position) ||
        !r.I32s(&e.token_ids) || !r.U32(&sample) || !ReadSampling(r, &e.sampling)) {
      return Malformed("step entry");
    }
    if (e.num_new_tokens != static_cast<int32_t>(e.token_ids.size())) {
      return Malformed("entry token count disagrees with its tokens");
    }
    if ((sample & ~3u) != 0 || sample == 3) return Malformed("entry logits flags");
    e.sample = (sample & 1u) != 0;
    e.all_logits = (sample & 2u) != 0;
  }
  uint32_t flags;
  if (!r.U32(&flags)) return Malformed("flags");
  if ((flags & ~3u) != 0) return Malformed("unknown flags");
  plan.stop = (flags & 1u) != 0;
  plan.vote_placement = (flags & 2u) != 0;
  if (!r.Bytes(&plan.offered_placement)) return Malformed("offered placement");
  if (!r.done()) return Malformed("trailing bytes");
  return plan;
}

uint64_t HashStepPlanBytes(absl::string_view bytes) { return Fnv1a64(bytes.data(), bytes.size()); }

StepPlanChannel::StepPlanChannel(Communicator* control, int root) : control_(control), root_(root) {
  CHECK(control_ != nullptr) << "StepPlanChannel needs a control communicator";
  CHECK(root >= 0 && root < control_->world_size()) << "root " << root;
}

absl::Status StepPlanChannel::Send(const StepPlan& plan) {
  CHECK_EQ(control_->rank(), root_) << "only the root sends step plans";
  if (plan.sequence_number != last_sequence_number_ + 1) {
    return absl::FailedPreconditionError(
        absl::StrCat("step plan out of order on the sender: expected ", last_sequence_number_ + 1,
                     " got ", plan.sequence_number));
  }
  const std::string bytes = SerializeStepPlan(plan);
  RETURN_IF_ERROR(Broadcast(plan.sequence_number, HashStepPlanBytes(bytes), bytes));
  last_sequence_number_ = plan.sequence_number;
  return absl::OkStatus();
}

absl::Status StepPlanChannel::SendRawForTest(uint64_t sequence_number, uint64_t hash,
                                             absl::string_view bytes) {
  CHECK_EQ(control_->rank(), root_) << "only the root sends step plans";
  return Broadcast(sequence_number, hash, bytes);
}

absl::Status StepPlanChannel::Broadcast(uint64_t sequence_number, uint64_t hash,
                                        absl::string_view bytes) {
  int64_t header[3] = {static_cast<int64_t>(sequence_number), static_cast<int64_t>(hash),
                       static_cast<int64_t>(bytes.size())};
  RETURN_IF_ERROR(control_->Broadcast(header, 3, DType::kI64, root_));
  std::vector<int64_t> words((bytes.size() + 7) / 8, 0);
  if (!bytes.empty()) std::memcpy(words.data(), bytes.data(), bytes.size());
  return control_->Broadcast(words.data(), words.size(), DType::kI64, root_);
}

absl::StatusOr<StepPlan> StepPlanChannel::Receive() {
  CHECK_NE(control_->rank(), root_) << "the root does not receive step plans";
  int64_t header[3] = {0, 0, 0};
  RETURN_IF_ERROR(control_->Broadcast(header, 3, DType::kI64, root_));
  const uint64_t sequence_number = static_cast<uint64_t>(header[0]);
  const uint64_t hash = static_cast<uint64_t>(header[1]);
  const int64_t length = header[2];
  if (length < 0 || length > (int64_t{1} << 32)) {
    return absl::DataLossError(
        absl::StrCat("step plan length ", length, " invalid at step ", sequence_number));
  }
  std::vector<int64_t> words((length + 7) / 8, 0);
  // Always take the payload so the group stays in step even when the plan is rejected.
  RETURN_IF_ERROR(control_->Broadcast(words.data(), words.size(), DType::kI64, root_));
  if (sequence_number != last_sequence_number_ + 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        "step plan gap: expected ", last_sequence_number_ + 1, " got ", sequence_number));
  }
  const absl::string_view bytes(reinterpret_cast<const char*>(words.data()),
                                static_cast<size_t>(length));
  if (HashStepPlanBytes(bytes) != hash) {
    return absl::DataLossError(absl::StrCat("step plan hash mismatch at step ", sequence_number));
  }
  ASSIGN_OR_RETURN(StepPlan plan, ParseStepPlan(bytes));
  if (plan.sequence_number != sequence_number) {
    return absl::DataLossError(absl::StrCat("step plan header says step ", sequence_number,
                                            " but the plan says ", plan.sequence_number));
  }
  last_sequence_number_ = sequence_number;
  return plan;
}

}  // namespace gemma::parallel
