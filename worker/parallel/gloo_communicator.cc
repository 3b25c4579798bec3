#include "worker/parallel/gloo_communicator.h"

#include <csignal>
#include <cstring>
#include <exception>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "glog/logging.h"
#include "gloo/allgather.h"
#include "gloo/allreduce.h"
#include "gloo/alltoallv.h"
#include "gloo/barrier.h"
#include "gloo/broadcast.h"
#include "gloo/common/error.h"
#include "gloo/common/logging.h"
#include "gloo/rendezvous/context.h"
#include "gloo/rendezvous/prefix_store.h"
#include "gloo/transport/tcp/device.h"

namespace gemma::parallel {
namespace {

// The one place Gloo exceptions become a Status. `what` names the operation and rank.
template <typename Fn>
absl::Status CallGloo(const std::string& what, Fn&& fn) {
  try {
    fn();
    return absl::OkStatus();
  } catch (const gloo::IoException& e) {
    const bool timed_out = absl::StrContains(e.what(), "Timed out") ||
                           absl::StrContains(e.what(), "timed out") ||
                           absl::StrContains(e.what(), "not set within");
    const std::string message = absl::StrCat(what, " failed: ", e.what());
    return timed_out ? absl::DeadlineExceededError(message) : absl::UnavailableError(message);
  } catch (const gloo::EnforceNotMet& e) {
    return absl::InternalError(absl::StrCat(what, ": Gloo check failed: ", e.what()));
  } catch (const gloo::Exception& e) {
    return absl::UnavailableError(absl::StrCat(what, " failed: ", e.what()));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(what, " failed: ", e.what()));
  } catch (...) {
    return absl::InternalError(absl::StrCat(what, " failed with an unknown exception"));
  }
}

// out[i] = a[i] + b[i], the shape Gloo's reduce functions take.
template <typename T>
void SumInto(void* out, const void* a, const void* b, size_t n) {
  T* o = static_cast<T*>(out);
  const T* x = static_cast<const T*>(a);
  const T* y = static_cast<const T*>(b);
  for (size_t i = 0; i < n; ++i) o[i] = x[i] + y[i];
}

void SumIntoBf16(void* out, const void* a, const void* b, size_t n) {
  uint16_t* o = static_cast<uint16_t*>(out);
  const uint16_t* x = static_cast<const uint16_t*>(a);
  const uint16_t* y = static_cast<const uint16_t*>(b);
  for (size_t i = 0; i < n; ++i) o[i] = F32ToBf16(Bf16ToF32(x[i]) + Bf16ToF32(y[i]));
}

class GlooCommunicator : public CommunicatorBase {
 public:
  GlooCommunicator(std::shared_ptr<gloo::Context> context, const GlooOptions& options)
      : CommunicatorBase(options.rank, options.world_size),
        context_(std::move(context)),
        timeout_(options.timeout) {}

  const char* error_prefix() const override { return "Gloo "; }
  const char* backend_name() const override { return "gloo"; }

  absl::Status AllReduce(void* data, size_t count, DType dtype) override {
    const CollectiveOp op = CollectiveOp::kAllReduce;
    RETURN_IF_ERROR(Precheck(op));
    RETURN_IF_ERROR(ValidateReducible(op, rank_, dtype));
    if (count > 0 && world_size_ > 1) {
      RETURN_IF_ERROR(Run(op, [&] {
        gloo::AllreduceOptions opts(context_);
        switch (dtype) {
          case DType::kF32:
            opts.setOutput(static_cast<float*>(data), count);
            opts.setReduceFunction(&SumInto<float>);
            break;
          case DType::kI32:
            opts.setOutput(static_cast<int32_t*>(data), count);
            opts.setReduceFunction(&SumInto<int32_t>);
            break;
          case DType::kI64:
            opts.setOutput(static_cast<int64_t*>(data), count);
            opts.setReduceFunction(&SumInto<int64_t>);
            break;
          default:  // BF16; F16 was rejected above.
            opts.setOutput(static_cast<uint16_t*>(data), count);
            opts.setReduceFunction(&SumIntoBf16);
            break;
        }
        opts.setTag(NextTag());
        opts.setTimeout(timeout_);
        gloo::allreduce(opts);
      }));
    }
    return Done(op, count, dtype, {}, 0);
  }

