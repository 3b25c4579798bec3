// The staging communicator over a real in-process group, with "device" memory played by a
// separate host arena whose addresses the memory space recognises. A checking layer between the
// wrapper and the group fails any call that hands the group a buffer of the wrong space, so the
// tests show both that results are right and that every foreign buffer was staged.
#include "worker/parallel/staging_communicator.h"

#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "glog/logging.h"
#include "gtest/gtest.h"
#include "tests/unit/parallel/collective_checks.h"
#include "worker/parallel/in_process_communicator.h"

namespace gemma::parallel {
namespace {

// "Device" memory: one arena; user buffers from its front, the two scratch slots from its back.
class ArenaSpace : public MemorySpace {
 public:
  explicit ArenaSpace(size_t bytes) : arena_(bytes) {}

  bool IsDevice(const void* ptr) const override {
    auto p = static_cast<const uint8_t*>(ptr);
    return p >= arena_.data() && p < arena_.data() + arena_.size();
  }
  absl::Status WaitForDevice() override {
    ++waits;
    return absl::OkStatus();
  }
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override {
    if (fail_copies) return absl::InternalError("copy failed (test)");
    if (!IsDevice(src) || IsDevice(dst)) return absl::InternalError("CopyToHost: wrong spaces");
    std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) override {
    if (fail_copies) return absl::InternalError("copy failed (test)");
    if (IsDevice(src) || !IsDevice(dst)) return absl::InternalError("CopyToDevice: wrong spaces");
    std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::StatusOr<void*> DeviceScratch(int slot, size_t bytes) override {
    const size_t half = arena_.size() / 4;  // two slots in the back half
    if (bytes > half) return absl::ResourceExhaustedError("scratch too small (test)");
    return arena_.data() + arena_.size() / 2 + slot * half;
  }
  // A user buffer of `n` Ts in "device" memory (front half, bump allocated).
  template <typename T>
  T* Alloc(size_t n) {
    const size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
    CHECK_LE(used_ + bytes, arena_.size() / 2);
    T* p = reinterpret_cast<T*>(arena_.data() + used_);
    used_ += bytes;
    return p;
  }

  int waits = 0;
  bool fail_copies = false;

 private:
  std::vector<uint8_t> arena_;
  size_t used_ = 0;
};

// Passes calls to `inner`, first checking that every buffer is in `want`'s memory.
class CheckingCommunicator : public ForwardingCommunicator {
 public:
  CheckingCommunicator(std::unique_ptr<Communicator> inner, const ArenaSpace* space,
                       CommunicatorMemory want)
      : ForwardingCommunicator(inner.get()), owned_(std::move(inner)), space_(space),
        want_(want) {}
  absl::Status AllReduce(void* data, size_t count, DType dtype) override {
    RETURN_IF_ERROR(Check(data, count));
    return inner().AllReduce(data, count, dtype);
  }
  absl::Status AllGather(const void* send, void* recv, size_t n, DType dtype) override {
    RETURN_IF_ERROR(Check(send, n));
    RETURN_IF_ERROR(Check(recv, n));
    return inner().AllGather(send, recv, n, dtype);
  }
  absl::Status ReduceScatter(const void* send, void* recv, size_t n, DType dtype) override {
    RETURN_IF_ERROR(Check(send, n));
    RETURN_IF_ERROR(Check(recv, n));
    return inner().ReduceScatter(send, recv, n, dtype);
  }
  absl::Status AllToAllV(const void* send, absl::Span<const int64_t> sc, void* recv,
                         absl::Span<const int64_t> rc, DType dtype) override {
    RETURN_IF_ERROR(Check(send, std::accumulate(sc.begin(), sc.end(), int64_t{0})));
    RETURN_IF_ERROR(Check(recv, std::accumulate(rc.begin(), rc.end(), int64_t{0})));
    return inner().AllToAllV(send, sc, recv, rc, dtype);
  }
  absl::Status Broadcast(void* data, size_t count, DType dtype, int root) override {
    RETURN_IF_ERROR(Check(data, count));
    return inner().Broadcast(data, count, dtype, root);
  }

