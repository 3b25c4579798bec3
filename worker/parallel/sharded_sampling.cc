#include "worker/parallel/sharded_sampling.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "common/status_macros.h"

namespace gemma::parallel {

absl::StatusOr<std::vector<int32_t>> SampleSharded(Backend& backend, Communicator& comm,
                                                   const Buffer& logits,
                                                   const ShardedLogitsShape& shape,
                                                   const std::vector<SamplingParams>& params) {
  const int tp = comm.world_size();
  const int64_t rows = shape.rows;
  const int64_t local = shape.local_vocab;
  const int64_t vocab = shape.vocab;
  std::vector<float> temperature(rows);
  int64_t want = 1;
  for (int64_t r = 0; r < rows; ++r) {
    const SamplingParams& p = params[r];
    temperature[r] = p.temperature > 0 ? p.temperature : 1.0f;
    if (p.temperature > 0) want = std::max<int64_t>(want, p.top_k > 0 ? p.top_k : 64);
  }
  // Each shard's log-sum-exp pieces: the mass of the whole vocabulary without whole rows.
  ASSIGN_OR_RETURN(BufferPtr max_b, backend.Alloc(DType::kF32, rows));
  ASSIGN_OR_RETURN(BufferPtr sum_b, backend.Alloc(DType::kF32, rows));
  backend.LogSumExp(logits, rows, local, temperature, *max_b, *sum_b);
  std::vector<float> maxes(tp * rows), sums(tp * rows);
  RETURN_IF_ERROR(comm.AllGather(backend.RawData(*max_b), maxes.data(), rows, DType::kF32));
  RETURN_IF_ERROR(comm.AllGather(backend.RawData(*sum_b), sums.data(), rows, DType::kF32));

  std::vector<int32_t> out(rows, -1);
  std::vector<bool> done(rows, false);
  for (int64_t per_shard = std::min(want, local);; per_shard = std::min(local, per_shard * 4)) {
    ASSIGN_OR_RETURN(BufferPtr values_b, backend.Alloc(DType::kF32, rows * per_shard));
    ASSIGN_OR_RETURN(BufferPtr ids_b, backend.Alloc(DType::kI32, rows * per_shard));
    backend.TopK(logits, rows, local, per_shard, shape.vocab_offset, *values_b, *ids_b);
    std::vector<float> values(tp * rows * per_shard);
    std::vector<int32_t> ids(tp * rows * per_shard);
    RETURN_IF_ERROR(comm.AllGather(backend.RawData(*values_b), values.data(), rows * per_shard,
                                   DType::kF32));
    RETURN_IF_ERROR(comm.AllGather(backend.RawData(*ids_b), ids.data(), rows * per_shard,
                                   DType::kI32));
    const bool complete = per_shard == local;  // every logit is among the candidates
    for (int64_t r = 0; r < rows; ++r) {
      if (done[r]) continue;
      const SamplingParams& p = params[r];
      // Merge the shards' candidates: largest first, lower id on ties (as the full-row path).
      std::vector<std::pair<float, int32_t>> cand;
      for (int s = 0; s < tp; ++s) {
        for (int64_t i = 0; i < per_shard; ++i) {
          int64_t at = (s * rows + r) * per_shard + i;
          cand.emplace_back(values[at], ids[at]);
        }
      }
      std::sort(cand.begin(), cand.end(), [](const auto& a, const auto& b) {
        return a.first != b.first ? a.first > b.first : a.second < b.second;
      });
      if (p.temperature <= 0.0f) {
        out[r] = cand[0].second;
        done[r] = true;
        continue;
      }
      const int64_t keep = p.top_k > 0 ? std::min<int64_t>(p.top_k, vocab) : vocab;
      const int64_t have = std::min<int64_t>(keep, static_cast<int64_t>(cand.size()));
      const double max_scaled = cand[0].first / p.temperature;
      std::vector<double> probs(have);
      double gathered_total = 0.0;
      for (int64_t i = 0; i < have; ++i) {
        probs[i] = std::exp(cand[i].first / p.temperature - max_scaled);
        gathered_total += probs[i];
      }
      double total = gathered_total;
      if (keep == vocab && !complete) {
        total = 0.0;  // the whole vocabulary's mass, from the shards' log-sum-exp pieces
        for (int s = 0; s < tp; ++s) {
          total += std::exp(static_cast<double>(maxes[s * rows + r]) - max_scaled) *
                   sums[s * rows + r];
        }
      }
      int64_t nucleus = keep;
      bool need_more = false;
      if (p.top_p < 1.0f) {
        double cumulative = 0.0;
        nucleus = -1;
        for (int64_t i = 0; i < have; ++i) {
          cumulative += probs[i] / total;
          if (cumulative >= p.top_p) {
            nucleus = i + 1;
            break;
          }
        }
        if (nucleus < 0) {
          if (have < keep && !complete) {
            need_more = true;
          } else {
            nucleus = have;
          }
        }
      }
      if (!need_more) {
        double nucleus_total = 0.0;
        if (nucleus > have) {
          nucleus_total = total;
        } else {
          for (int64_t i = 0; i < nucleus; ++i) nucleus_total += probs[i];
        }
        double target = SamplingUniform(p) * nucleus_total;
        double cumulative = 0.0;
        int64_t chosen = -1;
        for (int64_t i = 0; i < std::min(nucleus, have); ++i) {
          cumulative += probs[i];
          if (target < cumulative) {
            chosen = i;
            break;
          }
        }
        if (chosen < 0 && (nucleus <= have || complete)) chosen = std::min(nucleus, have) - 1;
        if (chosen >= 0) {
          out[r] = cand[chosen].second;
          done[r] = true;
        }
      }
    }
    if (std::all_of(done.begin(), done.end(), [](bool d) { return d; })) break;
    if (complete) return absl::InternalError("sharded sampling could not place a draw");
  }
  return out;
}

}  // namespace gemma::parallel
