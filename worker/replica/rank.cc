#include "worker/replica/rank.h"

#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/parallel/gloo_communicator.h"

namespace gemma::replica {

using parallel::ParallelMode;
using parallel::WorldConfig;

void SetParallel(RankEnv& env, parallel::Communicator* tp_comm, parallel::Communicator* ep_comm,
                 bool check_routing) {
  const WorldConfig& w = env.world;
  gemma4::ModelParallel& p = env.parallel;
  const bool dp_ep = w.mode() == ParallelMode::kDpEp;
  p.layout.tp_size = w.tp_size();
  p.layout.tp_rank = w.tp_rank();
  p.layout.ep_size = dp_ep ? w.world_size() : w.tp_size();
  p.layout.ep_rank = dp_ep ? w.rank() : w.tp_rank();
  p.tp_comm = w.tp_size() > 1 ? tp_comm : nullptr;
  p.ep_comm = dp_ep && w.world_size() > 1 ? ep_comm : nullptr;
  p.check_routing = check_routing;
}

absl::Status RunProcessRank(const ProcessRankOptions& options, gloo::rendezvous::Store& store,
                            const std::function<absl::Status(RankEnv&)>& body) {
  ASSIGN_OR_RETURN(WorldConfig world, WorldConfig::Create(options.world));
  auto gloo = [&](int rank, int size, const std::string& prefix, std::chrono::milliseconds timeout)
      -> absl::StatusOr<std::unique_ptr<parallel::Communicator>> {
    parallel::GlooOptions gloo_options;
    gloo_options.rank = rank;
    gloo_options.world_size = size;
    gloo_options.timeout = timeout;
    gloo_options.key_prefix = prefix;
    if (options.interface.empty()) {
      gloo_options.hostname = options.hostname;
    } else {
      gloo_options.interface = options.interface;
    }
    return parallel::CreateGlooCommunicator(gloo_options, store);
  };
  ASSIGN_OR_RETURN(auto world_comm,
                   gloo(world.rank(), world.world_size(), "world", options.timeout));
  ASSIGN_OR_RETURN(auto control,
                   gloo(world.rank(), world.world_size(), "control", options.control_timeout));
  std::unique_ptr<parallel::Communicator> tp_comm, group_control, leaders;
  if (world.mode() == ParallelMode::kDpEp && world.tp_size() > 1) {
    ASSIGN_OR_RETURN(tp_comm, gloo(world.tp_rank(), world.tp_size(),
                                   absl::StrCat("tp", world.dp_group()), options.timeout));
    if (options.group_channels) {
      ASSIGN_OR_RETURN(group_control,
                       gloo(world.tp_rank(), world.tp_size(),
                            absl::StrCat("control", world.dp_group()), options.control_timeout));
    }
  }
  const int groups = world.world_size() / world.tp_size();
  if (world.mode() == ParallelMode::kDpEp && groups > 1 && world.tp_rank() == 0 &&
      options.group_channels) {
    ASSIGN_OR_RETURN(leaders, gloo(world.dp_group(), groups, "leaders", options.timeout));
  }
  RankEnv env{world, {}, control.get(), 1, true};
  env.group_control = group_control.get();
  env.leaders = leaders.get();
  SetParallel(env, world.mode() == ParallelMode::kTp ? world_comm.get() : tp_comm.get(),
              world_comm.get(), options.check_routing);
  absl::Status status = body(env);
  if (!status.ok()) {
    return absl::Status(status.code(), absl::StrCat("rank ", world.rank(), ": ", status.message()));
  }
  if (options.barrier_at_end) return control->Barrier();
  return absl::OkStatus();
}

}  // namespace gemma::replica
