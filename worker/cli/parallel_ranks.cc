#include "worker/cli/parallel_ranks.h"

#include <mutex>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"
#include "worker/parallel/in_process_communicator.h"
#include "worker/parallel/tcp_store.h"

ABSL_FLAG(int32_t, tp, 0,
          "tensor-parallel ranks (tp mode: the ranks of the replica; dp-ep: ranks per group)");
ABSL_FLAG(int32_t, ep, 0, "dp-ep mode: expert-parallel ranks (the whole replica)");
ABSL_FLAG(std::string, mode, "tp", "parallel mode: tp or dp-ep");
ABSL_FLAG(int32_t, world_size, 0, "ranks as processes: the number of ranks (with --rank)");
ABSL_FLAG(int32_t, rank, -1, "ranks as processes: this process's rank");
ABSL_FLAG(std::string, rendezvous, "",
          "ranks as processes: HOST:PORT of the rendezvous store (rank 0 serves it)");
ABSL_FLAG(std::string, interface, "", "network interface for Gloo (default: by --rendezvous host)");
ABSL_FLAG(int32_t, comm_timeout_s, 60, "seconds before a collective or the rendezvous gives up");
ABSL_FLAG(bool, check_routing, false, "compare a hash of each layer's routing across tp ranks");
ABSL_FLAG(std::string, data_plane, "auto",
          "ranks as processes on --backend cuda: what carries activations between them: auto "
          "(NCCL when every rank has a GPU of its own, else Gloo), nccl, or gloo (staged "
          "through the host)");

