// Communicator over NCCL for GPU ranks: one device per rank, buffers in device memory.
// Compiled for real only when the CUDA toolkit and NCCL are found (GEMMA_HAVE_NCCL); otherwise
// creating one fails with UNIMPLEMENTED. Knows nothing of models; no CUDA or NCCL type leaks here.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "worker/parallel/communicator.h"
#include "gloo/rendezvous/store.h"

namespace gemma::parallel {

struct NcclOptions {
  int rank = 0;
  int world_size = 1;
  // CUDA device of this rank; -1 keeps the current device.
  int device = -1;
  // Bound on initialisation and on every collective; past it the communicator is aborted.
  std::chrono::milliseconds timeout = kDefaultCollectiveTimeout;
  // Store key under which rank 0 publishes the ncclUniqueId.
  std::string unique_id_key = "nccl/unique_id";
};

// True when this build has NCCL and a CUDA device is visible; otherwise false with the reason.
bool NcclAvailable(std::string* why_not);

// What tells GPUs apart across processes and hosts: the UUID of CUDA device `device` (the
// current one when -1), as text. NCCL takes at most one rank per GPU, so the ranks of a replica
// compare these before choosing it. FAILED_PRECONDITION without a device or without NCCL.
absl::StatusOr<std::string> CudaDeviceIdentity(int device);

// Rank 0 creates the ncclUniqueId and sets it in `store`; the others get it (waiting up to the
// timeout). The communicator is non-blocking (ncclCommInitRankConfig, blocking = 0) and runs on
// its own stream. Every call enqueues its work and then watches it: it polls
// ncclCommGetAsyncError and the stream until the work completes, and past the timeout calls
// ncclCommAbort and returns DEADLINE_EXCEEDED; an asynchronous NCCL error aborts and returns
// UNAVAILABLE. AllToAllV is grouped ncclSend/ncclRecv with the caller's counts.
// EnqueueAllReduce enqueues on the caller's stream (recorded into a CUDA graph when that stream
// is capturing) and waits only for NCCL to accept it; AwaitStream watches that stream with the
// same deadline, error polling and abort.
absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(const NcclOptions& options,
                                                                     gloo::rendezvous::Store& store);

}  // namespace gemma::parallel
