#include "worker/parallel/in_process_communicator.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "glog/logging.h"
#include "worker/parallel/world_config.h"

namespace gemma::parallel {

namespace {

using Clock = std::chrono::steady_clock;

// What a rank contributes to one rendezvous round.
struct Post {
  CollectiveOp op = CollectiveOp::kBarrier;
  DType dtype = DType::kF32;
  size_t count = 0;
  int root = 0;
  const void* ptr = nullptr;
  const int64_t* counts = nullptr;  // AllToAllV send counts, [world_size]
};

}  // namespace

class InProcessGroupState {
 public:
  explicit InProcessGroupState(int world_size)
      : world_size_(world_size),
        arrived_flags_(world_size, false),
        posts_{std::vector<Post>(world_size), std::vector<Post>(world_size)} {}

  // Posts `mine` for the current round, waits until every rank has posted, and copies all posts
  // into `all`. On timeout aborts the group with DEADLINE_EXCEEDED naming the missing ranks.
  absl::Status Exchange(int rank, const Post& mine, Clock::time_point deadline,
                        std::chrono::milliseconds timeout, std::vector<Post>* all) {
    std::unique_lock<std::mutex> lock(mu_);
    if (aborted_) return AbortedStatus(rank);
    const uint64_t generation = generation_;
    std::vector<Post>& slots = posts_[generation & 1];
    slots[rank] = mine;
    arrived_flags_[rank] = true;
    if (++arrived_ == world_size_) {
      arrived_ = 0;
      std::fill(arrived_flags_.begin(), arrived_flags_.end(), false);
      ++generation_;
      cv_.notify_all();
    } else {
      const bool woke =
          cv_.wait_until(lock, deadline, [&] { return generation_ != generation || aborted_; });
      if (generation_ == generation) {
        if (!woke && !aborted_) {
          std::vector<int> missing;
          for (int p = 0; p < world_size_; ++p) {
            if (!arrived_flags_[p]) missing.push_back(p);
          }
          aborted_ = true;
          abort_code_ = absl::StatusCode::kDeadlineExceeded;
          abort_reason_ = absl::StrCat(OpContext(mine.op, rank, world_size_), " timed out after ",
                                       timeout.count(), " ms waiting for rank(s) [",
                                       absl::StrJoin(missing, ","), "]");
          cv_.notify_all();
          return absl::DeadlineExceededError(abort_reason_);
        }
        return AbortedStatus(rank);
      }
    }
    *all = slots;
    return absl::OkStatus();
  }

  void Abort(absl::string_view reason) {
    std::lock_guard<std::mutex> lock(mu_);
    if (aborted_) return;
    aborted_ = true;
    abort_code_ = absl::StatusCode::kUnavailable;
    abort_reason_ = std::string(reason);
    cv_.notify_all();
  }

 private:
  absl::Status AbortedStatus(int rank) const {
    return absl::Status(abort_code_, absl::StrCat("in-process group aborted (seen by rank ", rank,
                                                  "): ", abort_reason_));
  }

  const int world_size_;
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t generation_ = 0;
  int arrived_ = 0;
  std::vector<bool> arrived_flags_;
  // Double-buffered by generation parity: a rank cannot post round g+2 before every rank has
  // posted round g+1, which each does only after copying round g.
  std::vector<Post> posts_[2];
  bool aborted_ = false;
  absl::StatusCode abort_code_ = absl::StatusCode::kUnavailable;
  std::string abort_reason_;
};

namespace {

class InProcessCommunicator : public CommunicatorBase {
 public:
  InProcessCommunicator(std::shared_ptr<InProcessGroupState> state, int rank, int world_size,
                        std::chrono::milliseconds timeout)
      : CommunicatorBase(rank, world_size), state_(std::move(state)), timeout_(timeout) {}

  const char* backend_name() const override { return "in-process"; }