  absl::Status AllGather(const void* send, void* recv, size_t send_count, DType dtype) override {
    const CollectiveOp op = CollectiveOp::kAllGather;
    RETURN_IF_ERROR(Precheck(op));
    const size_t bytes = send_count * DTypeSize(dtype);
    if (bytes > 0) {
      RETURN_IF_ERROR(Run(op, [&] {
        gloo::AllgatherOptions opts(context_);
        opts.setInput(static_cast<uint8_t*>(const_cast<void*>(send)), bytes);
        opts.setOutput(static_cast<uint8_t*>(recv), bytes * world_size_);
        opts.setTag(NextTag());
        opts.setTimeout(timeout_);
        gloo::allgather(opts);
      }));
    }
    return Done(op, send_count, dtype, {}, 0);
  }

  absl::Status ReduceScatter(const void* send, void* recv, size_t recv_count,
                             DType dtype) override {
    const CollectiveOp op = CollectiveOp::kReduceScatter;
    RETURN_IF_ERROR(Precheck(op));
    RETURN_IF_ERROR(ValidateReducible(op, rank_, dtype));
    const size_t block = recv_count * DTypeSize(dtype);
    if (block > 0) {
      // Every rank sends block p to rank p, then sums what it received in rank order.
      std::vector<uint8_t> gathered(block * world_size_);
      std::vector<int64_t> lengths(world_size_, static_cast<int64_t>(block));
      RETURN_IF_ERROR(ExchangeBytes(op, send, lengths, gathered.data(), lengths));
      std::memcpy(recv, gathered.data(), block);
      for (int p = 1; p < world_size_; ++p) {
        AccumulateSum(dtype, recv, gathered.data() + p * block, recv_count);
      }
    }
    return Done(op, recv_count, dtype, {}, 0);
  }

  absl::Status AllToAllV(const void* send, absl::Span<const int64_t> send_counts, void* recv,
                         absl::Span<const int64_t> recv_counts, DType dtype) override {
    const CollectiveOp op = CollectiveOp::kAllToAllV;
    RETURN_IF_ERROR(Precheck(op));
    RETURN_IF_ERROR(ValidateAllToAllCounts(op, rank_, world_size_, send_counts, recv_counts));
    const int64_t elem = static_cast<int64_t>(DTypeSize(dtype));
    std::vector<int64_t> send_bytes(world_size_), recv_bytes(world_size_);
    for (int p = 0; p < world_size_; ++p) {
      send_bytes[p] = send_counts[p] * elem;
      recv_bytes[p] = recv_counts[p] * elem;
    }
    RETURN_IF_ERROR(ExchangeBytes(op, send, send_bytes, recv, recv_bytes));
    return Done(op, 0, dtype, send_counts, 0);
  }

  absl::Status Broadcast(void* data, size_t count, DType dtype, int root) override {
    const CollectiveOp op = CollectiveOp::kBroadcast;
    RETURN_IF_ERROR(Precheck(op));
    RETURN_IF_ERROR(ValidateRoot(op, rank_, world_size_, root));
    const size_t bytes = count * DTypeSize(dtype);
    if (bytes > 0 && world_size_ > 1) {
      RETURN_IF_ERROR(Run(op, [&] {
        gloo::BroadcastOptions opts(context_);
        opts.setOutput(static_cast<uint8_t*>(data), bytes);
        opts.setRoot(root);
        opts.setTag(NextTag());
        opts.setTimeout(timeout_);
        gloo::broadcast(opts);
      }));
    }
    return Done(op, count, dtype, {}, root);
  }

  absl::Status Barrier() override {
    const CollectiveOp op = CollectiveOp::kBarrier;
    RETURN_IF_ERROR(Precheck(op));
    if (world_size_ > 1) {
      RETURN_IF_ERROR(Run(op, [&] {
        gloo::BarrierOptions opts(context_);
        opts.setTag(NextTag());
        opts.setTimeout(timeout_);
        gloo::barrier(opts);
      }));
    }
    return Done(op, 0, DType::kF32, {}, 0);
  }

