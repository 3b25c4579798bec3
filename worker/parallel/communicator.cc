#include "worker/parallel/communicator.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "glog/logging.h"
#include "worker/parallel/world_config.h"

namespace gemma::parallel {
namespace {

template <typename T>
void AddInto(void* dst, const void* src, size_t count) {
  T* d = static_cast<T*>(dst);
  const T* s = static_cast<const T*>(src);
  for (size_t i = 0; i < count; ++i) d[i] += s[i];
}

void AddIntoBf16(void* dst, const void* src, size_t count) {
  uint16_t* d = static_cast<uint16_t*>(dst);
  const uint16_t* s = static_cast<const uint16_t*>(src);
  for (size_t i = 0; i < count; ++i) d[i] = F32ToBf16(Bf16ToF32(d[i]) + Bf16ToF32(s[i]));
}

}  // namespace

const char* CollectiveOpName(CollectiveOp op) {
  switch (op) {
    case CollectiveOp::kAllReduce:
      return "AllReduce";
    case CollectiveOp::kAllGather:
      return "AllGather";
    case CollectiveOp::kReduceScatter:
      return "ReduceScatter";
    case CollectiveOp::kAllToAllV:
      return "AllToAllV";
    case CollectiveOp::kBroadcast:
      return "Broadcast";
    case CollectiveOp::kBarrier:
      return "Barrier";
  }
  return "Unknown";
}

uint64_t TrafficCounters::TotalBytesSent() const {
  uint64_t total = 0;
  for (uint64_t b : bytes_sent) total += b;
  return total;
}

void TrafficCounters::Reset() {
  bytes_sent.fill(0);
  calls.fill(0);
  for (uint64_t& b : all_to_all_bytes_to_peer) b = 0;
}

std::string OpContext(CollectiveOp op, int rank, int world_size) {
  return absl::StrCat(CollectiveOpName(op), " on rank ", rank, " of ", world_size);
}

absl::Status ValidateAllToAllCounts(CollectiveOp op, int rank, int world_size,
                                    absl::Span<const int64_t> send_counts,
                                    absl::Span<const int64_t> recv_counts) {
  if (send_counts.size() != static_cast<size_t>(world_size) ||
      recv_counts.size() != static_cast<size_t>(world_size)) {
    return absl::InvalidArgumentError(absl::StrCat(
        OpContext(op, rank, world_size), ": need one send and one recv count per rank, got ",
        send_counts.size(), " and ", recv_counts.size()));
  }
  for (int p = 0; p < world_size; ++p) {
    if (send_counts[p] < 0 || recv_counts[p] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(OpContext(op, rank, world_size), ": negative count for peer ", p));
    }
  }
  if (send_counts[rank] != recv_counts[rank]) {
    return absl::InvalidArgumentError(
        absl::StrCat(OpContext(op, rank, world_size), ": self send count ", send_counts[rank],
                     " differs from self recv count ", recv_counts[rank]));
  }
  return absl::OkStatus();
}

absl::Status ValidateRoot(CollectiveOp op, int rank, int world_size, int root) {
  if (root < 0 || root >= world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat(OpContext(op, rank, world_size), ": root ", root, " out of range"));
  }
  return absl::OkStatus();
}

absl::Status ValidateReducible(CollectiveOp op, int rank, DType dtype) {
  switch (dtype) {
    case DType::kF32:
    case DType::kBF16:
    case DType::kI32:
    case DType::kI64:
      return absl::OkStatus();
    case DType::kF16:
      break;
  }
  return absl::InvalidArgumentError(absl::StrCat(CollectiveOpName(op), " on rank ", rank,
                                                 ": sum is not supported for ", DTypeName(dtype)));
}

void AccumulateSum(DType dtype, void* dst, const void* src, size_t count) {
  switch (dtype) {
    case DType::kF32:
      return AddInto<float>(dst, src, count);
    case DType::kBF16:
      return AddIntoBf16(dst, src, count);
    case DType::kI32:
      return AddInto<int32_t>(dst, src, count);
    case DType::kI64:
      return AddInto<int64_t>(dst, src, count);
    case DType::kF16:
      break;
  }
  LOG(FATAL) << "AccumulateSum: unsupported dtype " << DTypeName(dtype);
}

void CountTraffic(CollectiveOp op, int rank, int world_size, size_t count, DType dtype,
                  absl::Span<const int64_t> send_counts, int root, TrafficCounters* counters) {
  const uint64_t elem = DTypeSize(dtype);
  const uint64_t peers = static_cast<uint64_t>(world_size - 1);
  uint64_t bytes = 0;
  switch (op) {
    case CollectiveOp::kAllReduce: {
      if (world_size > 1) {
        const uint64_t own =
            static_cast<uint64_t>(SplitEvenly(static_cast<int64_t>(count), world_size, rank).size);
        // Reduce-scatter sends everything but the own shard; all-gather sends the own shard to
        // every peer.
        bytes = (count - own) * elem + own * elem * peers;
      }
      break;
    }
    case CollectiveOp::kAllGather:
    case CollectiveOp::kReduceScatter:
      bytes = count * elem * peers;
      break;
    case CollectiveOp::kAllToAllV: {
      if (counters->all_to_all_bytes_to_peer.size() != static_cast<size_t>(world_size)) {
        counters->all_to_all_bytes_to_peer.assign(world_size, 0);
      }
      for (int p = 0; p < world_size; ++p) {
        if (p == rank) continue;
        const uint64_t b = static_cast<uint64_t>(send_counts[p]) * elem;
        counters->all_to_all_bytes_to_peer[p] += b;
        bytes += b;
      }
      break;
    }
    case CollectiveOp::kBroadcast:
      bytes = rank == root ? count * elem * peers : 0;
      break;
    case CollectiveOp::kBarrier:
      break;
  }
  counters->bytes_sent[static_cast<size_t>(op)] += bytes;
  counters->calls[static_cast<size_t>(op)] += 1;
}

absl::Status Communicator::EnqueueAllReduce(void*, size_t, DType, void*) {
  return absl::UnimplementedError(absl::StrCat(
      backend_name(), " communicator: no stream-ordered all-reduce (use AllReduce)"));
}

absl::Status Communicator::AwaitStream(void*) {
  return absl::UnimplementedError(
      absl::StrCat(backend_name(), " communicator: no stream-ordered collectives to await"));
}

absl::Status CommunicatorBase::Precheck(CollectiveOp op) const {
  if (dead_reason_.empty()) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat(error_prefix(), OpContext(op, rank_, world_size_),
                                             ": communicator is dead after: ", dead_reason_));
}

}  // namespace gemma::parallel
