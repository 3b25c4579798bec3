#include "worker/parallel/expert_dispatch.h"

#include <algorithm>
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

  // The routing comes to the host (T x top_k ids and weights: the plan and the counts every
  // collective needs are host values); the activations never do. Rows are gathered, exchanged
  // and combined in the backend's memory: with NCCL on a GPU they go device to device, with a
  // host-memory communicator the staging wrapper copies only the rows that travel.
  std::vector<int32_t> ids(t * top_k);
  std::vector<float> weights(t * top_k);
  if (t > 0) {
    RETURN_IF_ERROR(backend.Read(topk_ids, ids.data(), ids.size() * sizeof(int32_t)));
    RETURN_IF_ERROR(backend.Read(topk_weights, weights.data(), weights.size() * sizeof(float)));
  }
  // One (token, rank) pair per rank a token needs, ordered by rank then token: the token's
  // activation row once, and as metadata the rank's local slots and weights of the experts it
  // needs there (padded with -1). `sent[r]` lists the (token, k) of each entry, in order: the
  // results come back one row per entry.
  const int64_t meta = 2 * top_k;  // slots, then weight bits
  std::vector<std::vector<int32_t>> pairs(world);
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
        pairs[owner].push_back(static_cast<int32_t>(tok));
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
  std::vector<int32_t> send_rows, send_m;
  std::vector<int64_t> send_x_counts(world), recv_x_counts(world), send_m_counts(world),
      recv_m_counts(world), send_e_counts(world), recv_e_counts(world);
  int64_t total_pairs = 0, total_entries = 0, total_sent = 0;
  for (int r = 0; r < world; ++r) {
    send_rows.insert(send_rows.end(), pairs[r].begin(), pairs[r].end());
    send_m.insert(send_m.end(), send_meta[r].begin(), send_meta[r].end());
    send_x_counts[r] = send_counts[2 * r] * hidden;
    recv_x_counts[r] = recv_counts[2 * r] * hidden;
    send_m_counts[r] = send_counts[2 * r] * meta;
    recv_m_counts[r] = recv_counts[2 * r] * meta;
    send_e_counts[r] = send_counts[2 * r + 1] * hidden;
    recv_e_counts[r] = recv_counts[2 * r + 1] * hidden;
    total_pairs += recv_counts[2 * r];
    total_entries += recv_counts[2 * r + 1];
    total_sent += send_counts[2 * r + 1];
  }
  // Buffers of at least one element, so that an empty exchange still has an address.
  auto alloc = [&](DType dtype, int64_t numel) { return backend.Alloc(dtype, std::max<int64_t>(1, numel)); };
  const int64_t n_send = static_cast<int64_t>(send_rows.size());
  ASSIGN_OR_RETURN(BufferPtr send_x, alloc(DType::kF32, n_send * hidden));
  if (n_send > 0) {
    ASSIGN_OR_RETURN(BufferPtr rows, alloc(DType::kI32, n_send));
    backend.Write(*rows, send_rows.data(), send_rows.size() * sizeof(int32_t));
    backend.GatherRows(x_in, *rows, n_send, hidden, *send_x);
  }
  ASSIGN_OR_RETURN(BufferPtr recv_x, alloc(DType::kF32, total_pairs * hidden));
  std::vector<int32_t> recv_meta(total_pairs * meta);
  RETURN_IF_ERROR(comm.AllToAllV(backend.RawData(*send_x), send_x_counts,
                                 backend.RawData(*recv_x), recv_x_counts, DType::kF32));
  RETURN_IF_ERROR(comm.AllToAllV(send_m.data(), send_m_counts, recv_meta.data(), recv_m_counts,
                                 DType::kI32));
  send_x.reset();  // sent: its rows are in recv_x now
  // Host arrays the backend copies from (Write's sources stay valid until the next wait).
  std::vector<int32_t> entry_pair, entry_slots, row_of;
  std::vector<float> entry_weights;
  // Run the local slots over what arrived: one row per (pair, expert) entry, so each expert's
  // weighted output travels back on its own and the source sums them in expert order.
  ASSIGN_OR_RETURN(BufferPtr result, alloc(DType::kF32, total_entries * hidden));
  if (total_entries > 0) {
    entry_pair.resize(total_entries);
    entry_slots.resize(total_entries);
    entry_weights.resize(total_entries);
    int64_t row = 0;
    for (int64_t p = 0; p < total_pairs; ++p) {
      for (int64_t k = 0; k < top_k && recv_meta[p * meta + k] != -1; ++k) {
        if (row == total_entries) return absl::InternalError("expert dispatch: entry count mismatch");
        entry_pair[row] = static_cast<int32_t>(p);
        entry_slots[row] = recv_meta[p * meta + k];
        std::memcpy(&entry_weights[row], &recv_meta[p * meta + top_k + k], sizeof(float));
        ++row;
      }
    }
    if (row != total_entries) return absl::InternalError("expert dispatch: entry count mismatch");
    ASSIGN_OR_RETURN(BufferPtr pb, alloc(DType::kI32, total_entries));
    ASSIGN_OR_RETURN(BufferPtr xb, alloc(DType::kF32, total_entries * hidden));
    ASSIGN_OR_RETURN(BufferPtr ib, alloc(DType::kI32, total_entries));
    ASSIGN_OR_RETURN(BufferPtr wb, alloc(DType::kF32, total_entries));
    backend.Write(*pb, entry_pair.data(), entry_pair.size() * sizeof(int32_t));
    backend.Write(*ib, entry_slots.data(), entry_slots.size() * sizeof(int32_t));
    backend.Write(*wb, entry_weights.data(), entry_weights.size() * sizeof(float));
    backend.GatherRows(*recv_x, *pb, total_entries, hidden, *xb);
    recv_x.reset();  // gathered into xb (stream order keeps it until the gather has run)
    run_local(*xb, *ib, *wb, total_entries, 1, *result);
  }
  // Send the results back the way they came; each token sums its experts' rows in k order
  // (ascending expert id), wherever they ran. Tokens outside this rank's share stay zero.
  ASSIGN_OR_RETURN(BufferPtr returned, alloc(DType::kF32, total_sent * hidden));
  RETURN_IF_ERROR(comm.AllToAllV(backend.RawData(*result), recv_e_counts,
                                 backend.RawData(*returned), send_e_counts, DType::kF32));
  if (t > 0) {
    row_of.assign(t * top_k, -1);
    int32_t row = 0;
    for (int r = 0; r < world; ++r) {
      for (int64_t tk : sent[r]) row_of[tk] = row++;
    }
    ASSIGN_OR_RETURN(BufferPtr combine, alloc(DType::kI32, t * top_k));
    backend.Write(*combine, row_of.data(), row_of.size() * sizeof(int32_t));
    backend.GatherSumRows(*returned, *combine, t, top_k, hidden, out);
  }
  // The host arrays above were Write sources: they must outlive the copies.
  return backend.Synchronize();
}

}  // namespace gemma::parallel
