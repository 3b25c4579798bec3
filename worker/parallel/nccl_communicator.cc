#include "worker/parallel/nccl_communicator.h"

#include "absl/strings/str_cat.h"
#include "worker/parallel/parallel_config.h"
#include "worker/parallel/rendezvous.h"

#if GEMMA_HAVE_NCCL

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstring>
#include <thread>
#include <vector>

#include "common/status_macros.h"
#include "glog/logging.h"

namespace gemma::parallel {
namespace {

using Clock = std::chrono::steady_clock;

ncclDataType_t ToNccl(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return ncclFloat32;
    case DType::kBF16:
      return ncclBfloat16;
    case DType::kF16:
      return ncclFloat16;
    case DType::kI32:
      return ncclInt32;
    case DType::kI64:
      return ncclInt64;
  }
  return ncclFloat32;
}

absl::Status CudaStatus(cudaError_t err, absl::string_view what) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat(what, ": ", cudaGetErrorString(err)));
}

// Polls a non-blocking communicator until its pending work (initialisation, an enqueue, or
// finalisation) leaves ncclInProgress, or until `deadline`.
absl::Status WaitNotInProgress(ncclComm_t comm, Clock::time_point deadline,
                               const std::string& what) {
  for (;;) {
    ncclResult_t state = ncclSuccess;
    ncclResult_t rc = ncclCommGetAsyncError(comm, &state);
    if (rc != ncclSuccess) state = rc;
    if (state == ncclSuccess) return absl::OkStatus();
    if (state != ncclInProgress) {
      return absl::UnavailableError(
          absl::StrCat(what, ": ", ncclGetErrorString(state), " (", ncclGetLastError(comm), ")"));
    }
    if (Clock::now() > deadline) {
      return absl::DeadlineExceededError(absl::StrCat(what, ": still in progress at the deadline"));
    }
    std::this_thread::yield();
  }
}

class NcclCommunicator : public CommunicatorBase {
 public:
  NcclCommunicator(ncclComm_t comm, cudaStream_t stream, int32_t* scratch,
                   const NcclOptions& options)
      : CommunicatorBase(options.rank, options.world_size),
        comm_(comm),
        stream_(stream),
        scratch_(scratch),
        timeout_(options.timeout) {}

  ~NcclCommunicator() override {
    if (comm_aborted_) {
      // Already aborted (on a failure, or by Abort()).
    } else if (dead_reason_.empty()) {
      ncclCommFinalize(comm_);
      if (!WaitNotInProgress(comm_, Clock::now() + timeout_, "ncclCommFinalize").ok()) {
        ncclCommAbort(comm_);
      } else {
        ncclCommDestroy(comm_);
      }
    } else {
      ncclCommAbort(comm_);
    }
    cudaStreamDestroy(stream_);
    cudaFree(scratch_);
  }

  const char* error_prefix() const override { return "NCCL "; }
  const char* backend_name() const override { return "nccl"; }

  absl::Status AllReduce(void* data, size_t count, DType dtype) override {
    const CollectiveOp op = CollectiveOp::kAllReduce;
    RETURN_IF_ERROR(Precheck(op));
    RETURN_IF_ERROR(ValidateReducible(op, rank_, dtype));
    RETURN_IF_ERROR(
        Run(op, ncclAllReduce(data, data, count, ToNccl(dtype), ncclSum, comm_, stream_)));
    return Done(op, count, dtype, {}, 0);
  }

  absl::Status AllGather(const void* send, void* recv, size_t send_count, DType dtype) override {
    const CollectiveOp op = CollectiveOp::kAllGather;
    RETURN_IF_ERROR(Precheck(op));
    RETURN_IF_ERROR(Run(op, ncclAllGather(send, recv, send_count, ToNccl(dtype), comm_, stream_)));
    return Done(op, send_count, dtype, {}, 0);
  }

  absl::Status ReduceScatter(const void* send, void* recv, size_t recv_count,
                             DType dtype) override {
    const CollectiveOp op = CollectiveOp::kReduceScatter;
    RETURN_IF_ERROR(Precheck(op));
    RETURN_IF_ERROR(ValidateReducible(op, rank_, dtype));
    RETURN_IF_ERROR(
        Run(op, ncclReduceScatter(send, recv, recv_count, ToNccl(dtype), ncclSum, comm_, stream_)));
    return Done(op, recv_count, dtype, {}, 0);
  }

