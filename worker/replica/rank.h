// A rank of a replica: where it sits (WorldConfig), the communicators it holds (data plane,
// the CPU control group that carries step plans, and in dp-ep its group's control channel and
// the group leaders' group) and the ModelParallel built from them. RunProcessRank joins this
// process's rank to its peers through a rendezvous store and runs a body on it; main()s fill
// the options from their flags (none are defined here).
#pragma once

#include <chrono>
#include <functional>
#include <string>

#include "absl/status/status.h"
#include "gloo/rendezvous/store.h"
#include "worker/model/gemma4/model.h"
#include "worker/parallel/communicator.h"
#include "worker/parallel/data_plane.h"
#include "worker/parallel/world_config.h"

namespace gemma::replica {

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
  // What carries the tensor- and expert-parallel collectives (kGloo or kNccl once decided).
  parallel::DataPlane data_plane = parallel::DataPlane::kGloo;
  bool writes_output() const { return world.rank() == 0; }
};

// Fills env.parallel from env.world and the rank's tensor- and expert-parallel communicators.
void SetParallel(RankEnv& env, parallel::Communicator* tp_comm, parallel::Communicator* ep_comm,
                 bool check_routing);

struct ProcessRankOptions {
  parallel::WorldConfig::Options world;
  // Where this rank listens for its peers (an address or a host name), or the network
  // interface to listen on (when not empty, instead of the host name).
  std::string hostname;
  std::string interface;
  // Bound on the data-plane collectives and on the rendezvous.
  std::chrono::milliseconds timeout{60000};
  // Bound on a wait on the control group; followers wait there for the next step plan for as
  // long as the replica is idle.
  std::chrono::milliseconds control_timeout{60000};
  // dp-ep: also join the per-group control groups and the group leaders' group (RankEnv's
  // group_control and leaders), for a replica whose groups each run an engine.
  bool group_channels = false;
  // Compare a hash of each layer's routing across tp ranks (a check, costs a collective).
  bool check_routing = false;
  // Wait on the control group after the body, for a rank that must outlive its peers' use of
  // it (the one serving the rendezvous store).
  bool barrier_at_end = false;
  // The data plane of the tensor- and expert-parallel groups (parallel::DecideDataPlane; the
  // ranks publish their GPUs through the store to decide). Anything but kGloo is for ranks of
  // a CUDA backend; `cuda_device` is the device this rank computes on.
  parallel::DataPlane data_plane = parallel::DataPlane::kGloo;
  int cuda_device = 0;
};

// Joins this rank's groups through `store` (the control groups over Gloo; the data plane over
// NCCL or Gloo, as options.data_plane decides) and runs `body` on the rank. An error of the
// body comes back prefixed with the rank.
absl::Status RunProcessRank(const ProcessRankOptions& options, gloo::rendezvous::Store& store,
                            const std::function<absl::Status(RankEnv&)>& body);

}  // namespace gemma::replica
