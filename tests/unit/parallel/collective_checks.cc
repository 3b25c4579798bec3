#include "tests/unit/parallel/collective_checks.h"

#include <cmath>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/parallel/world_config.h"

namespace gemma::parallel::testing {
namespace {

// Random non-zero values, a function of (seed, salt, rank) only.
template <typename T>
std::vector<T> RankData(uint64_t seed, int salt, int rank, size_t n) {
  std::mt19937_64 rng(seed * 1000003u + static_cast<uint64_t>(salt) * 7919u +
                      static_cast<uint64_t>(rank));
  std::vector<T> data(n);
  for (T& x : data) {
    if constexpr (std::is_floating_point_v<T>) {
      std::uniform_real_distribution<float> dist(0.05f, 1.0f);
      x = dist(rng) * (rng() & 1 ? 1.0f : -1.0f);
    } else {
      std::uniform_int_distribution<int64_t> dist(1, 100000);
      x = static_cast<T>(dist(rng) * (rng() & 1 ? 1 : -1));
    }
  }
  return data;
}

template <typename T>
absl::Status Compare(const char* what, const std::vector<T>& got, const std::vector<T>& want,
                     bool exact, int rank) {
  if (got.size() != want.size()) {
    return absl::InternalError(
        absl::StrCat(what, " on rank ", rank, ": size ", got.size(), " want ", want.size()));
  }
  for (size_t i = 0; i < got.size(); ++i) {
    bool ok;
    if constexpr (std::is_floating_point_v<T>) {
      ok = exact ? got[i] == want[i]
                 : std::fabs(got[i] - want[i]) <=
                       kReorderedSumRelTol * std::max(1.0f, std::fabs(want[i]));
    } else {
      ok = got[i] == want[i];
    }
    if (!ok) {
      return absl::InternalError(absl::StrCat(what, " on rank ", rank, ": element ", i, " is ",
                                              got[i], " want ", want[i]));
    }
  }
  return absl::OkStatus();
}

absl::Status ExpectBytes(const Communicator& comm, CollectiveOp op, uint64_t want) {
  const uint64_t got = comm.traffic().BytesSent(op);
  if (got != want) {
    return absl::InternalError(absl::StrCat(CollectiveOpName(op), " on rank ", comm.rank(),
                                            ": counted ", got, " bytes sent, want ", want));
  }
  return absl::OkStatus();
}

template <typename T>
absl::Status CheckAllReduce(Communicator& comm, uint64_t seed, int salt, DType dtype, size_t n,
                            bool exact) {
  const int w = comm.world_size();
  std::vector<T> data = RankData<T>(seed, salt, comm.rank(), n);
  std::vector<T> want = RankData<T>(seed, salt, 0, n);
  for (int r = 1; r < w; ++r) {
    std::vector<T> other = RankData<T>(seed, salt, r, n);
    for (size_t i = 0; i < n; ++i) want[i] += other[i];
  }
  RETURN_IF_ERROR(comm.AllReduce(data.data(), n, dtype));
  return Compare("AllReduce", data, want, exact, comm.rank());
}

}  // namespace

absl::Status RunAllCollectiveChecks(Communicator& comm, uint64_t seed, bool exact_f32) {
  const int w = comm.world_size();
  const int rank = comm.rank();
  const uint64_t peers = static_cast<uint64_t>(w - 1);
  comm.ResetTraffic();

  // AllReduce: an awkward length, then integer counters.
  const size_t n = 37;
  RETURN_IF_ERROR(CheckAllReduce<float>(comm, seed, 1, DType::kF32, n, exact_f32));
  RETURN_IF_ERROR(CheckAllReduce<int32_t>(comm, seed, 2, DType::kI32, 5, true));
  RETURN_IF_ERROR(CheckAllReduce<int64_t>(comm, seed, 3, DType::kI64, 1, true));
  uint64_t want_allreduce = 0;
  if (w > 1) {
    for (auto [count, elem] : {std::pair<size_t, size_t>{n, 4}, {5, 4}, {1, 8}}) {
      const uint64_t own = SplitEvenly(static_cast<int64_t>(count), w, rank).size;
      want_allreduce += (count - own) * elem + own * elem * peers;
    }
  }
  RETURN_IF_ERROR(ExpectBytes(comm, CollectiveOp::kAllReduce, want_allreduce));

  // AllGather: 5 floats per rank.
  {
    const size_t send_count = 5;
    std::vector<float> send = RankData<float>(seed, 4, rank, send_count);
    std::vector<float> recv(send_count * w, 0.0f), want;
    for (int r = 0; r < w; ++r) {
      std::vector<float> block = RankData<float>(seed, 4, r, send_count);
      want.insert(want.end(), block.begin(), block.end());
    }
    RETURN_IF_ERROR(comm.AllGather(send.data(), recv.data(), send_count, DType::kF32));
    RETURN_IF_ERROR(Compare("AllGather", recv, want, true, rank));
    RETURN_IF_ERROR(ExpectBytes(comm, CollectiveOp::kAllGather, send_count * 4 * peers));
  }

  // ReduceScatter: 3 elements per rank, I64 (exact) then F32.
  {
    const size_t recv_count = 3;
    std::vector<int64_t> send = RankData<int64_t>(seed, 5, rank, recv_count * w);
    std::vector<int64_t> recv(recv_count, 0), want(recv_count, 0);
    for (int r = 0; r < w; ++r) {
      std::vector<int64_t> other = RankData<int64_t>(seed, 5, r, recv_count * w);
      for (size_t i = 0; i < recv_count; ++i) want[i] += other[rank * recv_count + i];
    }
    RETURN_IF_ERROR(comm.ReduceScatter(send.data(), recv.data(), recv_count, DType::kI64));
    RETURN_IF_ERROR(Compare("ReduceScatter(I64)", recv, want, true, rank));

    std::vector<float> fsend = RankData<float>(seed, 6, rank, recv_count * w);
    std::vector<float> frecv(recv_count, 0.0f), fwant(recv_count, 0.0f);
    for (int r = 0; r < w; ++r) {
      std::vector<float> other = RankData<float>(seed, 6, r, recv_count * w);
      for (size_t i = 0; i < recv_count; ++i) {
        fwant[i] = r == 0 ? other[rank * recv_count + i] : fwant[i] + other[rank * recv_count + i];
      }
    }
    RETURN_IF_ERROR(comm.ReduceScatter(fsend.data(), frecv.data(), recv_count, DType::kF32));
    RETURN_IF_ERROR(Compare("ReduceScatter(F32)", frecv, fwant, true, rank));
    RETURN_IF_ERROR(ExpectBytes(comm, CollectiveOp::kReduceScatter,
                                recv_count * 8 * peers + recv_count * 4 * peers));
  }

  // AllToAllV: counts 0..3 that differ per pair, zeros included; element = src, dst, index.
  {
    auto count = [](int src, int dst) -> int64_t { return (src * 3 + dst * 5 + 1) % 4; };
    std::vector<int64_t> send_counts(w), recv_counts(w), send, want;
    for (int p = 0; p < w; ++p) {
      send_counts[p] = count(rank, p);
      recv_counts[p] = count(p, rank);
      for (int64_t i = 0; i < send_counts[p]; ++i) send.push_back(rank * 1000000 + p * 1000 + i);
      for (int64_t i = 0; i < recv_counts[p]; ++i) want.push_back(p * 1000000 + rank * 1000 + i);
    }
    std::vector<int64_t> recv(want.size(), -1);
    comm.ResetTraffic();
    RETURN_IF_ERROR(
        comm.AllToAllV(send.data(), send_counts, recv.data(), recv_counts, DType::kI64));
    RETURN_IF_ERROR(Compare("AllToAllV", recv, want, true, rank));
    uint64_t want_total = 0;
    const std::vector<uint64_t>& per_peer = comm.traffic().all_to_all_bytes_to_peer;
    if (per_peer.size() != static_cast<size_t>(w)) {
      return absl::InternalError("AllToAllV per-peer counters have the wrong size");
    }
    for (int p = 0; p < w; ++p) {
      const uint64_t want_peer = p == rank ? 0 : static_cast<uint64_t>(send_counts[p]) * 8;
      if (per_peer[p] != want_peer) {
        return absl::InternalError(absl::StrCat("AllToAllV on rank ", rank, ": counted ",
                                                per_peer[p], " bytes to peer ", p, ", want ",
                                                want_peer));
      }
      want_total += want_peer;
    }
    RETURN_IF_ERROR(ExpectBytes(comm, CollectiveOp::kAllToAllV, want_total));
  }

  // Broadcast from the last rank.
  {
    const int root = w - 1;
    const size_t count = 11;
    std::vector<float> data = RankData<float>(seed, 7, rank, count);
    RETURN_IF_ERROR(comm.Broadcast(data.data(), count, DType::kF32, root));
    RETURN_IF_ERROR(Compare("Broadcast", data, RankData<float>(seed, 7, root, count), true, rank));
    RETURN_IF_ERROR(
        ExpectBytes(comm, CollectiveOp::kBroadcast, rank == root ? count * 4 * peers : 0));
  }

  RETURN_IF_ERROR(comm.Barrier());
  RETURN_IF_ERROR(ExpectBytes(comm, CollectiveOp::kBarrier, 0));
  if (comm.traffic().Calls(CollectiveOp::kBarrier) != 1 || !comm.healthy()) {
    return absl::InternalError("Barrier call not counted or communicator unhealthy");
  }
  return absl::OkStatus();
}

}  // namespace gemma::parallel::testing
