// Running a command-line tool as one model spread over several ranks: as threads of this
// process (--tp, --ep, --mode), or as this process being one rank of several
// (--world-size, --rank, --rendezvous; the data plane over NCCL or Gloo, --data-plane). Builds each rank's communicators (data plane,
// and the CPU control group that carries step plans) and its ModelParallel.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "absl/flags/declare.h"
#include "absl/status/status.h"
#include "worker/replica/rank.h"

// This process's rank when ranks run as processes (-1 otherwise).
ABSL_DECLARE_FLAG(int32_t, rank);

namespace gemma::cli {

using replica::RankEnv;

// Reads the parallelism flags, checks them (INVALID_ARGUMENT naming the flag), sets up the
// ranks and runs `body` on each rank this process hosts (threads run concurrently). Returns the
// first error of any rank, prefixed with the rank. `backend` ("cpu" or "cuda") decides what
// --data-plane may choose: NCCL only between CUDA ranks that run as processes.
absl::Status RunOnRanks(const std::function<absl::Status(RankEnv&)>& body,
                        const std::string& backend = "cpu");

}  // namespace gemma::cli
