#include "worker/replica/rank.h"

#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "glog/logging.h"
#include "worker/parallel/gloo_communicator.h"
#include "worker/parallel/nccl_communicator.h"
#include "worker/parallel/parallel_config.h"
#include "worker/parallel/rendezvous.h"

namespace gemma::replica {
namespace {

// Every rank publishes the GPU it computes on and reads everyone's, so all decide alike.
absl::StatusOr<parallel::DataPlane> AgreeOnDataPlane(const ProcessRankOptions& options,
                                                     const parallel::WorldConfig& world,
                                                     gloo::rendezvous::Store& store) {
  if (options.data_plane == parallel::DataPlane::kGloo) return parallel::DataPlane::kGloo;
  absl::StatusOr<std::string> mine = parallel::CudaDeviceIdentity(options.cuda_device);
  RETURN_IF_ERROR(parallel::StoreSet(store, absl::StrCat("data_plane/gpu/", world.rank()),
                                     mine.ok() ? *mine : std::string()));
  std::vector<std::string> gpus(world.world_size());
  for (int r = 0; r < world.world_size(); ++r) {
    ASSIGN_OR_RETURN(gpus[r], parallel::StoreGet(store, absl::StrCat("data_plane/gpu/", r),
                                                 options.timeout));
  }
  std::string why;
  ASSIGN_OR_RETURN(parallel::DataPlane plane,
                   parallel::DecideDataPlane(options.data_plane, gpus, GEMMA_HAVE_NCCL, &why));
  if (world.rank() == 0) {
    if (plane == parallel::DataPlane::kNccl) {
      LOG(INFO) << "data plane: NCCL over " << world.world_size() << " GPUs";
    } else {
      LOG(INFO) << "data plane: Gloo, device buffers staged through the host (" << why << ")";
    }
  }
  return plane;
}

}  // namespace

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
  ASSIGN_OR_RETURN(const parallel::DataPlane plane, AgreeOnDataPlane(options, world, store));
  // A group of the data plane: NCCL (its unique id through the store) or Gloo.
  auto data = [&](int rank, int size, const std::string& prefix)
      -> absl::StatusOr<std::unique_ptr<parallel::Communicator>> {
    if (plane != parallel::DataPlane::kNccl) return gloo(rank, size, prefix, options.timeout);
    parallel::NcclOptions nccl;
    nccl.rank = rank;
    nccl.world_size = size;
    nccl.device = options.cuda_device;
    nccl.timeout = options.timeout;
    nccl.unique_id_key = absl::StrCat(prefix, "/nccl_unique_id");
    return parallel::CreateNcclCommunicator(nccl, store);
  };
  ASSIGN_OR_RETURN(auto world_comm, data(world.rank(), world.world_size(), "world"));
  ASSIGN_OR_RETURN(auto control,
                   gloo(world.rank(), world.world_size(), "control", options.control_timeout));
  std::unique_ptr<parallel::Communicator> tp_comm, group_control, leaders;
  if (world.mode() == ParallelMode::kDpEp && world.tp_size() > 1) {
    ASSIGN_OR_RETURN(tp_comm, data(world.tp_rank(), world.tp_size(),
                                   absl::StrCat("tp", world.dp_group())));
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
  env.data_plane = plane;
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