  absl::Status AllReduce(void* data, size_t count, DType dtype) override {
    const CollectiveOp op = CollectiveOp::kAllReduce;
    RETURN_IF_ERROR(Precheck(op));
    RETURN_IF_ERROR(ValidateReducible(op, rank_, dtype));
    const Clock::time_point deadline = Clock::now() + timeout_;
    const size_t elem = DTypeSize(dtype);
    std::vector<Post> all;
    RETURN_IF_ERROR(Round(MakePost(op, dtype, count, data), deadline, &all));
    // Reduce-scatter: this rank sums its shard over ranks, in rank order.
    const ShardRange own = SplitEvenly(static_cast<int64_t>(count), world_size_, rank_);
    std::vector<uint8_t> reduced(own.size * elem);
    for (int p = 0; p < world_size_; ++p) {
      const uint8_t* src = static_cast<const uint8_t*>(all[p].ptr) + own.offset * elem;
      if (p == 0) {
        if (!reduced.empty()) std::memcpy(reduced.data(), src, reduced.size());
      } else {
        AccumulateSum(dtype, reduced.data(), src, own.size);
      }
    }
    // All-gather: every rank has finished reading the inputs once it posts again.
    RETURN_IF_ERROR(Round(MakePost(op, dtype, count, reduced.data()), deadline, &all));
    for (int p = 0; p < world_size_; ++p) {
      const ShardRange shard = SplitEvenly(static_cast<int64_t>(count), world_size_, p);
      if (shard.size == 0) continue;
      std::memcpy(static_cast<uint8_t*>(data) + shard.offset * elem, all[p].ptr, shard.size * elem);
    }
    RETURN_IF_ERROR(Round(MakePost(op, dtype, count, nullptr), deadline, &all));
    return Done(op, count, dtype, {}, 0);
  }

  absl::Status AllGather(const void* send, void* recv, size_t send_count, DType dtype) override {
    const CollectiveOp op = CollectiveOp::kAllGather;
    RETURN_IF_ERROR(Precheck(op));
    const Clock::time_point deadline = Clock::now() + timeout_;
    const size_t block = send_count * DTypeSize(dtype);
    std::vector<Post> all;
    RETURN_IF_ERROR(Round(MakePost(op, dtype, send_count, send), deadline, &all));
    for (int p = 0; p < world_size_; ++p) {
      if (block > 0) std::memcpy(static_cast<uint8_t*>(recv) + p * block, all[p].ptr, block);
    }
    RETURN_IF_ERROR(Round(MakePost(op, dtype, send_count, nullptr), deadline, &all));
    return Done(op, send_count, dtype, {}, 0);
  }

  absl::Status ReduceScatter(const void* send, void* recv, size_t recv_count,
                             DType dtype) override {
    const CollectiveOp op = CollectiveOp::kReduceScatter;
    RETURN_IF_ERROR(Precheck(op));
    RETURN_IF_ERROR(ValidateReducible(op, rank_, dtype));
    const Clock::time_point deadline = Clock::now() + timeout_;
    const size_t block = recv_count * DTypeSize(dtype);
    std::vector<Post> all;
    RETURN_IF_ERROR(Round(MakePost(op, dtype, recv_count, send), deadline, &all));
    for (int p = 0; p < world_size_; ++p) {
      const uint8_t* src = static_cast<const uint8_t*>(all[p].ptr) + rank_ * block;
      if (p == 0) {
        if (block > 0) std::memcpy(recv, src, block);
      } else {
        AccumulateSum(dtype, recv, src, recv_count);
      }
    }
    RETURN_IF_ERROR(Round(MakePost(op, dtype, recv_count, nullptr), deadline, &all));
    return Done(op, recv_count, dtype, {}, 0);
  }

  absl::Status AllToAllV(const void* send, absl::Span<const int64_t> send_counts, void* recv,
                         absl::Span<const int64_t> recv_counts, DType dtype) override {
    const CollectiveOp op = CollectiveOp::kAllToAllV;
    RETURN_IF_ERROR(Precheck(op));
    RETURN_IF_ERROR(ValidateAllToAllCounts(op, rank_, world_size_, send_counts, recv_counts));
    const Clock::time_point deadline = Clock::now() + timeout_;
    const size_t elem = DTypeSize(dtype);
    Post mine = MakePost(op, dtype, 0, send);
    mine.counts = send_counts.data();
    std::vector<Post> all;
    RETURN_IF_ERROR(Round(mine, deadline, &all));
    absl::Status mismatch;
    size_t recv_offset = 0;
    for (int p = 0; p < world_size_; ++p) {
      const int64_t* peer_counts = all[p].counts;
      if (peer_counts[rank_] != recv_counts[p]) {
        mismatch = absl::InvalidArgumentError(
            absl::StrCat(OpContext(op, rank_, world_size_), ": expects ", recv_counts[p],
                         " elements from rank ", p, " which sends ", peer_counts[rank_]));
        break;
      }
      int64_t send_offset = 0;
      for (int q = 0; q < rank_; ++q) send_offset += peer_counts[q];
      const size_t bytes = static_cast<size_t>(recv_counts[p]) * elem;
      if (bytes > 0) {
        std::memcpy(static_cast<uint8_t*>(recv) + recv_offset,
                    static_cast<const uint8_t*>(all[p].ptr) + send_offset * elem, bytes);
      }
      recv_offset += bytes;
    }
    // Always finish the round so peers are not left waiting for this rank.
    RETURN_IF_ERROR(Round(MakePost(op, dtype, 0, nullptr), deadline, &all));
    if (!mismatch.ok()) return Fail(mismatch);
    return Done(op, 0, dtype, send_counts, 0);
  }