  absl::Status AllToAllV(const void* send, absl::Span<const int64_t> send_counts, void* recv,
                         absl::Span<const int64_t> recv_counts, DType dtype) override {
    const CollectiveOp op = CollectiveOp::kAllToAllV;
    RETURN_IF_ERROR(Precheck(op));
    RETURN_IF_ERROR(ValidateAllToAllCounts(op, rank_, world_size_, send_counts, recv_counts));
    const size_t elem = DTypeSize(dtype);
    const ncclDataType_t type = ToNccl(dtype);
    ncclResult_t rc = ncclGroupStart();
    size_t send_offset = 0, recv_offset = 0;
    for (int p = 0; p < world_size_ && (rc == ncclSuccess || rc == ncclInProgress); ++p) {
      if (send_counts[p] > 0) {
        rc = ncclSend(static_cast<const uint8_t*>(send) + send_offset * elem, send_counts[p], type,
                      p, comm_, stream_);
      }
      if (recv_counts[p] > 0 && (rc == ncclSuccess || rc == ncclInProgress)) {
        rc = ncclRecv(static_cast<uint8_t*>(recv) + recv_offset * elem, recv_counts[p], type, p,
                      comm_, stream_);
      }
      send_offset += static_cast<size_t>(send_counts[p]);
      recv_offset += static_cast<size_t>(recv_counts[p]);
    }
    ncclResult_t end = ncclGroupEnd();
    RETURN_IF_ERROR(Run(op, rc == ncclSuccess || rc == ncclInProgress ? end : rc));
    return Done(op, 0, dtype, send_counts, 0);
  }

  absl::Status Broadcast(void* data, size_t count, DType dtype, int root) override {
    const CollectiveOp op = CollectiveOp::kBroadcast;
    RETURN_IF_ERROR(Precheck(op));
    RETURN_IF_ERROR(ValidateRoot(op, rank_, world_size_, root));
    RETURN_IF_ERROR(Run(op, ncclBroadcast(data, data, count, ToNccl(dtype), root, comm_, stream_)));
    return Done(op, count, dtype, {}, root);
  }

  absl::Status Barrier() override {
    const CollectiveOp op = CollectiveOp::kBarrier;
    RETURN_IF_ERROR(Precheck(op));
    RETURN_IF_ERROR(
        Run(op, ncclAllReduce(scratch_, scratch_, 1, ncclInt32, ncclSum, comm_, stream_)));
    return Done(op, 0, DType::kF32, {}, 0);
  }

  bool SupportsStreamOrdered() const override { return true; }

  // On the caller's stream: inside a stream capture NCCL records the collective into the graph
  // instead of launching it. Only the enqueue is waited for (a non-blocking communicator may
  // answer ncclInProgress), never the work.
  absl::Status EnqueueAllReduce(void* data, size_t count, DType dtype, void* stream) override {
    const CollectiveOp op = CollectiveOp::kAllReduce;
    RETURN_IF_ERROR(Precheck(op));
    RETURN_IF_ERROR(ValidateReducible(op, rank_, dtype));
    if (count == 0) return absl::OkStatus();
    const std::string what = absl::StrCat("NCCL stream-ordered ", OpContext(op, rank_, world_size_));
    stream_ordered_ = true;  // a step graph may hold this collective from now on
    absl::Status status = Enqueued(
        what,
        ncclAllReduce(data, data, count, ToNccl(dtype), ncclSum, comm_,
                      static_cast<cudaStream_t>(stream)),
        Clock::now() + timeout_);
    if (!status.ok()) return Fail(status);
    return Done(op, count, dtype, {}, 0);
  }

  absl::Status AwaitStream(void* stream) override {
    if (!dead_reason_.empty()) {
      return absl::UnavailableError(
          absl::StrCat("NCCL await on rank ", rank_, ": communicator is dead after: ", dead_reason_));
    }
    absl::Status status =
        Watch(absl::StrCat("NCCL stream-ordered work of rank ", rank_, " of ", world_size_),
              static_cast<cudaStream_t>(stream), Clock::now() + timeout_);
    return status.ok() ? status : Fail(status);
  }

