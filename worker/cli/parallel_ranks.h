// Running a command-line tool as one model spread over several ranks: as threads of this
// process (--tp, --ep, --mode), or as this process being one rank of several
// (--world-size, --rank, --rendezvous, over Gloo). Builds each rank's communicators (data plane,
// and the CPU control group that carries step plans) and its ModelParallel.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "absl/flags/declare.h"
#include "gloo/rendezvous/store.h"
#include "absl/status/status.h"
#include "worker/model/gemma4/model.h"
#include "worker/parallel/communicator.h"
#include "worker/parallel/world_config.h"

// This process's rank when ranks run as processes (-1 otherwise).
ABSL_DECLARE_FLAG(int32_t, rank);
ABSL_DECLARE_FLAG(int32_t, world_size);
ABSL_DECLARE_FLAG(int32_t, comm_timeout_s);
ABSL_DECLARE_FLAG(std::string, mode);
ABSL_DECLARE_FLAG(int32_t, tp);

namespace gemma::cli {

struct RankEnv {
  parallel::WorldConfig world;
  gemma4::ModelParallel parallel;
  // The CPU process group of the replica (every rank), for step plans and lockstep flags.
  parallel::Communicator* control = nullptr;
  // Ranks sharing this process (threads), to divide the cores among them.
  int ranks_in_process = 1;
  // Ranks as processes: this process is one of several.
  bool is_process_rank = false;
  // dp-ep ranks as processes (RunProcessRank): the CPU group of this rank's tensor-parallel
  // group, which carries its leader's step plans (null when the group is one rank), and on
  // group leaders the group of all group leaders, which steps them in lockstep (null with one
  // group).
  parallel::Communicator* group_control = nullptr;
  parallel::Communicator* leaders = nullptr;
  bool writes_output() const { return world.rank() == 0; }
};

// Reads the parallelism flags, checks them (INVALID_ARGUMENT naming the flag), sets up the
// ranks and runs `body` on each rank this process hosts (threads run concurrently). Returns the
// first error of any rank, prefixed with the rank.
absl::Status RunOnRanks(const std::function<absl::Status(RankEnv&)>& body);

// This process as one rank of several, rendezvousing through a store someone else keeps (the
// coordinator's, for a worker): joins the replica's Gloo groups and runs `body`.
struct ProcessRankOptions {
  parallel::WorldConfig::Options world;
  // Where this rank listens for its peers (an address or a host name).
  std::string hostname;
  // Bound on the data-plane collectives and on the rendezvous.
  std::chrono::milliseconds timeout{60000};
  // Bound on a wait on the control group; followers wait there for the next step plan for as
  // long as the replica is idle.
  std::chrono::milliseconds control_timeout{60000};
  // dp-ep: also join the per-group control groups and the group leaders' group (RankEnv's
  // group_control and leaders), for a replica whose groups each run an engine.
  bool group_channels = false;
};
absl::Status RunProcessRank(const ProcessRankOptions& options, gloo::rendezvous::Store& store,
                            const std::function<absl::Status(RankEnv&)>& body);

}  // namespace gemma::cli