  absl::Status Broadcast(void* data, size_t count, DType dtype, int root) override {
    const CollectiveOp op = CollectiveOp::kBroadcast;
    RETURN_IF_ERROR(Precheck(op));
    RETURN_IF_ERROR(ValidateRoot(op, rank_, world_size_, root));
    const Clock::time_point deadline = Clock::now() + timeout_;
    Post mine = MakePost(op, dtype, count, data);
    mine.root = root;
    std::vector<Post> all;
    RETURN_IF_ERROR(Round(mine, deadline, &all));
    if (rank_ != root && count > 0) {
      std::memcpy(data, all[root].ptr, count * DTypeSize(dtype));
    }
    mine.ptr = nullptr;
    RETURN_IF_ERROR(Round(mine, deadline, &all));
    return Done(op, count, dtype, {}, root);
  }

  absl::Status Barrier() override {
    const CollectiveOp op = CollectiveOp::kBarrier;
    RETURN_IF_ERROR(Precheck(op));
    std::vector<Post> all;
    RETURN_IF_ERROR(Round(MakePost(op, DType::kF32, 0, nullptr), Clock::now() + timeout_, &all));
    return Done(op, 0, DType::kF32, {}, 0);
  }

 private:
  static Post MakePost(CollectiveOp op, DType dtype, size_t count, const void* ptr) {
    Post post;
    post.op = op;
    post.dtype = dtype;
    post.count = count;
    post.ptr = ptr;
    return post;
  }

  absl::Status Fail(absl::Status status) {
    if (dead_reason_.empty()) dead_reason_ = status.ToString();
    return status;
  }

  // One rendezvous round, plus the check that every rank is in the same collective.
  absl::Status Round(const Post& mine, Clock::time_point deadline, std::vector<Post>* all) {
    absl::Status status = state_->Exchange(rank_, mine, deadline, timeout_, all);
    if (!status.ok()) return Fail(status);
    for (int p = 0; p < world_size_; ++p) {
      const Post& other = (*all)[p];
      if (other.op != mine.op || other.dtype != mine.dtype || other.count != mine.count ||
          other.root != mine.root) {
        absl::Status mismatch = absl::InternalError(
            absl::StrCat("collective mismatch: rank ", rank_, " called ", CollectiveOpName(mine.op),
                         "(", DTypeName(mine.dtype), " x", mine.count, ", root ", mine.root,
                         ") but rank ", p, " called ", CollectiveOpName(other.op), "(",
                         DTypeName(other.dtype), " x", other.count, ", root ", other.root, ")"));
        state_->Abort(mismatch.message());
        return Fail(mismatch);
      }
    }
    return absl::OkStatus();
  }

  absl::Status Done(CollectiveOp op, size_t count, DType dtype,
                    absl::Span<const int64_t> send_counts, int root) {
    CountTraffic(op, rank_, world_size_, count, dtype, send_counts, root, &traffic_);
    return absl::OkStatus();
  }

  std::shared_ptr<InProcessGroupState> state_;
  const std::chrono::milliseconds timeout_;
};

}  // namespace

InProcessGroup::InProcessGroup(int world_size, std::chrono::milliseconds timeout)
    : world_size_(world_size),
      timeout_(timeout),
      state_(std::make_shared<InProcessGroupState>(world_size)) {
  CHECK_GT(world_size, 0) << "InProcessGroup needs at least one rank";
}

InProcessGroup::~InProcessGroup() = default;

std::unique_ptr<Communicator> InProcessGroup::communicator(int rank) {
  CHECK(rank >= 0 && rank < world_size_) << "rank " << rank << " of " << world_size_;
  return std::make_unique<InProcessCommunicator>(state_, rank, world_size_, timeout_);
}

void InProcessGroup::Abort(absl::string_view reason) { state_->Abort(reason); }

}  // namespace gemma::parallel