  void Abort() override {
    if (comm_aborted_) return;
    if (dead_reason_.empty()) dead_reason_ = "aborted by its owner";
    LOG(WARNING) << "rank " << rank_ << ": aborting the NCCL communicator";
    ncclCommAbort(comm_);
    comm_aborted_ = true;
  }

 private:
  // The result of enqueueing: an immediate error, or the wait until the communicator has left
  // ncclInProgress.
  absl::Status Enqueued(const std::string& what, ncclResult_t enqueued,
                        Clock::time_point deadline) {
    if (enqueued != ncclSuccess && enqueued != ncclInProgress) {
      return absl::UnavailableError(absl::StrCat(what, ": ", ncclGetErrorString(enqueued), " (",
                                                 ncclGetLastError(comm_), ")"));
    }
    return WaitNotInProgress(comm_, deadline, what);
  }

  // Marks the communicator dead and aborts it (never destroy on a dead peer); returns `status`.
  // Once stream-ordered work was enqueued, step graphs may hold its collectives, and
  // ncclCommAbort would wait for them to be destroyed (here, or inside a capture, forever):
  // the abort is then left to Abort(), which the owner calls after dropping them.
  absl::Status Fail(absl::Status status) {
    dead_reason_ = status.ToString();
    LOG(ERROR) << "rank " << rank_ << ": " << status;
    if (stream_ordered_) {
      LOG(ERROR) << "rank " << rank_
                 << ": NCCL abort deferred until the step graphs holding its collectives are "
                    "dropped";
    } else {
      Abort();
    }
    return status;
  }

  // The watchdog: after enqueueing (result `enqueued`), waits for the work to finish while
  // polling for asynchronous errors; aborts the communicator past the deadline.
  absl::Status Run(CollectiveOp op, ncclResult_t enqueued) {
    const std::string what = absl::StrCat("NCCL ", OpContext(op, rank_, world_size_));
    const Clock::time_point deadline = Clock::now() + timeout_;
    absl::Status status = Enqueued(what, enqueued, deadline);
    if (status.ok()) status = Watch(what, stream_, deadline);
    return status.ok() ? status : Fail(status);
  }

  // Waits until `stream` has drained, polling NCCL for asynchronous errors, up to `deadline`.
  absl::Status Watch(const std::string& what, cudaStream_t stream, Clock::time_point deadline) {
    absl::Status status;
    while (status.ok()) {
      cudaError_t err = cudaStreamQuery(stream);
      if (err == cudaSuccess) break;
      if (err != cudaErrorNotReady) {
        status = CudaStatus(err, what);
        break;
      }
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm_, &async);
      if (async != ncclSuccess && async != ncclInProgress) {
        status = absl::UnavailableError(absl::StrCat(what, ": ", ncclGetErrorString(async), " (",
                                                     ncclGetLastError(comm_), ")"));
        break;
      }
      if (Clock::now() > deadline) {
        status = absl::DeadlineExceededError(absl::StrCat(
            what, ": not complete after ", timeout_.count(), " ms; communicator aborted"));
        break;
      }
      std::this_thread::yield();
    }
    return status;
  }

  absl::Status Done(CollectiveOp op, size_t count, DType dtype,
                    absl::Span<const int64_t> send_counts, int root) {
    CountTraffic(op, rank_, world_size_, count, dtype, send_counts, root, &traffic_);
    return absl::OkStatus();
  }

  ncclComm_t comm_;
  cudaStream_t stream_;
  int32_t* scratch_;
  const std::chrono::milliseconds timeout_;
  bool comm_aborted_ = false;
  bool stream_ordered_ = false;  // EnqueueAllReduce was called
};

}  // namespace

bool NcclAvailable(std::string* why_not) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    *why_not = absl::StrCat("no usable CUDA device: ", cudaGetErrorString(err));
    return false;
  }
  if (count == 0) {
    *why_not = "no CUDA device";
    return false;
  }
  return true;
}

