#include "worker/parallel/expert_dispatch.h"

#include <cstring>
#include <vector>

#include "common/status_macros.h"

namespace gemma::parallel {

absl::Status DispatchExperts(Backend& backend, Communicator& comm,
                             const ExpertDispatchShape& shape, const Buffer& topk_ids,
                             const Buffer& topk_weights, const Buffer& x_in, Buffer& out,
                             const LocalExperts& run_local) {
  const int world = comm.world_size();
  const int64_t hidden = shape.hidden;
  const int64_t top_k = shape.top_k;
  const int64_t t = shape.num_tokens;
  const int64_t per_rank = shape.experts_per_rank;
  // This tp rank dispatches only its share of the group's tokens.
  const int64_t share_begin = t * shape.tp_rank / shape.tp_size;
  const int64_t share_end = t * (shape.tp_rank + 1) / shape.tp_size;
  const int64_t share = share_end - share_begin;

  std::vector<int32_t> ids(t * top_k);
  std::vector<float> weights(t * top_k);
  std::vector<float> x(t * hidden);
  if (t > 0) {
    RETURN_IF_ERROR(backend.Read(topk_ids, ids.data(), ids.size() * sizeof(int32_t)));
    RETURN_IF_ERROR(backend.Read(topk_weights, weights.data(), weights.size() * sizeof(float)));
    RETURN_IF_ERROR(backend.Read(x_in, x.data(), x.size() * sizeof(float)));
  }
  // One (token, owner rank) pair per rank a token needs, ordered by rank then token. Each pair
  // carries the token's activation row and, as metadata, the ids and weights of the experts it
  // needs there (padded with -1).
  std::vector<std::vector<int64_t>> pairs(world);
  for (int64_t tok = share_begin; tok < share_end; ++tok) {
    int last_owner = -1;
    for (int64_t k = 0; k < top_k; ++k) {  // ids are ascending, so owners are too
      int owner = static_cast<int>(ids[tok * top_k + k] / per_rank);
      if (owner != last_owner) pairs[owner].push_back(tok);
      last_owner = owner;
    }
  }
  std::vector<int64_t> send_pairs(world), recv_pairs(world);
  for (int r = 0; r < world; ++r) send_pairs[r] = static_cast<int64_t>(pairs[r].size());
  {
    std::vector<int64_t> ones(world, 1);
    RETURN_IF_ERROR(comm.AllToAllV(send_pairs.data(), ones, recv_pairs.data(), ones, DType::kI64));
  }
  const int64_t meta = 2 * top_k;  // ids, then weight bits
  std::vector<float> send_x;
  std::vector<int32_t> send_meta;
  for (int r = 0; r < world; ++r) {
    for (int64_t tok : pairs[r]) {
      send_x.insert(send_x.end(), x.begin() + tok * hidden, x.begin() + (tok + 1) * hidden);
      std::vector<int32_t> m(meta, -1);
      int64_t n = 0;
      for (int64_t k = 0; k < top_k; ++k) {
        int32_t e = ids[tok * top_k + k];
        if (e / per_rank != r) continue;
        m[n] = e;
        std::memcpy(&m[top_k + n], &weights[tok * top_k + k], sizeof(float));
        ++n;
      }
      send_meta.insert(send_meta.end(), m.begin(), m.end());
    }
  }
  int64_t total_recv = 0;
  std::vector<int64_t> send_x_counts(world), recv_x_counts(world), send_m_counts(world),
      recv_m_counts(world);
  for (int r = 0; r < world; ++r) {
    total_recv += recv_pairs[r];
    send_x_counts[r] = send_pairs[r] * hidden;
    recv_x_counts[r] = recv_pairs[r] * hidden;
    send_m_counts[r] = send_pairs[r] * meta;
    recv_m_counts[r] = recv_pairs[r] * meta;
  }
  std::vector<float> recv_x(total_recv * hidden);
  std::vector<int32_t> recv_meta(total_recv * meta);
  RETURN_IF_ERROR(comm.AllToAllV(send_x.data(), send_x_counts, recv_x.data(), recv_x_counts,
                                 DType::kF32));
  RETURN_IF_ERROR(comm.AllToAllV(send_meta.data(), send_m_counts, recv_meta.data(), recv_m_counts,
                                 DType::kI32));
  // Run the local experts over what arrived: each pair's partial sum over this rank's experts.
  std::vector<float> result(total_recv * hidden, 0.0f);
  if (total_recv > 0) {
    std::vector<int32_t> local_ids(total_recv * top_k);
    std::vector<float> local_weights(total_recv * top_k);
    for (int64_t p = 0; p < total_recv; ++p) {
      for (int64_t k = 0; k < top_k; ++k) {
        local_ids[p * top_k + k] = recv_meta[p * meta + k];
        std::memcpy(&local_weights[p * top_k + k], &recv_meta[p * meta + top_k + k],
                    sizeof(float));
      }
    }
    ASSIGN_OR_RETURN(BufferPtr xb, backend.Alloc(DType::kF32, total_recv * hidden));
    ASSIGN_OR_RETURN(BufferPtr ib, backend.Alloc(DType::kI32, total_recv * top_k));
    ASSIGN_OR_RETURN(BufferPtr wb, backend.Alloc(DType::kF32, total_recv * top_k));
    ASSIGN_OR_RETURN(BufferPtr ob, backend.Alloc(DType::kF32, total_recv * hidden));
    backend.Write(*xb, recv_x.data(), recv_x.size() * sizeof(float));
    backend.Write(*ib, local_ids.data(), local_ids.size() * sizeof(int32_t));
    backend.Write(*wb, local_weights.data(), local_weights.size() * sizeof(float));
    run_local(*xb, *ib, *wb, total_recv, *ob);
    RETURN_IF_ERROR(backend.Read(*ob, result.data(), result.size() * sizeof(float)));
  }
  // Send the results back the way they came, and sum each token's partials in rank (= expert)
  // order. Tokens outside this rank's share stay zero; the tp all-reduce fills them.
  std::vector<float> returned(share > 0 ? send_x.size() : 0);
  RETURN_IF_ERROR(comm.AllToAllV(result.data(), recv_x_counts, returned.data(), send_x_counts,
                                 DType::kF32));
  std::vector<float> summed(t * hidden, 0.0f);
  int64_t p = 0;
  for (int r = 0; r < world; ++r) {
    for (int64_t tok : pairs[r]) {
      float* o = &summed[tok * hidden];
      const float* src = &returned[p * hidden];
      for (int64_t i = 0; i < hidden; ++i) o[i] += src[i];
      ++p;
    }
  }
  if (t > 0) backend.Write(out, summed.data(), summed.size() * sizeof(float));
  return backend.Synchronize();
}

}  // namespace gemma::parallel