 private:
  // Gloo's alltoallv over bytes. Zero-length sides get a one-byte stand-in buffer so Gloo never
  // sees a null pointer.
  absl::Status ExchangeBytes(CollectiveOp op, const void* send,
                             const std::vector<int64_t>& send_bytes, void* recv,
                             const std::vector<int64_t>& recv_bytes) {
    int64_t total_send = 0, total_recv = 0;
    for (int p = 0; p < world_size_; ++p) {
      total_send += send_bytes[p];
      total_recv += recv_bytes[p];
    }
    // Every rank takes part (and takes a tag) even with nothing to move: ranks' tag counters
    // must stay in step, or the next collective pairs up the wrong messages.
    uint8_t dummy_send = 0, dummy_recv = 0;
    uint8_t* send_ptr =
        total_send > 0 ? static_cast<uint8_t*>(const_cast<void*>(send)) : &dummy_send;
    uint8_t* recv_ptr = total_recv > 0 ? static_cast<uint8_t*>(recv) : &dummy_recv;
    return Run(op, [&] {
      gloo::AlltoallvOptions opts(context_);
      opts.setInput(send_ptr, send_bytes);
      opts.setOutput(recv_ptr, recv_bytes);
      opts.setTag(NextTag());
      opts.setTimeout(timeout_);
      gloo::alltoallv(opts);
    });
  }

  uint32_t NextTag() { return next_tag_++; }

  template <typename Fn>
  absl::Status Run(CollectiveOp op, Fn&& fn) {
    absl::Status status = CallGloo(absl::StrCat("Gloo ", OpContext(op, rank_, world_size_),
                                                " (timeout ", timeout_.count(), " ms)"),
                                   std::forward<Fn>(fn));
    if (!status.ok()) {
      dead_reason_ = status.ToString();
      LOG(ERROR) << "rank " << rank_ << ": " << status;
    }
    return status;
  }

  absl::Status Done(CollectiveOp op, size_t count, DType dtype,
                    absl::Span<const int64_t> send_counts, int root) {
    CountTraffic(op, rank_, world_size_, count, dtype, send_counts, root, &traffic_);
    return absl::OkStatus();
  }

  std::shared_ptr<gloo::Context> context_;
  const std::chrono::milliseconds timeout_;
  uint32_t next_tag_ = 1;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> CreateGlooCommunicator(
    const GlooOptions& options, gloo::rendezvous::Store& store) {
  if (options.world_size <= 0 || options.rank < 0 || options.rank >= options.world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("Gloo: rank ", options.rank, " invalid for world_size ", options.world_size));
  }
  if (options.hostname.empty() && options.interface.empty()) {
    return absl::InvalidArgumentError("Gloo: set a hostname/address or an interface name");
  }
  if (options.timeout.count() <= 0) {
    return absl::InvalidArgumentError("Gloo: timeout must be positive");
  }
  // Gloo's TCP pairs write with writev, without MSG_NOSIGNAL: once a peer has died, the next
  // write would kill this process with SIGPIPE instead of failing the collective with
  // UNAVAILABLE. A process that joins a Gloo group therefore ignores SIGPIPE (every write in
  // this project checks its result).
  static const bool sigpipe_ignored = [] {
    signal(SIGPIPE, SIG_IGN);
    return true;
  }();
  (void)sigpipe_ignored;
  std::shared_ptr<gloo::rendezvous::Context> context;
  const std::string what = absl::StrCat("Gloo rendezvous of rank ", options.rank, " of ",
                                        options.world_size, " (prefix \"", options.key_prefix,
                                        "\", timeout ", options.timeout.count(), " ms)");
  RETURN_IF_ERROR(CallGloo(what, [&] {
    gloo::transport::tcp::attr attr;
    if (!options.hostname.empty()) {
      attr.hostname = options.hostname;
    } else {
      attr.iface = options.interface;
    }
    std::shared_ptr<gloo::transport::Device> device = gloo::transport::tcp::CreateDevice(attr);
    context = std::make_shared<gloo::rendezvous::Context>(options.rank, options.world_size);
    context->setTimeout(options.timeout);
    gloo::rendezvous::PrefixStore prefixed(options.key_prefix, store);
    context->connectFullMesh(prefixed, device);
  }));
  VLOG(1) << "rank " << options.rank << ": Gloo group of " << options.world_size << " joined";
  return std::unique_ptr<Communicator>(new GlooCommunicator(context, options));
}

}  // namespace gemma::parallel