absl::StatusOr<std::string> CudaDeviceIdentity(int device) {
  std::string why_not;
  if (!NcclAvailable(&why_not)) return absl::FailedPreconditionError(why_not);
  if (device < 0) RETURN_IF_ERROR(CudaStatus(cudaGetDevice(&device), "cudaGetDevice"));
  cudaDeviceProp prop;
  RETURN_IF_ERROR(CudaStatus(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties"));
  std::string id = "GPU-";
  for (int i = 0; i < 16; ++i) {
    absl::StrAppend(&id, absl::Hex(static_cast<uint8_t>(prop.uuid.bytes[i]), absl::kZeroPad2));
  }
  return id;
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(const NcclOptions& options,
                                                                     gloo::rendezvous::Store& store) {
  if (options.world_size <= 0 || options.rank < 0 || options.rank >= options.world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("NCCL: rank ", options.rank, " invalid for world_size ", options.world_size));
  }
  std::string why_not;
  if (!NcclAvailable(&why_not))
    return absl::FailedPreconditionError(absl::StrCat("NCCL: ", why_not));
  if (options.device >= 0) {
    RETURN_IF_ERROR(CudaStatus(cudaSetDevice(options.device), "cudaSetDevice"));
  }
  const Clock::time_point deadline = Clock::now() + options.timeout;
  ncclUniqueId id;
  if (options.rank == 0) {
    ncclResult_t rc = ncclGetUniqueId(&id);
    if (rc != ncclSuccess) {
      return absl::UnavailableError(absl::StrCat("ncclGetUniqueId: ", ncclGetErrorString(rc)));
    }
    RETURN_IF_ERROR(StoreSet(store, options.unique_id_key,
                             absl::string_view(reinterpret_cast<const char*>(&id), sizeof(id))));
  } else {
    ASSIGN_OR_RETURN(std::string bytes, StoreGet(store, options.unique_id_key, options.timeout));
    if (bytes.size() != sizeof(id)) {
      return absl::DataLossError(absl::StrCat("NCCL unique id under ", options.unique_id_key,
                                              " has ", bytes.size(), " bytes, want ", sizeof(id)));
    }
    std::memcpy(&id, bytes.data(), sizeof(id));
  }
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  ncclResult_t rc = ncclCommInitRankConfig(&comm, options.world_size, id, options.rank, &config);
  const std::string what =
      absl::StrCat("NCCL init of rank ", options.rank, " of ", options.world_size);
  if (rc != ncclSuccess && rc != ncclInProgress) {
    if (comm != nullptr) ncclCommAbort(comm);
    return absl::UnavailableError(absl::StrCat(what, ": ", ncclGetErrorString(rc)));
  }
  absl::Status init = WaitNotInProgress(comm, deadline, what);
  if (!init.ok()) {
    ncclCommAbort(comm);
    return init;
  }
  cudaStream_t stream = nullptr;
  int32_t* scratch = nullptr;
  absl::Status cuda =
      CudaStatus(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  if (cuda.ok()) cuda = CudaStatus(cudaMalloc(&scratch, sizeof(int32_t)), "cudaMalloc");
  if (cuda.ok()) cuda = CudaStatus(cudaMemset(scratch, 0, sizeof(int32_t)), "cudaMemset");
  if (!cuda.ok()) {
    ncclCommAbort(comm);
    if (stream != nullptr) cudaStreamDestroy(stream);
    if (scratch != nullptr) cudaFree(scratch);
    return cuda;
  }
  return std::unique_ptr<Communicator>(new NcclCommunicator(comm, stream, scratch, options));
}

}  // namespace gemma::parallel

#else  // !GEMMA_HAVE_NCCL

namespace gemma::parallel {

bool NcclAvailable(std::string* why_not) {
  *why_not = "this build has no NCCL (GEMMA_ENABLE_CUDA is OFF or CUDA/NCCL was not found)";
  return false;
}

absl::StatusOr<std::string> CudaDeviceIdentity(int) {
  return absl::FailedPreconditionError(
      "this build has no NCCL (GEMMA_ENABLE_CUDA is OFF or CUDA/NCCL was not found)");
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(const NcclOptions&,
                                                                     gloo::rendezvous::Store&) {
  return absl::UnimplementedError(
      "NCCL communicator not built: GEMMA_ENABLE_CUDA is OFF or CUDA/NCCL was not found");
}

}  // namespace gemma::parallel

#endif  // GEMMA_HAVE_NCCL