 private:
  absl::Status Check(const void* ptr, int64_t count) const {
    if (count == 0) return absl::OkStatus();
    const bool device = space_->IsDevice(ptr);
    if (device != (want_ == CommunicatorMemory::kDevice)) {
      return absl::InternalError(absl::StrCat("the inner communicator got a ",
                                              device ? "device" : "host", " buffer"));
    }
    return absl::OkStatus();
  }
  std::unique_ptr<Communicator> owned_;
  const ArenaSpace* space_;
  CommunicatorMemory want_;
};

struct Rank {
  std::unique_ptr<ArenaSpace> space;
  StagingCounters counters;
  std::unique_ptr<Communicator> comm;
};

// One staged communicator per rank over an in-process group whose ranks take `inner` memory.
std::vector<Rank> MakeRanks(InProcessGroup& group, CommunicatorMemory inner) {
  std::vector<Rank> ranks(group.world_size());
  for (int r = 0; r < group.world_size(); ++r) {
    ranks[r].space = std::make_unique<ArenaSpace>(8 << 20);
    auto checked =
        std::make_unique<CheckingCommunicator>(group.communicator(r), ranks[r].space.get(), inner);
    ranks[r].comm =
        WrapWithStaging(std::move(checked), inner, ranks[r].space.get(), &ranks[r].counters);
  }
  return ranks;
}

std::vector<absl::Status> RunRanks(std::vector<Rank>& ranks,
                                   const std::function<absl::Status(int, Rank&)>& fn) {
  std::vector<absl::Status> statuses(ranks.size());
  std::vector<std::thread> threads;
  for (size_t r = 0; r < ranks.size(); ++r) {
    threads.emplace_back([&, r] { statuses[r] = fn(static_cast<int>(r), ranks[r]); });
  }
  for (std::thread& t : threads) t.join();
  return statuses;
}

class StagingTest : public ::testing::TestWithParam<int> {};

// A device-memory communicator (NCCL's case) given host buffers: the whole collective suite,
// every buffer staged to device scratch, results and traffic exact.
TEST_P(StagingTest, DeviceCommunicatorGetsHostBuffersStaged) {
  InProcessGroup group(GetParam(), std::chrono::seconds(10));
  std::vector<Rank> ranks = MakeRanks(group, CommunicatorMemory::kDevice);
  std::vector<absl::Status> statuses = RunRanks(ranks, [](int, Rank& rank) {
    return testing::RunAllCollectiveChecks(*rank.comm, 7, /*exact_f32=*/true);
  });
  for (size_t r = 0; r < ranks.size(); ++r) {
    EXPECT_TRUE(statuses[r].ok()) << "rank " << r << ": " << statuses[r];
    EXPECT_GT(ranks[r].counters.calls_staged, 0u);
    EXPECT_GT(ranks[r].counters.bytes_to_device, 0u);
    EXPECT_GT(ranks[r].counters.bytes_to_host, 0u);
    EXPECT_GT(ranks[r].space->waits, 0);  // waits for the device before every call
  }
}

// A host-memory communicator (Gloo's, the in-process group's) given device buffers, and mixes of
// device and host buffers as the model passes them.
TEST_P(StagingTest, HostCommunicatorGetsDeviceBuffersStaged) {
  const int world = GetParam();
  InProcessGroup group(world, std::chrono::seconds(10));
  std::vector<Rank> ranks = MakeRanks(group, CommunicatorMemory::kHost);
  std::vector<absl::Status> statuses = RunRanks(ranks, [world](int r, Rank& rank) -> absl::Status {
    ArenaSpace& dev = *rank.space;
    Communicator& comm = *rank.comm;
    // AllReduce in place on a device buffer.
    const size_t n = 1001;
    float* x = dev.Alloc<float>(n);
    for (size_t i = 0; i < n; ++i) x[i] = static_cast<float>(r + 1) * static_cast<float>(i);
    RETURN_IF_ERROR(comm.AllReduce(x, n, DType::kF32));
    const float ranks_sum = static_cast<float>(world * (world + 1) / 2);
    for (size_t i = 0; i < n; ++i) {
      if (x[i] != ranks_sum * static_cast<float>(i)) {
        return absl::InternalError(absl::StrCat("AllReduce element ", i, ": ", x[i]));
      }
    }
    // AllGather from a device buffer into a host vector (the sampler's case).
    int32_t* mine = dev.Alloc<int32_t>(3);
    for (int i = 0; i < 3; ++i) mine[i] = 100 * r + i;
    std::vector<int32_t> all(3 * world, -1);
    RETURN_IF_ERROR(comm.AllGather(mine, all.data(), 3, DType::kI32));
    for (int p = 0; p < world; ++p) {
      for (int i = 0; i < 3; ++i) {
        if (all[p * 3 + i] != 100 * p + i) return absl::InternalError("AllGather mismatch");
      }
    }
    // ReduceScatter device -> device.
    int64_t* send = dev.Alloc<int64_t>(2 * world);
    int64_t* recv = dev.Alloc<int64_t>(2);
    for (int i = 0; i < 2 * world; ++i) send[i] = i + r;
    RETURN_IF_ERROR(comm.ReduceScatter(send, recv, 2, DType::kI64));
    for (int i = 0; i < 2; ++i) {
      const int64_t want = world * (2 * r + i) + world * (world - 1) / 2;
      if (recv[i] != want) return absl::InternalError("ReduceScatter mismatch");
    }
    // AllToAllV with uneven and zero counts, host send into a device receive buffer: rank r
    // sends p elements to peer p, each r * 10 + p.
    std::vector<int64_t> send_counts(world), recv_counts(world);
    std::vector<float> a2a_send;
    for (int p = 0; p < world; ++p) {
      send_counts[p] = p;
      recv_counts[p] = r;
      for (int i = 0; i < p; ++i) a2a_send.push_back(static_cast<float>(r * 10 + p));
    }
    float* a2a_recv = dev.Alloc<float>(static_cast<size_t>(r) * world + 1);
    RETURN_IF_ERROR(comm.AllToAllV(a2a_send.data(), send_counts, a2a_recv, recv_counts,
                                   DType::kF32));
    for (int p = 0; p < world; ++p) {
      for (int i = 0; i < r; ++i) {
        if (a2a_recv[p * r + i] != static_cast<float>(p * 10 + r)) {
          return absl::InternalError("AllToAllV mismatch");
        }
      }
    }
    // Broadcast a device buffer from the last rank.
    float* b = dev.Alloc<float>(5);
    for (int i = 0; i < 5; ++i) b[i] = static_cast<float>(r == world - 1 ? 7 + i : -1);
    RETURN_IF_ERROR(comm.Broadcast(b, 5, DType::kF32, world - 1));
    for (int i = 0; i < 5; ++i) {
      if (b[i] != static_cast<float>(7 + i)) return absl::InternalError("Broadcast mismatch");
    }
    // All host buffers: passed straight through, nothing copied.
    const StagingCounters before = rank.counters;
    std::vector<float> h(4, 1.0f);
    RETURN_IF_ERROR(comm.AllReduce(h.data(), h.size(), DType::kF32));
    if (h[0] != static_cast<float>(world)) return absl::InternalError("host AllReduce mismatch");
    if (rank.counters.calls_staged != before.calls_staged ||
        rank.counters.bytes_to_host != before.bytes_to_host) {
      return absl::InternalError("a host-only call was staged");
    }
    return comm.Barrier();
  });
  for (size_t r = 0; r < ranks.size(); ++r) {
    EXPECT_TRUE(statuses[r].ok()) << "rank " << r << ": " << statuses[r];
    // AllReduce, AllGather, ReduceScatter, AllToAllV (when it receives) and Broadcast staged.
    EXPECT_EQ(ranks[r].counters.calls_staged, r == 0 ? 4u : 5u) << "rank " << r;
    EXPECT_EQ(ranks[r].space->waits, 0);  // a host communicator copies in stream order instead
  }
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, StagingTest, ::testing::Values(1, 2, 3));

TEST(StagingErrorsTest, CopyFailureIsReturnedAndInvalidCountsAreCaughtBeforeCopying) {
  InProcessGroup group(1, std::chrono::seconds(5));
  std::vector<Rank> ranks = MakeRanks(group, CommunicatorMemory::kHost);
  Rank& rank = ranks[0];
  float* x = rank.space->Alloc<float>(4);
  rank.space->fail_copies = true;
  absl::Status status = rank.comm->AllReduce(x, 4, DType::kF32);
  EXPECT_EQ(status.code(), absl::StatusCode::kInternal) << status;
  EXPECT_NE(status.message().find("copy failed"), std::string::npos) << status;

  rank.space->fail_copies = false;
  std::vector<int64_t> bad = {-3};
  status = rank.comm->AllToAllV(x, bad, x, bad, DType::kF32);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  std::vector<int64_t> short_counts;  // one count per rank is required
  status = rank.comm->AllToAllV(x, short_counts, x, short_counts, DType::kF32);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  status = rank.comm->Broadcast(x, 4, DType::kF32, 5);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  // The wrapper keeps the inner communicator's identity.
  EXPECT_STREQ(rank.comm->backend_name(), "in-process");
  EXPECT_EQ(MemoryOf(*rank.comm), CommunicatorMemory::kHost);
}

// Stream-ordered sums are never staged (that would need the host to wait): a buffer in the
// wrong memory is refused naming the fix, and one in the right memory reaches the inner
// communicator, which says when it has no stream-ordered sums (the in-process group has none).
TEST(StagingErrorsTest, StreamOrderedSumsAreNotStaged) {
  InProcessGroup group(1, std::chrono::seconds(5));
  std::vector<Rank> ranks = MakeRanks(group, CommunicatorMemory::kHost);
  Rank& rank = ranks[0];
  EXPECT_FALSE(rank.comm->SupportsStreamOrdered());
  float* on_device = rank.space->Alloc<float>(4);
  absl::Status status = rank.comm->EnqueueAllReduce(on_device, 4, DType::kF32, nullptr);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_NE(status.message().find("use AllReduce"), std::string::npos) << status;
  std::vector<float> on_host(4, 1.0f);
  status = rank.comm->EnqueueAllReduce(on_host.data(), 4, DType::kF32, nullptr);
  EXPECT_EQ(status.code(), absl::StatusCode::kUnimplemented) << status;
  EXPECT_NE(status.message().find("in-process"), std::string::npos) << status;
  EXPECT_EQ(rank.comm->AwaitStream(nullptr).code(), absl::StatusCode::kUnimplemented);
  EXPECT_EQ(rank.space->waits, 0) << "a stream-ordered call waited for the device";
  EXPECT_EQ(rank.counters.calls_staged, 0u);
}

}  // namespace
}  // namespace gemma::parallel
