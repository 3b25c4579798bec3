#include "worker/parallel/expert_dispatch.h"

#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace gemma::parallel {

absl::Status DispatchExperts(Backend& backend, Communicator& comm,
                             const ExpertDispatchShape& shape, const eplb::CopyTable& copies,
                             const eplb::Topology& topology, const Buffer& topk_ids,
                             const Buffer& topk_weights, const Buffer& x_in, Buffer& out,
                             const LocalExperts& run_local) {
  const int world = comm.world_size();
  const int me = comm.rank();
  const int64_t hidden = shape.hidden;
  const int64_t top_k = shape.top_k;
  const int64_t t = shape.num_tokens;
  const int spr = copies.slots_per_rank();
  // This tp rank dispatches only its share of the group's tokens.
  const int64_t share_begin = t * shape.tp_rank / shape.tp_size;
  const int64_t share_end = t * (shape.tp_rank + 1) / shape.tp_size;

  std::vector<int32_t> ids(t * top_k);
  std::vector<float> weights(t * top_k);
  std::vector<float> x(t * hidden);
  if (t > 0) {
    RETURN_IF_ERROR(backend.Read(topk_ids, ids.data(), ids.size() * sizeof(int32_t)));
    RETURN_IF_ERROR(backend.Read(topk_weights, weights.data(), weights.size() * sizeof(float)));
    RETURN_IF_ERROR(backend.Read(x_in, x.data(), x.size() * sizeof(float)));
  }
  // One (token, rank) pair per rank a token needs, ordered by rank then token: the token's
  // activation row once, and as metadata the rank's local slots and weights of the experts it
  // needs there (padded with -1). `sent[r]` lists the (token, k) of each entry, in order: the
  // results come back one row per entry.
  const int64_t meta = 2 * top_k;  // slots, then weight bits
  std::vector<std::vector<int64_t>> pairs(world);
  std::vector<std::vector<int32_t>> send_meta(world);
  std::vector<std::vector<int64_t>> sent(world);
  std::vector<int64_t> nth(copies.num_experts(), 0);
  std::vector<int64_t> last_token(world, -1);
  for (int64_t tok = share_begin; tok < share_end; ++tok) {
    for (int64_t k = 0; k < top_k; ++k) {
      const int32_t e = ids[tok * top_k + k];
      if (e < 0 || e >= copies.num_experts()) {
        return absl::InternalError(absl::StrCat("expert dispatch: token ", tok, " routed to expert ",
                                                e, " of ", copies.num_experts()));
      }
      const int32_t slot =
          eplb::ChooseCopy(copies.Copies(shape.layer, e), spr, me, topology, nth[e]++);
      const int owner = slot / spr;
      if (last_token[owner] != tok) {
        pairs[owner].push_back(tok);
        send_meta[owner].insert(send_meta[owner].end(), meta, -1);
        last_token[owner] = tok;
      }
      int32_t* m = &send_meta[owner][send_meta[owner].size() - meta];
      int64_t n = 0;
      while (m[n] != -1) ++n;
      m[n] = slot % spr;
      std::memcpy(&m[top_k + n], &weights[tok * top_k + k], sizeof(float));
      sent[owner].push_back(tok * top_k + k);
    }
  }
  // Counts: pairs and entries per destination.
  std::vector<int64_t> send_counts(2 * world), recv_counts(2 * world);
  for (int r = 0; r < world; ++r) {
    send_counts[2 * r] = static_cast<int64_t>(pairs[r].size());
    send_counts[2 * r + 1] = static_cast<int64_t>(sent[r].size());
  }
  {
    std::vector<int64_t> twos(world, 2);
    RETURN_IF_ERROR(comm.AllToAllV(send_counts.data(), twos, recv_counts.data(), twos, DType::kI64));
  }
  std::vector<float> send_x;
  std::vector<int32_t> send_m;
  std::vector<int64_t> send_x_counts(world), recv_x_counts(world), send_m_counts(world),
      recv_m_counts(world), send_e_counts(world), recv_e_counts(world);
  int64_t total_pairs = 0, total_entries = 0;
  for (int r = 0; r < world; ++r) {
    for (int64_t tok : pairs[r]) {
      send_x.insert(send_x.end(), x.begin() + tok * hidden, x.begin() + (tok + 1) * hidden);
    }
    send_m.insert(send_m.end(), send_meta[r].begin(), send_meta[r].end());
    send_x_counts[r] = send_counts[2 * r] * hidden;
    recv_x_counts[r] = recv_counts[2 * r] * hidden;
    send_m_counts[r] = send_counts[2 * r] * meta;
    recv_m_counts[r] = recv_counts[2 * r] * meta;
    send_e_counts[r] = send_counts[2 * r + 1] * hidden;
    recv_e_counts[r] = recv_counts[2 * r + 1] * hidden;
    total_pairs += recv_counts[2 * r];
    total_entries += recv_counts[2 * r + 1];
  }
  std::vector<float> recv_x(total_pairs * hidden);
  std::vector<int32_t> recv_meta(total_pairs * meta);
  RETURN_IF_ERROR(comm.AllToAllV(send_x.data(), send_x_counts, recv_x.data(), recv_x_counts,
                                 DType::kF32));
  RETURN_IF_ERROR(comm.AllToAllV(send_m.data(), send_m_counts, recv_meta.data(), recv_m_counts,
                                 DType::kI32));
  // Run the local slots over what arrived: one row per (pair, expert) entry, so each expert's
  // weighted output travels back on its own and the source sums them in expert order.
  std::vector<float> result(total_entries * hidden);
  if (total_entries > 0) {
    std::vector<float> entry_x(total_entries * hidden);
    std::vector<int32_t> entry_slots(total_entries);
    std::vector<float> entry_weights(total_entries);
    int64_t row = 0;
    for (int64_t p = 0; p < total_pairs; ++p) {
      for (int64_t k = 0; k < top_k && recv_meta[p * meta + k] != -1; ++k) {
        if (row == total_entries) return absl::InternalError("expert dispatch: entry count mismatch");
        std::copy_n(&recv_x[p * hidden], hidden, &entry_x[row * hidden]);
        entry_slots[row] = recv_meta[p * meta + k];
        std::memcpy(&entry_weights[row], &recv_meta[p * meta + top_k + k], sizeof(float));
        ++row;
      }
    }
    if (row != total_entries) return absl::InternalError("expert dispatch: entry count mismatch");
    ASSIGN_OR_RETURN(BufferPtr xb, backend.Alloc(DType::kF32, total_entries * hidden));
    ASSIGN_OR_RETURN(BufferPtr ib, backend.Alloc(DType::kI32, total_entries));
    ASSIGN_OR_RETURN(BufferPtr wb, backend.Alloc(DType::kF32, total_entries));
    ASSIGN_OR_RETURN(BufferPtr ob, backend.Alloc(DType::kF32, total_entries * hidden));
    backend.Write(*xb, entry_x.data(), entry_x.size() * sizeof(float));
    backend.Write(*ib, entry_slots.data(), entry_slots.size() * sizeof(int32_t));
    backend.Write(*wb, entry_weights.data(), entry_weights.size() * sizeof(float));
    run_local(*xb, *ib, *wb, total_entries, 1, *ob);
    RETURN_IF_ERROR(backend.Read(*ob, result.data(), result.size() * sizeof(float)));
  }
  // Send the results back the way they came; each token sums its experts' rows in k order
  // (ascending expert id), wherever they ran. Tokens outside this rank's share stay zero.
  int64_t total_sent = 0;
  for (int r = 0; r < world; ++r) total_sent += static_cast<int64_t>(sent[r].size());
  std::vector<float> returned(total_sent * hidden);
  RETURN_IF_ERROR(comm.AllToAllV(result.data(), recv_e_counts, returned.data(), send_e_counts,
                                 DType::kF32));
  std::vector<int64_t> row_of(t * top_k, -1);
  int64_t row = 0;
  for (int r = 0; r < world; ++r) {
    for (int64_t tk : sent[r]) row_of[tk] = row++;
  }
  std::vector<float> summed(t * hidden, 0.0f);
  for (int64_t tok = share_begin; tok < share_end; ++tok) {
    float* o = &summed[tok * hidden];
    for (int64_t k = 0; k < top_k; ++k) {
      const float* src = &returned[row_of[tok * top_k + k] * hidden];
      for (int64_t i = 0; i < hidden; ++i) o[i] += src[i];
    }
  }
  if (t > 0) backend.Write(out, summed.data(), summed.size() * sizeof(float));
  return backend.Synchronize();
}

}  // namespace gemma::parallel