namespace gemma::cli {
namespace {

using parallel::ParallelMode;
using parallel::WorldConfig;

struct Plan {
  WorldConfig::Options world;
  bool processes = false;
  std::string host;
  int port = 0;
};

absl::StatusOr<Plan> PlanFromFlags() {
  Plan plan;
  ASSIGN_OR_RETURN(ParallelMode mode, parallel::ParseParallelMode(absl::GetFlag(FLAGS_mode)));
  const int tp = absl::GetFlag(FLAGS_tp);
  const int ep = absl::GetFlag(FLAGS_ep);
  const int world_size = absl::GetFlag(FLAGS_world_size);
  const int rank = absl::GetFlag(FLAGS_rank);
  const std::string rendezvous = absl::GetFlag(FLAGS_rendezvous);
  if (tp < 0 || ep < 0 || world_size < 0) {
    return absl::InvalidArgumentError("--tp, --ep and --world-size must not be negative");
  }
  plan.processes = world_size > 0 || rank >= 0 || !rendezvous.empty();
  int world = 1;
  if (plan.processes) {
    if (world_size <= 0 || rank < 0 || rendezvous.empty()) {
      return absl::InvalidArgumentError(
          "ranks as processes need all of --world-size W, --rank R and --rendezvous HOST:PORT");
    }
    if (rank >= world_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("--rank ", rank, " is outside --world-size ", world_size));
    }
    std::vector<std::string> parts = absl::StrSplit(rendezvous, absl::MaxSplits(':', 1));
    if (parts.size() != 2 || parts[0].empty() || !absl::SimpleAtoi(parts[1], &plan.port) ||
        plan.port <= 0 || plan.port > 65535) {
      return absl::InvalidArgumentError(
          absl::StrCat("--rendezvous \"", rendezvous, "\" is not HOST:PORT"));
    }
    plan.host = parts[0];
    world = world_size;
  } else if (mode == ParallelMode::kTp) {
    world = tp > 0 ? tp : 1;
  } else {
    world = ep > 0 ? ep : 1;
  }
  if (mode == ParallelMode::kTp) {
    if (ep > 0 && ep != world) {
      return absl::InvalidArgumentError(absl::StrCat(
          "in tp mode experts are split over the tp ranks: --ep ", ep, " must equal ", world,
          " or be omitted (use --mode dp-ep to spread experts over data-parallel groups)"));
    }
    if (tp > 0 && tp != world) {
      return absl::InvalidArgumentError(
          absl::StrCat("in tp mode --tp ", tp, " must equal --world-size ", world));
    }
    plan.world.tp_size = world;
  } else {
    if (ep > 0 && ep != world) {
      return absl::InvalidArgumentError(
          absl::StrCat("--ep ", ep, " must equal the number of ranks, ", world));
    }
    plan.world.tp_size = tp > 0 ? tp : 1;
  }
  plan.world.world_size = world;
  plan.world.mode = mode;
  plan.world.rank = plan.processes ? rank : 0;
  RETURN_IF_ERROR(WorldConfig::Create(plan.world).status());
  return plan;
}

absl::Status RunThreads(const Plan& plan, const std::function<absl::Status(RankEnv&)>& body) {
  const int world = plan.world.world_size;
  const auto timeout = std::chrono::seconds(absl::GetFlag(FLAGS_comm_timeout_s));
  ASSIGN_OR_RETURN(WorldConfig base, WorldConfig::Create(plan.world));
  const int tp = base.tp_size();
  parallel::InProcessGroup world_group(world, timeout);
  parallel::InProcessGroup control_group(world, timeout);
  std::vector<std::unique_ptr<parallel::InProcessGroup>> tp_groups;
  for (int g = 0; g < world / tp; ++g) {
    tp_groups.push_back(std::make_unique<parallel::InProcessGroup>(tp, timeout));
  }
  std::vector<absl::Status> results(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      WorldConfig::Options options = plan.world;
      options.rank = r;
      RankEnv env{*WorldConfig::Create(options), {}, nullptr, world, false};
      std::unique_ptr<parallel::Communicator> world_comm = world_group.communicator(r);
      std::unique_ptr<parallel::Communicator> control = control_group.communicator(r);
      std::unique_ptr<parallel::Communicator> tp_comm =
          tp_groups[env.world.dp_group()]->communicator(env.world.tp_rank());
      env.control = control.get();
      replica::SetParallel(env,
                           base.mode() == ParallelMode::kTp ? world_comm.get() : tp_comm.get(),
                           world_comm.get(), absl::GetFlag(FLAGS_check_routing));
      results[r] = body(env);
      if (!results[r].ok()) {
        // Let the other ranks fail fast instead of waiting for a peer that has given up.
        world_group.Abort(absl::StrCat("rank ", r, " failed"));
        control_group.Abort(absl::StrCat("rank ", r, " failed"));
        for (auto& g : tp_groups) g->Abort(absl::StrCat("rank ", r, " failed"));
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < world; ++r) {
    if (!results[r].ok()) {
      return absl::Status(results[r].code(), absl::StrCat("rank ", r, ": ", results[r].message()));
    }
  }
  return absl::OkStatus();
}

absl::Status RunProcess(const Plan& plan, const std::function<absl::Status(RankEnv&)>& body,
                        parallel::DataPlane data_plane) {
  ASSIGN_OR_RETURN(WorldConfig world, WorldConfig::Create(plan.world));
  const auto timeout = std::chrono::seconds(absl::GetFlag(FLAGS_comm_timeout_s));
  std::unique_ptr<parallel::TcpStoreServer> server;
  if (world.rank() == 0) {
    auto started = parallel::TcpStoreServer::Start(plan.host, plan.port);
    if (!started.ok()) {
      return absl::Status(started.status().code(),
                          absl::StrCat("rank 0 could not serve the rendezvous on ", plan.host, ":",
                                       plan.port, ": ", started.status().message()));
    }
    server = *std::move(started);
  }
  parallel::TcpStoreClient::Options store_options;
  store_options.connect_timeout = timeout;
  store_options.timeout = timeout;
  ASSIGN_OR_RETURN(std::unique_ptr<parallel::TcpStoreClient> store,
                   parallel::TcpStoreClient::Connect(plan.host, plan.port, store_options));
  replica::ProcessRankOptions options;
  options.world = plan.world;
  options.hostname = plan.host;
  options.interface = absl::GetFlag(FLAGS_interface);
  options.timeout = timeout;
  options.control_timeout = timeout;
  options.check_routing = absl::GetFlag(FLAGS_check_routing);
  options.data_plane = data_plane;
  options.cuda_device = 0;
  // Rank 0 serves the store: it stays up until every rank is done with the control group.
  options.barrier_at_end = true;
  return replica::RunProcessRank(options, *store, body);
}

}  // namespace

absl::Status RunOnRanks(const std::function<absl::Status(RankEnv&)>& body,
                        const std::string& backend) {
  ASSIGN_OR_RETURN(Plan plan, PlanFromFlags());
  ASSIGN_OR_RETURN(parallel::DataPlane data_plane,
                   parallel::ParseDataPlane(absl::GetFlag(FLAGS_data_plane)));
  if (data_plane == parallel::DataPlane::kNccl && backend != "cuda") {
    return absl::InvalidArgumentError("--data-plane nccl needs --backend cuda");
  }
  if (data_plane == parallel::DataPlane::kNccl && !plan.processes) {
    return absl::InvalidArgumentError(
        "--data-plane nccl needs ranks as processes (--world-size, --rank, --rendezvous), one "
        "GPU each; ranks as threads share one GPU and talk in-process");
  }
  if (backend != "cuda") data_plane = parallel::DataPlane::kGloo;
  return plan.processes ? RunProcess(plan, body, data_plane) : RunThreads(plan, body);
}

}  // namespace gemma::cli
