// gemma-worker: one replica of the model, as a supervisor and one process per rank.
//
// The supervisor (what the user starts) checks the flags, then starts one rank process per CPU
// rank or GPU (before any CUDA call; each GPU rank sees only its own device), and waits. When
// any rank exits, it stops the others and exits non-zero; on SIGTERM or SIGINT it stops them
// all and exits 0. A rank that loses its supervisor is killed by the kernel.
//
// The rank processes rendezvous through the coordinator's store (keys under a prefix the
// supervisor picks), join the replica's Gloo groups (tensor parallelism: attention heads,
// dense MLP columns and experts split over the ranks), and load only their slices. Rank 0, the
// leader, then registers the replica (only once every rank has loaded), runs the engine loop,
// sends each step's plan to the other ranks, serves gemma.internal.v1.Replica and heartbeats;
// the others follow the plans.
// A replica may span several workers (nodes): each is started with the same --replica NAME and
// --nodes N and its own --node-rank; node 0's first rank leads.
//   gemma-worker --coordinator HOST:PORT --model DIR [--cpu-ranks N | --gpus N]
//                [--backend cpu|cuda] [--listen HOST:PORT] [--tokenizer FILE]
//                [--replica NAME --nodes N --node-rank K] [--mode tp|dp-ep --tp T]
// In dp-ep mode the ranks form data-parallel groups of --tp ranks with the experts spread over
// all of them; each group's leader runs its own engine, registers as its own entry and steps in
// lockstep with the other groups.
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <ctime>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"
#include "common/tool_main.h"
#include "gemma/internal/v1/worker.grpc.pb.h"
#include "glog/logging.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "worker/engine/engine.h"
#include "worker/model/gemma4/kv_cache.h"
#include "worker/service/expert_load.h"
#include "worker/service/fingerprint.h"
#include "worker/service/grpc_store.h"
#include "worker/replica/executor.h"
#include "worker/replica/load.h"
#include "worker/replica/rank.h"
#include "worker/service/replica_service.h"
#include "common/model_config.h"
#include "eplb/placement.h"
#include "proto/bearer.h"
#include "proto/parse_errors.h"
#include "proto/placement_convert.h"
#include "common/host_port.h"
#include "proto/listen.h"
#include "proto/tls.h"
#include "proto/status_convert.h"

ABSL_FLAG(std::string, coordinator_ca, "",
          "PEM CA file to verify a coordinator that speaks TLS (its --tls-cert, or on its "
          "internal port its --internal-tls-cert); with --tls-cert also the CA whose client "
          "certificate the replica port accepts (the coordinator's); none: plaintext");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate of this worker (with --tls-key) for a coordinator's internal port "
          "(mutual TLS, its --internal-ca signs it): presented when joining, and served on the "
          "replica port, which then speaks TLS and accepts only the coordinator");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls-cert");
ABSL_FLAG(std::string, join_token, "",
          "the token a coordinator started with --auth-tokens asks workers for (a worker or "
          "admin token; default $GEMMA_JOIN_TOKEN); passed to the rank processes");
ABSL_FLAG(std::string, coordinator, "", "coordinator address HOST:PORT");
ABSL_FLAG(std::string, model, "", "Hugging Face Gemma 4 checkpoint directory");
ABSL_FLAG(std::string, backend, "cpu", "cpu or cuda");
ABSL_FLAG(std::string, kv_dtype, "auto", gemma::replica::kKvDtypeFlagHelp);
ABSL_FLAG(bool, enforce_eager, false, gemma::replica::kEnforceEagerFlagHelp);
ABSL_FLAG(int32_t, cpu_ranks, 0, "--backend cpu: rank processes of the replica (default 1)");
ABSL_FLAG(int32_t, gpus, 0, "--backend cuda: GPUs of the replica, one rank process each");
ABSL_FLAG(std::string, listen, "127.0.0.1:0",
          "where the replica leader serves, HOST:PORT (port 0: any free port)");
ABSL_FLAG(std::string, advertise, "", "address the coordinator dials (default: --listen)");
ABSL_FLAG(std::string, tokenizer, "",
          "tokenizer.json for text and chat requests (default: the model directory's, if any)");
ABSL_FLAG(int32_t, threads, 0, "CPU threads per rank (0: the cores divided among the ranks)");
ABSL_FLAG(int64_t, cache_tokens, 16384, "KV-cache capacity in positions");
ABSL_FLAG(int64_t, page_size, 16, "KV-cache page size in tokens");
ABSL_FLAG(int32_t, register_timeout_s, 60,
          "how long to keep trying to reach the coordinator at start-up");
ABSL_FLAG(int32_t, heartbeat_ms, 1000, "milliseconds between heartbeats to the coordinator");
ABSL_FLAG(std::string, replica, "",
          "name of the replica: the same on each of its workers when it spans several nodes "
          "(they meet by it); shown beside its id in gemmactl status");
ABSL_FLAG(int32_t, nodes, 1, "workers (nodes) that together form the replica");
ABSL_FLAG(int32_t, node_rank, 0, "this worker's place among them, 0..nodes-1 (0 leads)");
ABSL_FLAG(std::string, model_name, "",
          "the served name of the model (what requests name in \"model\"); empty: the "
          "coordinator's default model. Workers started without --model get it assigned");
ABSL_FLAG(int32_t, drain_grace_s, 30,
          "on SIGTERM (or gemmactl drain) the replica takes no new requests and waits this long "
          "for the ones in flight before it leaves; those still running then move to another "
          "replica with the tokens already streamed. A second SIGTERM leaves at once");
ABSL_FLAG(std::string, kv_admission, "reserve",
          "how the replica admits a waiting request: reserve (only when its prompt plus "
          "max_tokens fits beside what the running requests may still grow into: never "
          "preempts; short requests backfill around a waiting long one without delaying it) or first-chunk (when its first chunk fits: more at once, preempts as they "
          "grow)");
ABSL_FLAG(int32_t, head_bypass_steps, 64,
          "with --kv-admission first-chunk: steps that requests may pass a waiting request that "
          "does not fit yet, before it keeps its place at the head of the queue (reserve "
          "admission backfills instead: a request passes only if it ends before the waiting one "
          "can start, or fits beside it)");
ABSL_FLAG(int32_t, redundant_experts, 0,
          "MoE replicas whose experts are spread over ranks: spare expert slots over the replica "
          "(experts + spares must divide over the expert ranks), which the coordinator fills "
          "with copies of hot experts when it rebalances (gemmactl rebalance); they start as "
          "copies dealt in id order");
ABSL_FLAG(int32_t, placement_load_delay_ms, 0,
          "testing: stall every expert-placement load this long (loads run beside the steps)");
ABSL_FLAG(std::string, store_prefix, "",
          "internal: the rendezvous key prefix the supervisor gives its rank processes");
ABSL_FLAG(int32_t, local_ranks, 1, "internal: rank processes of this worker");
ABSL_FLAG(int32_t, rank, -1, "internal: this process's rank (a rank process of the supervisor)");
ABSL_FLAG(int32_t, world_size, 0, "internal: the replica's ranks (with --rank)");
ABSL_FLAG(std::string, mode, "tp", "parallel mode of the replica: tp or dp-ep");
ABSL_FLAG(int32_t, tp, 0, "dp-ep mode: tensor-parallel ranks per data-parallel group");
ABSL_FLAG(int32_t, comm_timeout_s, 60, "seconds before a collective or the rendezvous gives up");
ABSL_FLAG(std::string, interface, "", "network interface for Gloo (default: by --listen host)");
ABSL_FLAG(bool, check_routing, false, "compare a hash of each layer's routing across tp ranks");
ABSL_FLAG(std::string, health_listen, "",
          "HOST:PORT of a plaintext port serving only grpc.health.v1, for probes (Kubernetes') "
          "that cannot speak the mutual TLS of the replica port, and on every node of a replica "
          "(only the group leaders serve --listen): the server's status is SERVING while this "
          "worker runs (liveness) and NOT_SERVING once it drains; the service "
          "gemma.worker.Ready is SERVING once its ranks have loaded the model and not draining "
          "(readiness); empty: none");
ABSL_FLAG(std::string, coordinator_tls_name, "",
          "with --tls-cert: the replica port takes calls only from a client certificate naming "
          "this (a DNS name or the common name of the coordinator's internal certificate, e.g. "
          "gemma-coordinator); empty: any certificate --coordinator-ca signed");
ABSL_FLAG(int32_t, ready_fd, -1,
          "internal: a pipe to write one byte to once this rank and its peers have loaded");
ABSL_FLAG(std::string, data_plane, "auto",
          "--backend cuda: what carries activations between the replica's GPU ranks: auto (NCCL "
          "when every rank has a GPU of its own, else Gloo), nccl, or gloo (staged through the "
          "host)");

namespace {

namespace iv1 = gemma::internal::v1;
using Clock = std::chrono::steady_clock;

constexpr uint32_t kProtocolVersion = 1;
// How long the supervisor waits for the ranks to stop after SIGTERM before SIGKILL.
constexpr auto kStopGrace = std::chrono::seconds(10);

std::atomic<bool> g_stop{false};
// A second SIGTERM or SIGINT, a second or more after the first: leave now, without draining.
// Sooner it is the same stop: a SIGTERM to the whole process group (kill -- -PGID, systemd's
// KillMode=control-group, `timeout`) reaches a rank both directly and through its supervisor.
std::atomic<bool> g_force_stop{false};
std::atomic<int64_t> g_first_stop_ns{0};
int64_t MonotonicNs() {  // async-signal-safe
  timespec now{};
  clock_gettime(CLOCK_MONOTONIC, &now);
  return static_cast<int64_t>(now.tv_sec) * 1000000000 + now.tv_nsec;
}
void OnSignal(int) {
  const int64_t now = MonotonicNs();
  if (!g_stop.load()) g_first_stop_ns.store(now);
  if (!g_stop.exchange(true)) return;
  if (now - g_first_stop_ns.load() >= 1000000000) g_force_stop.store(true);
}

// The command line as given, for starting the rank processes.
std::vector<std::string>* g_argv = nullptr;

using gemma::FromGrpc;

std::string TokenizerPath() {
  std::string path = absl::GetFlag(FLAGS_tokenizer);
  if (path.empty()) {
    const std::filesystem::path candidate =
        std::filesystem::path(absl::GetFlag(FLAGS_model)) / "tokenizer.json";
    if (std::filesystem::exists(candidate)) path = candidate.string();
  }
  return path;
}

std::string HostOf(const std::string& address) {
  return address.substr(0, address.rfind(':'));
}

// ---------------------------------------------------------------------------------------------
// Supervisor

// --redundant-experts: the static placement with that many spare slots over the replica's
// `expert_ranks` ranks (every rank holds experts in tp and dp-ep alike). Null without the flag.
absl::StatusOr<std::unique_ptr<gemma::eplb::Placement>> InitialPlacement(int expert_ranks) {
  const int redundant = absl::GetFlag(FLAGS_redundant_experts);
  if (redundant == 0) return nullptr;
  ASSIGN_OR_RETURN(gemma::ModelConfig config, gemma::LoadModelConfig(absl::GetFlag(FLAGS_model)));
  if (!config.enable_moe_block) {
    return absl::InvalidArgumentError(
        absl::StrCat("--redundant-experts ", redundant, ": ", absl::GetFlag(FLAGS_model),
                     " is a dense model; it has no experts to copy"));
  }
  absl::StatusOr<gemma::eplb::Placement> placement = gemma::eplb::StaticPlacement(
      config.num_hidden_layers, config.num_experts, expert_ranks, redundant);
  if (!placement.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--redundant-experts ", redundant, " over ",
                                                   expert_ranks, " ranks: ",
                                                   placement.status().message()));
  }
  return std::make_unique<gemma::eplb::Placement>(*std::move(placement));
}

struct RankProcess {
  int rank;
  pid_t pid;
  int ready_fd = -1;  // read end of the pipe the rank writes a byte to once loaded (non-blocking)
  bool ready = false;
};

// Starts the rank process `rank` of the replica, the `local`-th of this worker's `local_ranks`.
absl::StatusOr<RankProcess> StartRank(int rank, int local, int local_ranks, int world_size,
                                      const std::string& prefix, bool gpu) {
  // The rank writes a byte to this pipe once every rank of the replica has loaded (readiness).
  int ready[2];
  if (pipe(ready) != 0) return absl::InternalError(absl::StrCat("pipe: ", strerror(errno)));
  fcntl(ready[0], F_SETFD, FD_CLOEXEC);
  fcntl(ready[0], F_SETFL, O_NONBLOCK);
  std::vector<std::string> args = *g_argv;
  args.push_back(absl::StrCat("--ready_fd=", ready[1]));
  args.push_back(absl::StrCat("--rank=", rank));
  args.push_back(absl::StrCat("--world_size=", world_size));
  args.push_back(absl::StrCat("--local_ranks=", local_ranks));
  args.push_back(absl::StrCat("--store_prefix=", prefix));
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  std::string devices;
  if (gpu) {
    // Each GPU rank sees one device, the local-th of those the supervisor sees.
    const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
    if (visible != nullptr && *visible != '\0') {
      std::vector<std::string> list = absl::StrSplit(visible, ',');
      if (local >= static_cast<int>(list.size())) {
        close(ready[0]);
        close(ready[1]);
        return absl::InvalidArgumentError(absl::StrCat(
            "--gpus ", local_ranks, " but CUDA_VISIBLE_DEVICES lists ", list.size(), " devices"));
      }
      devices = list[local];
    } else {
      devices = absl::StrCat(local);
    }
  }
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) {
    close(ready[0]);
    close(ready[1]);
    return absl::InternalError(absl::StrCat("fork failed: ", strerror(errno)));
  }
  if (pid == 0) {
    // The kernel kills this rank if the supervisor dies, even by SIGKILL.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(1);
    if (gpu) setenv("CUDA_VISIBLE_DEVICES", devices.c_str(), 1);
    execv("/proc/self/exe", argv.data());
    _exit(127);
  }
  close(ready[1]);
  return RankProcess{rank, pid, ready[0]};
}

std::string DescribeExit(int status) {
  if (WIFEXITED(status)) return absl::StrCat("exited with code ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return absl::StrCat("was killed by signal ", WTERMSIG(status));
  return "stopped";
}

// SIGTERM to every rank still running, SIGKILL after the grace period; reaps them all.
void StopRanks(std::vector<RankProcess>& ranks) {
  for (const RankProcess& r : ranks) kill(r.pid, SIGTERM);
  const Clock::time_point deadline = Clock::now() + kStopGrace;
  while (!ranks.empty()) {
    for (auto it = ranks.begin(); it != ranks.end();) {
      int status = 0;
      if (waitpid(it->pid, &status, WNOHANG) == it->pid) {
        it = ranks.erase(it);
      } else {
        ++it;
      }
    }
    if (ranks.empty()) break;
    if (Clock::now() >= deadline) {
      for (const RankProcess& r : ranks) {
        LOG(WARNING) << "rank " << r.rank << " (pid " << r.pid << ") did not stop; killing it";
        kill(r.pid, SIGKILL);
        waitpid(r.pid, nullptr, 0);
      }
      ranks.clear();
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

// This worker's certificate (--tls-cert, --tls-key), empty when it has none.
gemma::CertificateFiles WorkerCertificate() {
  return {absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key)};
}

// The credentials of every channel to the coordinator: plaintext, TLS (--coordinator-ca), or
// mutual TLS (and --tls-cert).
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> CoordinatorChannelCredentials() {
  return gemma::ChannelCredentialsFor(absl::GetFlag(FLAGS_coordinator_ca), WorkerCertificate());
}

// Before any rank starts: the certificate is usable, and the coordinator answers over this
// channel. Waits up to --register-timeout-s for a coordinator that is not up yet, and fails at
// once, saying what to check, when the TLS handshake is refused.
// A channel to the coordinator that reconnects within a second or two of it coming back (a
// restart): gRPC's default backoff grows to minutes, and the replica's heartbeats, its
// registration again and so its requests would wait that long.
std::shared_ptr<grpc::Channel> CoordinatorChannel(
    const std::string& address, const std::shared_ptr<grpc::ChannelCredentials>& credentials) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 250);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 250);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  return grpc::CreateCustomChannel(address, credentials, args);
}

absl::Status CheckCoordinatorChannel() {
  RETURN_IF_ERROR(gemma::CheckCertificate(WorkerCertificate()));
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> credentials,
                   CoordinatorChannelCredentials());
  const std::string address = absl::GetFlag(FLAGS_coordinator);
  auto stub = iv1::Coordinator::NewStub(CoordinatorChannel(address, credentials));
  const Clock::time_point deadline =
      Clock::now() + std::chrono::seconds(absl::GetFlag(FLAGS_register_timeout_s));
  std::string last;
  int refusals = 0;
  const Clock::time_point started = Clock::now();
  bool said_waiting = false;
  while (!g_stop.load()) {
    if (!said_waiting && Clock::now() - started >= std::chrono::seconds(5)) {
      // Silence while retrying looks like a hang: say what is being waited for.
      LOG(WARNING) << "waiting for the coordinator at " << address << " (" << last
                   << "); retrying until --register-timeout-s "
                   << absl::GetFlag(FLAGS_register_timeout_s) << " s";
      said_waiting = true;
    }
    // A heartbeat for no replica changes nothing; any answer shows the channel works.
    iv1::HeartbeatRequest probe;
    iv1::HeartbeatResponse response;
    grpc::ClientContext context;
    gemma::AddBearer(context, gemma::EnvToken(gemma::kJoinTokenEnv));
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(3));
    const grpc::Status status = stub->Heartbeat(&context, probe, &response);
    if (status.error_code() == grpc::StatusCode::UNIMPLEMENTED) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the coordinator at ", address, " does not take workers on this port (it has an "
          "internal port, its --internal-listen): point --coordinator there"));
    }
    if (status.error_code() != grpc::StatusCode::UNAVAILABLE &&
        status.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED) {
      return absl::OkStatus();
    }
    last = status.error_message();
    std::string hint;
    if (!absl::GetFlag(FLAGS_coordinator_ca).empty()) {
      hint = gemma::HandshakeHint(last, !WorkerCertificate().cert.empty());
    } else if (absl::StrContains(last, "Socket closed")) {
      // A TLS server closes a plaintext connection at once.
      hint = "it closed the connection at once: if it speaks TLS (its --tls-cert, or an "
             "internal port with --internal-tls-cert), give its CA with --coordinator-ca";
    }
    // Twice in a row: a coordinator that is going down also closes sockets.
    if (!hint.empty() && ++refusals >= 2) {
      return absl::UnavailableError(
          absl::StrCat("cannot reach the coordinator at ", address, ": ", hint, " (", last, ")"));
    }
    if (hint.empty()) refusals = 0;
    if (Clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
  if (g_stop.load()) return absl::OkStatus();
  return absl::DeadlineExceededError(absl::StrCat(
      "the coordinator at ", address, " did not answer within ",
      absl::GetFlag(FLAGS_register_timeout_s), " s (", last,
      "); is it running and reachable? (--coordinator, --register-timeout-s",
      absl::GetFlag(FLAGS_coordinator_ca).empty()
          ? "; if it speaks TLS, give its CA with --coordinator-ca)"
          : ")"));
}

// A field of /proc/meminfo in bytes ("MemTotal", "MemAvailable"); 0 when unknown.
int64_t MemInfoBytes(const std::string& field) {
  std::ifstream in("/proc/meminfo");
  std::string name;
  int64_t kib = 0;
  std::string unit;
  while (in >> name >> kib >> unit) {
    if (name == field + ":") return kib * 1024;
  }
  return 0;
}

// One number from a cgroup file ("max", a missing file or a non-number: -1).
int64_t CgroupNumber(const std::filesystem::path& file) {
  std::ifstream in(file);
  std::string text;
  if (!(in >> text)) return -1;
  int64_t value = 0;
  return absl::SimpleAtoi(text, &value) ? value : -1;
}

// The memory limits of this process's cgroup and its ancestors: the smallest limit, and the
// least headroom under any of them (limit minus what is in use, not counting inactive file
// cache, which the kernel reclaims first, as the kubelet's working set does not); -1 for both
// without a limit. cgroup v2 (memory.max, memory.current) and v1
// (memory.limit_in_bytes, memory.usage_in_bytes), mounted where systemd and container
// runtimes put them. In a pod or a container, /proc/meminfo shows the whole machine: this is
// what the process may actually use.
// A field of a cgroup's memory.stat ("inactive_file", "total_inactive_file"); 0 when absent.
int64_t CgroupStat(const std::filesystem::path& file, const std::string& field) {
  std::ifstream in(file);
  std::string name;
  int64_t value = 0;
  while (in >> name >> value) {
    if (name == field) return value;
  }
  return 0;
}

struct CgroupMemory {
  int64_t limit = -1;
  int64_t headroom = -1;
};

CgroupMemory CgroupMemoryLimit() {
  std::ifstream in("/proc/self/cgroup");
  std::string line;
  CgroupMemory tightest;
  auto consider = [&](const std::filesystem::path& dir, bool v2) {
    const int64_t limit =
        CgroupNumber(dir / (v2 ? "memory.max" : "memory.limit_in_bytes"));
    // cgroup v1 spells "no limit" as a page-rounded INT64_MAX.
    if (limit <= 0 || limit >= (int64_t{1} << 62)) return;
    const int64_t used =
        std::max<int64_t>(0, CgroupNumber(dir / (v2 ? "memory.current" : "memory.usage_in_bytes")) -
                                 CgroupStat(dir / "memory.stat",
                                            v2 ? "inactive_file" : "total_inactive_file"));
    const int64_t headroom = std::max<int64_t>(0, limit - used);
    if (tightest.limit < 0 || limit < tightest.limit) tightest.limit = limit;
    if (tightest.headroom < 0 || headroom < tightest.headroom) tightest.headroom = headroom;
  };
  while (std::getline(in, line)) {
    // "ID:CONTROLLERS:PATH": "0::PATH" for v2, "N:memory:PATH" (among others) for v1.
    const std::vector<std::string> parts = absl::StrSplit(line, absl::MaxSplits(':', 2));
    if (parts.size() != 3) continue;
    const std::vector<std::string> controllers = absl::StrSplit(parts[1], ',');
    const bool v2 = parts[0] == "0" && parts[1].empty();
    const bool v1 = std::find(controllers.begin(), controllers.end(), "memory") != controllers.end();
    if (!v1 && !v2) continue;
    const std::vector<std::string> roots =
        v2 ? std::vector<std::string>{"/sys/fs/cgroup", "/sys/fs/cgroup/unified"}
           : std::vector<std::string>{"/sys/fs/cgroup/memory"};
    for (const std::string& root : roots) {
      // The process's own cgroup, then each ancestor up to the mount's root.
      std::filesystem::path rel = std::filesystem::path(parts[2]).relative_path();
      for (;;) {
        const std::filesystem::path dir = std::filesystem::path(root) / rel;
        consider(dir, v2);
        if (rel.empty()) break;
        rel = rel.parent_path();
      }
    }
  }
  return tightest;
}

// What this worker may hold: the machine's memory (/proc/meminfo "MemTotal", "MemAvailable"),
// bounded by its cgroup's limit (a pod's or a container's).
int64_t MemoryBytes(bool available) {
  int64_t bytes = MemInfoBytes(available ? "MemAvailable" : "MemTotal");
  const CgroupMemory cgroup = CgroupMemoryLimit();
  if (cgroup.limit > 0) {
    const int64_t bound = available ? cgroup.headroom : cgroup.limit;
    bytes = bytes > 0 ? std::min(bytes, bound) : bound;
  }
  return bytes;
}

// The bytes of the checkpoint's weights (its safetensors files).
int64_t CheckpointBytes(const std::string& dir) {
  int64_t bytes = 0;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(dir, error)) {
    if (entry.path().extension() == ".safetensors") bytes += entry.file_size(error);
  }
  return bytes;
}

// A worker started without --model: asks the coordinator for a model (Coordinator.Join) until
// it gets one whose checkpoint it can read, then takes the assignment as its flags (and passes
// them on to its rank processes). False when stopped while waiting.
absl::StatusOr<bool> JoinForAssignment(int local_ranks, const std::string& backend) {
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> credentials,
                   CoordinatorChannelCredentials());
  auto channel = CoordinatorChannel(absl::GetFlag(FLAGS_coordinator), credentials);
  auto stub = iv1::Coordinator::NewStub(channel);
  std::random_device random;
  iv1::JoinRequest request;
  request.set_worker_id(absl::StrFormat("w%08x%08x", random(), random()));
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  request.set_host(host);
  request.set_backend(backend);
  request.set_ranks(local_ranks);
  request.set_memory_bytes(MemoryBytes(/*available=*/false));
  std::string last_reason;
  LOG(INFO) << "no --model: joining " << absl::GetFlag(FLAGS_coordinator) << " as worker "
            << request.worker_id() << " with " << local_ranks << " " << backend
            << " rank(s); waiting for a model";
  while (!g_stop.load()) {
    iv1::JoinResponse response;
    grpc::ClientContext context;
    gemma::AddBearer(context, gemma::EnvToken(gemma::kJoinTokenEnv));
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    const grpc::Status status = stub->Join(&context, request, &response);
    if (!status.ok()) {
      if (status.error_code() == grpc::StatusCode::UNAUTHENTICATED ||
          status.error_code() == grpc::StatusCode::PERMISSION_DENIED ||
          status.error_code() == grpc::StatusCode::INVALID_ARGUMENT) {
        return FromGrpc(status, "joining the coordinator");
      }
      LOG_EVERY_N(WARNING, 10) << "joining " << absl::GetFlag(FLAGS_coordinator)
                               << " failed: " << status.error_message() << "; retrying";
      std::this_thread::sleep_for(std::chrono::seconds(1));
      continue;
    }
    if (response.assigned()) {
      if (!std::filesystem::exists(std::filesystem::path(response.model_path()) / "config.json")) {
        LOG(WARNING) << "assigned model " << response.model_name() << " at "
                     << response.model_path() << ", which this worker cannot read; asking for "
                     << "another";
        request.add_unreadable_models(response.model_name());
        continue;
      }
      // On CPU the weights live in this host's memory: this worker's share of them must fit.
      if (backend == "cpu") {
        const int64_t share = CheckpointBytes(response.model_path()) / std::max(1, response.nodes());
        const int64_t available = MemoryBytes(/*available=*/true);
        if (available > 0 && share > available) {
          LOG(WARNING) << absl::StrFormat(
              "assigned model %s, whose weights need %.1f GiB on this worker, but %.1f GiB of "
              "memory is available; asking for another",
              response.model_name(), static_cast<double>(share) / (1 << 30),
              static_cast<double>(available) / (1 << 30));
          request.add_unreadable_models(response.model_name());
          continue;
        }
      }
      LOG(INFO) << "assigned model " << response.model_name() << " (" << response.model_path()
                << ", " << response.mode() << ")";
      absl::SetFlag(&FLAGS_model, response.model_path());
      absl::SetFlag(&FLAGS_model_name, response.model_name());
      absl::SetFlag(&FLAGS_mode, response.mode());
      absl::SetFlag(&FLAGS_tp, response.tp());
      absl::SetFlag(&FLAGS_redundant_experts, response.redundant_experts());
      // The rank processes are started with this process's arguments: add the assignment.
      g_argv->push_back(absl::StrCat("--model=", response.model_path()));
      g_argv->push_back(absl::StrCat("--model_name=", response.model_name()));
      g_argv->push_back(absl::StrCat("--mode=", response.mode()));
      g_argv->push_back(absl::StrCat("--tp=", response.tp()));
      g_argv->push_back(absl::StrCat("--redundant_experts=", response.redundant_experts()));
      if (response.nodes() > 1) {
        LOG(INFO) << "node " << response.node_rank() << " of " << response.nodes()
                  << " of replica " << response.replica();
        absl::SetFlag(&FLAGS_replica, response.replica());
        absl::SetFlag(&FLAGS_nodes, response.nodes());
        absl::SetFlag(&FLAGS_node_rank, response.node_rank());
        g_argv->push_back(absl::StrCat("--replica=", response.replica()));
        g_argv->push_back(absl::StrCat("--nodes=", response.nodes()));
        g_argv->push_back(absl::StrCat("--node_rank=", response.node_rank()));
      }
      return true;
    }
    if (response.reason() != last_reason) {
      LOG(INFO) << "waiting for a model: " << response.reason();
      last_reason = response.reason();
    }
    const auto wait = std::chrono::milliseconds(std::clamp<int64_t>(response.retry_ms(), 100, 10000));
    for (auto until = Clock::now() + wait; Clock::now() < until && !g_stop.load();) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  return false;
}

// The --health-listen server's service that is SERVING once this worker's ranks have loaded.
constexpr char kReadyService[] = "gemma.worker.Ready";

// The --health-listen server: grpc.health.v1 alone, plaintext, in the supervisor (so it answers
// on every node, while the model loads, and while the worker waits for an assignment): the
// server as a whole (liveness) SERVING from the start, kReadyService (readiness) once loaded.
absl::StatusOr<std::unique_ptr<grpc::Server>> StartHealthServer(const std::string& listen) {
  if (HostOf(listen).empty() || listen.rfind(':') == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("--health-listen \"", listen, "\" is not HOST:PORT"));
  }
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  int port = 0;
  gemma::ListenExclusively(builder, listen, grpc::InsecureServerCredentials(), &port);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return absl::UnavailableError(absl::StrCat("--health-listen: cannot listen on ", listen,
                                               " (in use by another process?)"));
  }
  server->GetHealthCheckService()->SetServingStatus(true);
  server->GetHealthCheckService()->SetServingStatus(kReadyService, false);
  LOG(INFO) << "health port (grpc.health.v1, plaintext) on " << HostOf(listen) << ":" << port;
  return server;
}

absl::Status Supervise() {
  const std::string coordinator = absl::GetFlag(FLAGS_coordinator);
  if (coordinator.empty()) {
    return absl::InvalidArgumentError("--coordinator HOST:PORT is required");
  }
  // Addresses are checked before anything waits on them.
  if (coordinator.find("://") != std::string::npos || gemma::PortOf(coordinator, /*lo=*/1) < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--coordinator \"", coordinator, "\" is not HOST:PORT of the coordinator (its --listen, "
        "or its --internal-listen when it has one)"));
  }
  RETURN_IF_ERROR(gemma::CheckListenAddress("listen", absl::GetFlag(FLAGS_listen)));
  signal(SIGTERM, OnSignal);
  signal(SIGINT, OnSignal);
  RETURN_IF_ERROR(CheckCoordinatorChannel());
  std::unique_ptr<grpc::Server> health;
  if (const std::string listen = absl::GetFlag(FLAGS_health_listen); !listen.empty()) {
    ASSIGN_OR_RETURN(health, StartHealthServer(listen));
  }
  if (g_stop.load()) return absl::OkStatus();
  if (absl::GetFlag(FLAGS_model).empty()) {
    const std::string backend = absl::GetFlag(FLAGS_backend);
    const int ranks = backend == "cuda" ? std::max(1, absl::GetFlag(FLAGS_gpus))
                                        : std::max(1, absl::GetFlag(FLAGS_cpu_ranks));
    ASSIGN_OR_RETURN(const bool assigned, JoinForAssignment(ranks, backend));
    if (!assigned) return absl::OkStatus();  // stopped while waiting
  }
  if (absl::GetFlag(FLAGS_drain_grace_s) < 0) {
    return absl::InvalidArgumentError("--drain-grace-s must not be negative");
  }
  if (const std::string a = absl::GetFlag(FLAGS_kv_admission); a != "reserve" && a != "first-chunk") {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv-admission \"", a, "\" is not one of reserve, first-chunk"));
  }
  if (absl::GetFlag(FLAGS_head_bypass_steps) < 0) {
    return absl::InvalidArgumentError("--head-bypass-steps must not be negative");
  }
  const std::string model_dir = absl::GetFlag(FLAGS_model);
  if (model_dir.empty()) return absl::InvalidArgumentError("--model DIR is required");
  if (!std::filesystem::exists(std::filesystem::path(model_dir) / "config.json")) {
    return absl::InvalidArgumentError(
        absl::StrCat("--model ", model_dir, " has no config.json; give a Hugging Face Gemma 4 "
                     "checkpoint directory"));
  }
  const std::string backend = absl::GetFlag(FLAGS_backend);
  const int cpu_ranks = absl::GetFlag(FLAGS_cpu_ranks);
  const int gpus = absl::GetFlag(FLAGS_gpus);
  if (absl::GetFlag(FLAGS_heartbeat_ms) <= 0) {
    return absl::InvalidArgumentError("--heartbeat-ms must be positive");
  }
  if (cpu_ranks < 0 || gpus < 0) {
    return absl::InvalidArgumentError("--cpu-ranks and --gpus must not be negative");
  }
  int local_ranks = 1;
  if (backend == "cpu") {
    if (gpus > 0) {
      return absl::InvalidArgumentError("--gpus needs --backend cuda; use --cpu-ranks on CPU");
    }
    local_ranks = cpu_ranks > 0 ? cpu_ranks : 1;
  } else if (backend == "cuda") {
    if (cpu_ranks > 0) {
      return absl::InvalidArgumentError("--cpu-ranks needs --backend cpu; use --gpus on CUDA");
    }
    local_ranks = gpus > 0 ? gpus : 1;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--backend \"", backend, "\" is not one of cpu, cuda"));
  }
  if (!absl::GetFlag(FLAGS_coordinator_tls_name).empty() && WorkerCertificate().cert.empty()) {
    return absl::InvalidArgumentError(
        "--coordinator-tls-name names the certificate the replica port admits, which only a "
        "replica port with --tls-cert/--tls-key checks; give those too, or drop it");
  }
  ASSIGN_OR_RETURN(const gemma::parallel::DataPlane data_plane,
                   gemma::parallel::ParseDataPlane(absl::GetFlag(FLAGS_data_plane)));
  if (data_plane == gemma::parallel::DataPlane::kNccl && backend != "cuda") {
    return absl::InvalidArgumentError("--data-plane nccl needs --backend cuda (and --gpus)");
  }
  // Checked here so that a bad value stops the worker before it starts any rank process.
  RETURN_IF_ERROR(
      gemma::replica::ResolveKvDType(absl::GetFlag(FLAGS_kv_dtype), backend).status());
  const std::string tokenizer = TokenizerPath();
  if (!tokenizer.empty() && !std::filesystem::exists(tokenizer)) {
    return absl::InvalidArgumentError(absl::StrCat("--tokenizer ", tokenizer, " does not exist"));
  }
  const int nodes = absl::GetFlag(FLAGS_nodes);
  const int node_rank = absl::GetFlag(FLAGS_node_rank);
  const std::string name = absl::GetFlag(FLAGS_replica);
  if (nodes < 1 || node_rank < 0 || node_rank >= nodes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--node-rank ", node_rank, " must be in [0, --nodes ", nodes, ") and --nodes >= 1"));
  }
  if (nodes > 1 && name.empty()) {
    return absl::InvalidArgumentError(
        "--nodes > 1 needs --replica NAME, the same on every worker of the replica, so that "
        "their ranks find each other");
  }
  if (name.find_first_of("/ ") != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("--replica \"", name, "\" must not contain '/' or spaces"));
  }
  const int world_size = nodes * local_ranks;
  absl::StatusOr<gemma::parallel::ParallelMode> mode =
      gemma::parallel::ParseParallelMode(absl::GetFlag(FLAGS_mode));
  if (!mode.ok()) return mode.status();
  const int tp = absl::GetFlag(FLAGS_tp);
  if (*mode == gemma::parallel::ParallelMode::kTp) {
    if (tp != 0 && tp != world_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--tp ", tp, " in tp mode must equal the replica's ", world_size,
          " ranks or be omitted (--mode dp-ep splits them into data-parallel groups)"));
    }
  } else if (tp < 0 || world_size % std::max(1, tp) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--mode dp-ep: --tp ", tp, " (ranks per data-parallel group) must divide the replica's ",
        world_size, " ranks"));
  }
  if (const int redundant = absl::GetFlag(FLAGS_redundant_experts); redundant != 0) {
    RETURN_IF_ERROR(InitialPlacement(world_size).status());
  }
  if (absl::GetFlag(FLAGS_placement_load_delay_ms) < 0) {
    return absl::InvalidArgumentError("--placement-load-delay-ms must not be negative");
  }
  // The prefix of this replica's keys in the coordinator's rendezvous store: shared by its
  // nodes when it spans several, fresh for each start otherwise. The leader deletes the keys
  // once every rank has joined.
  std::random_device random;
  const std::string prefix =
      nodes > 1 ? absl::StrCat("replica-", name, "/")
                : absl::StrFormat("replica-%s%08x%08x/", name, random(), random());

  signal(SIGTERM, OnSignal);
  signal(SIGINT, OnSignal);
  std::vector<RankProcess> ranks;
  for (int local = 0; local < local_ranks; ++local) {
    const int rank = node_rank * local_ranks + local;
    absl::StatusOr<RankProcess> started =
        StartRank(rank, local, local_ranks, world_size, prefix, backend == "cuda");
    if (!started.ok()) {
      StopRanks(ranks);
      return started.status();
    }
    ranks.push_back(*started);
  }
  LOG(INFO) << "supervising " << local_ranks << " rank process" << (local_ranks > 1 ? "es" : "")
            << " (" << backend << "), ranks " << node_rank * local_ranks << ".."
            << (node_rank + 1) * local_ranks - 1 << " of " << world_size;
  // The ranks that lead a group (and serve requests): rank 0 in tp mode, the first of each
  // data-parallel group in dp-ep. On SIGTERM they drain first; the others follow their plans
  // until their leader stops them.
  const int group = *mode == gemma::parallel::ParallelMode::kDpEp ? std::max(1, tp) : world_size;
  auto is_leader = [&](int rank) { return rank % group == 0; };
  absl::Status result;
  bool draining = false;
  // Set once a leader drained and left: the replica is done, and in dp-ep the other groups'
  // ranks then lose their lockstep peer and may exit with an error; that is not a failure.
  bool replica_left = false;
  bool ready = false;  // every local rank has loaded (kReadyService)
  while (!g_force_stop.load()) {
    if (g_stop.load() && !draining) {
      draining = true;
      int leaders = 0;
      for (const RankProcess& r : ranks) {
        if (!is_leader(r.rank)) continue;
        kill(r.pid, SIGTERM);
        ++leaders;
      }
      if (health != nullptr) health->GetHealthCheckService()->SetServingStatus(false);
      if (health != nullptr) health->GetHealthCheckService()->SetServingStatus(kReadyService, false);
      if (leaders == 0) break;  // nothing here serves requests: stop at once
      LOG(INFO) << "draining: the replica finishes its requests (up to --drain-grace-s "
                << absl::GetFlag(FLAGS_drain_grace_s) << ") and leaves; SIGTERM again to stop now";
    }
    if (!ready && !draining) {
      for (RankProcess& r : ranks) {
        char byte = 0;
        if (!r.ready && r.ready_fd >= 0 && read(r.ready_fd, &byte, 1) == 1) r.ready = true;
      }
      ready = std::all_of(ranks.begin(), ranks.end(), [](const RankProcess& r) { return r.ready; });
      if (ready) {
        LOG(INFO) << "ranks " << node_rank * local_ranks << ".." << (node_rank + 1) * local_ranks - 1
                  << " loaded: ready";
        if (health != nullptr) {
          health->GetHealthCheckService()->SetServingStatus(kReadyService, true);
        }
      }
    }
    int status = 0;
    const pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid > 0) {
      for (auto it = ranks.begin(); it != ranks.end(); ++it) {
        if (it->pid != pid) continue;
        // A leader that drained and left (or was told to by the coordinator) exits 0: the
        // replica is done, the others stop with it.
        const bool left = WIFEXITED(status) && WEXITSTATUS(status) == 0 && is_leader(it->rank);
        if (left) {
          LOG(INFO) << "rank " << it->rank << " drained and left; stopping the replica";
          g_stop.store(true);
          draining = true;
          replica_left = true;
        } else if (replica_left) {
          LOG(INFO) << "rank " << it->rank << " " << DescribeExit(status)
                    << " after the replica left";
        } else if (!draining || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
          result = absl::UnavailableError(absl::StrCat(
              "rank ", it->rank, " (pid ", pid, ") ", DescribeExit(status),
              "; stopped the replica's other ranks"));
        }
        if (it->ready_fd >= 0) close(it->ready_fd);
        ranks.erase(it);
        break;
      }
      if (!result.ok()) break;
      const bool leaders_left = std::none_of(ranks.begin(), ranks.end(),
                                             [&](const RankProcess& r) { return is_leader(r.rank); });
      if (draining && leaders_left) break;
      continue;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (!result.ok()) LOG(ERROR) << result.message();
  StopRanks(ranks);
  return result;
}

// ---------------------------------------------------------------------------------------------
// Rank processes

absl::StatusOr<std::string> Register(iv1::Coordinator::Stub& stub,
                                     const iv1::RegisterRequest& request,
                                     std::chrono::seconds timeout) {
  iv1::RegisterResponse response;
  grpc::ClientContext context;
  gemma::AddBearer(context, gemma::EnvToken(gemma::kJoinTokenEnv));
  context.set_wait_for_ready(true);
  context.set_deadline(std::chrono::system_clock::now() + timeout);
  const grpc::Status status = stub.Register(&context, request, &response);
  if (status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
    return absl::DeadlineExceededError(absl::StrCat(
        "the coordinator at ", absl::GetFlag(FLAGS_coordinator), " did not answer within ",
        timeout.count(), " s; is it running and reachable? (--coordinator, --register-timeout-s)"));
  }
  RETURN_IF_ERROR(FromGrpc(status, absl::StrCat("registering with ",
                                                absl::GetFlag(FLAGS_coordinator))));
  return response.replica_id();
}

// One heartbeat; true when the coordinator took it. `draining` tells the coordinator to route
// nothing new here; *drain is set when the coordinator asks the replica to leave.
bool SendHeartbeat(iv1::Coordinator::Stub& stub, std::string* replica_id,
                   const iv1::RegisterRequest& registration,
                   const gemma::service::ReplicaLoad& load,
                   gemma::service::ExpertLoadRecorder& experts,
                   gemma::replica::LeaderExecutor& leader, int ranks_per_node, bool draining,
                   bool* drain) {
  iv1::HeartbeatRequest beat;
  beat.set_draining(draining);
  const gemma::eplb::Placement placement = leader.ActivePlacement();
  if (placement.num_ranks > 1) {
    *beat.mutable_expert_placement() = gemma::PlacementToProto(placement, ranks_per_node);
  }
  std::vector<gemma::v1::ExpertLoad> windows = experts.Drain();
  for (const gemma::v1::ExpertLoad& w : windows) *beat.add_expert_windows() = w;
  beat.set_replica_id(*replica_id);
  beat.set_address(registration.address());
  beat.set_running(load.running);
  beat.set_waiting(load.waiting);
  beat.set_preemptions(load.preemptions);
  const char* names[2] = {"sliding", "full"};
  for (int pool = 0; pool < 2; ++pool) {
    gemma::v1::KvPoolUsage* usage = beat.add_kv_pools();
    usage->set_name(names[pool]);
    usage->set_pages_used(load.pages_used[pool]);
    usage->set_pages_total(load.pages_total[pool]);
  }
  iv1::HeartbeatResponse reply;
  grpc::ClientContext context;
  gemma::AddBearer(context, gemma::EnvToken(gemma::kJoinTokenEnv));
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(900));
  grpc::Status status = stub.Heartbeat(&context, beat, &reply);
  // Windows the coordinator did not take go out again with the next heartbeat.
  if (!status.ok() || !reply.known()) experts.Requeue(std::move(windows));
  if (status.ok() && reply.drain()) *drain = true;
  if (status.ok() && reply.has_expert_placement()) {
    absl::StatusOr<gemma::eplb::Placement> offer =
        gemma::PlacementFromProto(reply.expert_placement());
    if (!offer.ok()) {
      LOG_EVERY_N(WARNING, 10) << "the coordinator offered an expert placement this replica "
                               << "cannot use: " << offer.status();
    } else if (offer->num_layers != placement.num_layers ||
               offer->num_experts != placement.num_experts ||
               offer->num_ranks != placement.num_ranks ||
               offer->slots_per_rank != placement.slots_per_rank) {
      LOG_EVERY_N(WARNING, 10) << "the coordinator offered an expert placement of another "
                               << "shape (" << offer->num_ranks << " ranks x "
                               << offer->slots_per_rank << " slots); ignored";
    } else {
      leader.OfferPlacement(*std::move(offer));
    }
  }
  if (!status.ok()) {
    LOG_EVERY_N(WARNING, 10) << "heartbeat to " << absl::GetFlag(FLAGS_coordinator)
                             << " failed: " << status.error_message();
  } else if (!reply.known() && draining) {
    LOG(WARNING) << "the coordinator does not know replica " << *replica_id
                 << " (it restarted?); draining, so not registering again";
  } else if (!reply.known()) {
    LOG(WARNING) << "the coordinator does not know replica " << *replica_id
                 << "; registering again";
    absl::StatusOr<std::string> again = Register(stub, registration, std::chrono::seconds(5));
    if (again.ok()) {
      *replica_id = *again;
    } else {
      LOG(WARNING) << again.status();
    }
  }
  // A draining replica that the coordinator forgot (it restarted) does not register again:
  // nothing new is to come here, and the requests it served went with the old coordinator.
  // Taken as announced, so the replica leaves once idle.
  if (draining && status.ok() && !reply.known()) return true;
  return status.ok() && reply.known();
}

// A group leader (rank 0, or in dp-ep the first rank of each data-parallel group): the engine
// loop, the Replica service, registration and heartbeats, until SIGTERM. `plans` carries the
// step plans to the group's other ranks (null: none); `leaders` (dp-ep with several groups)
// steps the group leaders in lockstep.
absl::Status RunLeader(gemma::replica::RankEnv& env, gemma::replica::LoadedRank& loaded,
                       iv1::Coordinator::Stub& stub, gemma::parallel::Communicator* plans,
                       gemma::parallel::Communicator* leaders) {
  const std::string model_dir = absl::GetFlag(FLAGS_model);
  const std::string tokenizer_path = TokenizerPath();
  ASSIGN_OR_RETURN(std::string fingerprint,
                   gemma::service::ModelFingerprint(model_dir, tokenizer_path));
  std::unique_ptr<gemma::tokenizer::Tokenizer> tokenizer;
  if (!tokenizer_path.empty()) {
    ASSIGN_OR_RETURN(tokenizer, gemma::tokenizer::Tokenizer::FromFile(tokenizer_path));
  }
  gemma::engine::EngineOptions options;
  options.tokenizer = tokenizer.get();
  options.scheduler.admission = absl::GetFlag(FLAGS_kv_admission) == "first-chunk"
                                    ? gemma::engine::Admission::kFirstChunk
                                    : gemma::engine::Admission::kReserve;
  options.scheduler.head_bypass_steps = absl::GetFlag(FLAGS_head_bypass_steps);
  auto executor = std::make_unique<gemma::replica::LeaderExecutor>(
      loaded.model.get(), plans,
      std::chrono::milliseconds(absl::GetFlag(FLAGS_placement_load_delay_ms)));
  gemma::replica::LeaderExecutor* leader = executor.get();
  absl::StatusOr<std::unique_ptr<gemma::engine::Engine>> created = gemma::engine::Engine::Create(
      std::move(executor), loaded.model->config(), loaded.cache.get(), options);
  if (!created.ok()) {
    // The pools are sized from --cache-tokens (and --page-size): name them.
    return absl::Status(created.status().code(),
                        absl::StrCat(created.status().message(), "; raise --cache-tokens (",
                                     absl::GetFlag(FLAGS_cache_tokens), ") or lower --page-size (",
                                     absl::GetFlag(FLAGS_page_size), ")"));
  }
  std::unique_ptr<gemma::engine::Engine> engine = *std::move(created);
  gemma::service::ReplicaLoad load;
  for (int pool = 0; pool < 2; ++pool) {
    load.pages_total[pool] = loaded.cache->pool(pool).num_pages();
  }
  // Expert load, counted on the leader (its group's ranks route the same tokens) and sent in
  // windows of about one heartbeat.
  RETURN_IF_ERROR(loaded.model->EnableExpertCounts());
  gemma::service::ExpertLoadRecorder experts(
      std::chrono::milliseconds(absl::GetFlag(FLAGS_heartbeat_ms)));
  gemma::replica::LoadedRank* rank = &loaded;
  engine->set_step_observer([&load, &experts, rank](const gemma::engine::StepStats& stats) {
    // A window closes when it has lasted a heartbeat, or when the replica falls idle.
    const bool idle = stats.num_running == 0 && stats.num_waiting == 0;
    if (absl::Status s = experts.OnStep(*rank->model, stats.step, stats.tokens_recomputed, idle);
        !s.ok()) {
      LOG_EVERY_N(WARNING, 100) << "expert counts: " << s;
    }
    load.running = stats.num_running;
    load.waiting = stats.num_waiting;
    load.preemptions += stats.num_preempted;
    for (int pool = 0; pool < 2; ++pool) {
      load.pages_used[pool] = stats.pages_used[pool];
      load.pages_total[pool] = stats.pages_total[pool];
    }
  });

  std::atomic<bool> engine_stop{false};
  absl::Status engine_status;
  std::thread engine_thread([&] {
    engine_status =
        gemma::replica::RunLeaderLoop(*engine, *leader, *loaded.cache, leaders, &engine_stop);
    if (!engine_status.ok()) {
      LOG(ERROR) << "engine loop failed: " << engine_status;
      g_stop.store(true);
    }
  });
  auto stop_engine = [&] {
    engine_stop.store(true);
    engine_thread.join();
    // Lets the other ranks leave their plan loop (they may be gone already).
    if (plans != nullptr && engine_status.ok()) leader->Stop().IgnoreError();
  };

  gemma::service::ReplicaService service(
      engine.get(), tokenizer.get(),
      WorkerCertificate().cert.empty() ? std::string() : absl::GetFlag(FLAGS_coordinator_tls_name));
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  std::string listen = absl::GetFlag(FLAGS_listen);
  // Each data-parallel group led from this node serves on its own port: the given one for the
  // first, the next ports for the others (ephemeral ones with port 0), so that a pod's groups
  // have fixed ports its network policy can name.
  const int node_first_rank = absl::GetFlag(FLAGS_node_rank) * absl::GetFlag(FLAGS_local_ranks);
  const int local_group =
      std::max(0, env.world.rank() - node_first_rank) / std::max(1, env.world.tp_size());
  if (local_group > 0) {
    int base = 0;
    if (!absl::SimpleAtoi(listen.substr(listen.rfind(':') + 1), &base)) base = 0;
    listen = absl::StrCat(HostOf(listen), ":", base > 0 ? base + local_group : 0);
  }
  // With a certificate the replica port speaks mutual TLS: only the coordinator (its client
  // certificate signed by --coordinator-ca) may call it.
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> server_credentials =
      gemma::ServerCredentialsFor(WorkerCertificate(), WorkerCertificate().cert.empty()
                                                           ? std::string()
                                                           : absl::GetFlag(FLAGS_coordinator_ca));
  if (!server_credentials.ok()) {
    stop_engine();
    return server_credentials.status();
  }
  gemma::ListenExclusively(builder, listen, *server_credentials, &port);
  builder.experimental().SetInterceptorCreators(gemma::ParseErrorInterceptors());
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    stop_engine();
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", listen, " (in use by another process?)"));
  }
  std::string address = absl::GetFlag(FLAGS_advertise);
  if (address.empty()) {
    address = absl::StrCat(HostOf(listen), ":", port);
  } else if (local_group > 0) {
    // --advertise names the first group's port; the others are where they listen.
    address = absl::StrCat(HostOf(address), ":", port);
  }
  // On stdout, for scripts that start workers with port 0.
  std::printf("replica serving on %s\n", address.c_str());
  std::fflush(stdout);
  LOG(INFO) << "replica serving on " << address << ", " << env.world.world_size()
            << " rank(s), fingerprint " << fingerprint;

  const gemma::ModelConfig& config = loaded.model->config();
  iv1::RegisterRequest registration;
  registration.set_protocol_version(kProtocolVersion);
  registration.set_model_fingerprint(fingerprint);
  registration.set_address(address);
  registration.set_vocab_size(static_cast<int32_t>(config.vocab_size));
  registration.set_max_context(
      std::min<int64_t>(config.max_position_embeddings, absl::GetFlag(FLAGS_cache_tokens)));
  registration.set_world_size(env.world.world_size());
  registration.set_model_name(absl::GetFlag(FLAGS_model_name));
  registration.set_name(absl::GetFlag(FLAGS_replica));
  registration.set_replica_tls(!WorkerCertificate().cert.empty());
  if (env.world.mode() == gemma::parallel::ParallelMode::kDpEp) {
    const int groups = env.world.world_size() / env.world.tp_size();
    registration.set_parallel(absl::StrCat("dp-ep ep=", env.world.world_size(),
                                           " tp=", env.world.tp_size(), " group ",
                                           env.world.dp_group() + 1, "/", groups));
    // The groups' entries balance their experts together: the replica's rendezvous prefix is
    // theirs alone.
    registration.set_placement_group(absl::GetFlag(FLAGS_store_prefix));
  } else {
    registration.set_parallel(env.world.world_size() > 1
                                  ? absl::StrCat("tp=", env.world.world_size())
                                  : std::string("single"));
  }
  absl::StatusOr<std::string> replica_id =
      Register(stub, registration, std::chrono::seconds(absl::GetFlag(FLAGS_register_timeout_s)));
  if (!replica_id.ok()) {
    server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    stop_engine();
    return replica_id.status();
  }
  LOG(INFO) << "registered with " << absl::GetFlag(FLAGS_coordinator) << " as replica "
            << *replica_id;

  // Serves until SIGTERM or the coordinator's drain; then drains: the heartbeats say so (no new
  // requests come), the requests in flight finish (up to --drain-grace-s), and it leaves.
  auto next_beat = Clock::now();
  bool draining = false, drain_requested = false, drain_announced = false;
  Clock::time_point drain_deadline;
  while (!g_force_stop.load()) {
    if (!draining && (g_stop.load() || drain_requested)) {
      draining = true;
      drain_deadline = Clock::now() + std::chrono::seconds(absl::GetFlag(FLAGS_drain_grace_s));
      next_beat = Clock::now();  // tell the coordinator now
      LOG(INFO) << "draining" << (drain_requested ? " (the coordinator asked)" : "")
                << ": no new requests; waiting up to " << absl::GetFlag(FLAGS_drain_grace_s)
                << " s for the ones in flight";
    }
    if (draining) {
      // Leave once the coordinator knows and nothing is left, or the grace is over (what is
      // still running then fails over elsewhere with the tokens it streamed).
      if (drain_announced && !engine->HasWork() && (leaders == nullptr || leader->replica_idle())) {
        break;
      }
      if (Clock::now() >= drain_deadline) {
        LOG(WARNING) << "drain grace over with requests in flight; they move to other replicas";
        break;
      }
    }
    if (Clock::now() >= next_beat) {
      next_beat += std::chrono::milliseconds(absl::GetFlag(FLAGS_heartbeat_ms));
      const bool taken = SendHeartbeat(stub, &*replica_id, registration, load, experts, *leader,
                                       env.parallel.ranks_per_node, draining, &drain_requested);
      if (draining && taken) drain_announced = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  LOG(INFO) << "shutting down";
  // The calls still open (their last messages on the way) end first: the coordinator is told
  // the replica left only once nothing it relays can be cut.
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  if (draining && !g_force_stop.load()) {
    // A clean leave: the coordinator forgets the replica now rather than showing it unhealthy.
    iv1::HeartbeatRequest left;
    left.set_replica_id(*replica_id);
    left.set_address(registration.address());
    left.set_draining(true);
    left.set_left(true);
    iv1::HeartbeatResponse reply;
    grpc::ClientContext context;
    gemma::AddBearer(context, gemma::EnvToken(gemma::kJoinTokenEnv));
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(900));
    if (const grpc::Status sent = stub.Heartbeat(&context, left, &reply); !sent.ok()) {
      LOG(WARNING) << "could not tell the coordinator this replica left: "
                   << sent.error_message();
    }
  }
  stop_engine();
  return engine_status;
}

absl::Status RunRank() {
  const int rank = absl::GetFlag(FLAGS_rank);
  const int world_size = absl::GetFlag(FLAGS_world_size);
  const std::string coordinator = absl::GetFlag(FLAGS_coordinator);
  if (world_size < 1 || rank >= world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", rank, " of world size ", world_size, " is not a valid rank"));
  }
  // A peer rank that dies must surface as an error on the socket, not kill this process.
  signal(SIGPIPE, SIG_IGN);
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> credentials,
                   CoordinatorChannelCredentials());
  auto channel = CoordinatorChannel(coordinator, credentials);
  std::unique_ptr<iv1::Coordinator::Stub> stub = iv1::Coordinator::NewStub(channel);
  const auto timeout = std::chrono::seconds(absl::GetFlag(FLAGS_comm_timeout_s));
  const std::string backend = absl::GetFlag(FLAGS_backend);

  std::unique_ptr<gemma::service::GrpcStore> store;
  auto body = [&](gemma::replica::RankEnv& env) -> absl::Status {
    const bool group_leader = env.world.tp_rank() == 0;
    if (group_leader) {
      signal(SIGTERM, OnSignal);
      signal(SIGINT, OnSignal);
    } else {
      // The supervisor's SIGTERM ends a follower at once; one sent to the whole process group
      // (which the supervisor got too, and drains) is ignored, since ending here would cut the
      // group's lockstep mid-drain. Ctrl-C is the supervisor's to handle.
      struct sigaction action {};
      action.sa_sigaction = [](int, siginfo_t* info, void*) {
        if (info != nullptr && info->si_pid == getppid()) {
          signal(SIGTERM, SIG_DFL);
          raise(SIGTERM);
        }
      };
      action.sa_flags = SA_SIGINFO;
      sigemptyset(&action.sa_mask);
      sigaction(SIGTERM, &action, nullptr);
      signal(SIGINT, SIG_IGN);
    }
    ASSIGN_OR_RETURN(std::unique_ptr<gemma::eplb::Placement> placement,
                     InitialPlacement(env.world.world_size()));
    env.parallel.placement = placement.get();
    env.parallel.ranks_per_node = env.world.ranks_per_node();
    ASSIGN_OR_RETURN(gemma::replica::LoadedRank loaded,
                     gemma::replica::LoadRank({.model_dir = absl::GetFlag(FLAGS_model),
                                               .backend = backend,
                                               .threads = absl::GetFlag(FLAGS_threads),
                                               .ranks_in_process = absl::GetFlag(FLAGS_local_ranks),
                                               .cache_tokens = absl::GetFlag(FLAGS_cache_tokens),
                                               .page_size = absl::GetFlag(FLAGS_page_size),
                                               .kv_dtype = absl::GetFlag(FLAGS_kv_dtype),
                                               .enforce_eager = absl::GetFlag(FLAGS_enforce_eager),
                                               .parallel = env.parallel}));
    if (env.control != nullptr) {
      // Ready only when every rank has loaded its slices; the rendezvous keys are done with.
      RETURN_IF_ERROR(env.control->Barrier());
      if (rank == 0 && store != nullptr) store->Clear().IgnoreError();
    }
    if (const int fd = absl::GetFlag(FLAGS_ready_fd); fd >= 0) {
      // Tells the supervisor this rank is loaded (its readiness on --health-listen).
      const char byte = 'r';
      if (write(fd, &byte, 1) != 1) LOG(WARNING) << "could not tell the supervisor it loaded";
      close(fd);
    }
    const bool dp_ep = env.world.mode() == gemma::parallel::ParallelMode::kDpEp;
    gemma::parallel::Communicator* plans = dp_ep ? env.group_control : env.control;
    if (!group_leader) {
      LOG(INFO) << "rank " << rank << " loaded; following its group leader's step plans";
      return gemma::replica::FollowPlans(
          *loaded.model, *loaded.cache, plans,
          std::chrono::milliseconds(absl::GetFlag(FLAGS_placement_load_delay_ms)));
    }
    return RunLeader(env, loaded, *stub, plans, dp_ep ? env.leaders : nullptr);
  };

  if (world_size == 1) {
    gemma::parallel::WorldConfig::Options single;
    ASSIGN_OR_RETURN(gemma::parallel::WorldConfig world,
                     gemma::parallel::WorldConfig::Create(single));
    gemma::replica::RankEnv env{world, {}, nullptr, 1, true};
    return body(env);
  }
  store = std::make_unique<gemma::service::GrpcStore>(stub.get(),
                                                      absl::GetFlag(FLAGS_store_prefix), timeout);
  // Every node must agree on the replica's size before joining groups of that size.
  const std::string layout =
      absl::StrCat(world_size, " ranks, --mode ", absl::GetFlag(FLAGS_mode), " --tp ",
                   absl::GetFlag(FLAGS_tp), " --backend ", absl::GetFlag(FLAGS_backend),
                   " --data-plane ", absl::GetFlag(FLAGS_data_plane));
  RETURN_IF_ERROR(store->Set(absl::StrCat("layout/", rank), layout));
  ASSIGN_OR_RETURN(std::string leader_layout, store->Get("layout/0", timeout));
  if (leader_layout != layout) {
    return absl::FailedPreconditionError(absl::StrCat(
        "rank ", rank, " sees the replica as ", layout, " but rank 0 as ", leader_layout,
        "; every worker of a replica needs the same --nodes, --cpu-ranks (or --gpus), --mode, "
        "--tp, --backend and --data-plane"));
  }
  gemma::replica::ProcessRankOptions options;
  ASSIGN_OR_RETURN(options.world.mode,
                   gemma::parallel::ParseParallelMode(absl::GetFlag(FLAGS_mode)));
  options.world.tp_size = options.world.mode == gemma::parallel::ParallelMode::kTp
                              ? world_size
                              : std::max(1, absl::GetFlag(FLAGS_tp));
  options.world.world_size = world_size;
  options.world.rank = rank;
  options.group_channels = true;
  const std::string host = HostOf(absl::GetFlag(FLAGS_listen));
  if (host.empty() || host == "0.0.0.0" || host == "[::]" || host == "::") {
    char name[256] = {0};
    gethostname(name, sizeof(name) - 1);
    options.hostname = name;
  } else {
    options.hostname = host;
  }
  options.interface = absl::GetFlag(FLAGS_interface);
  options.check_routing = absl::GetFlag(FLAGS_check_routing);
  options.timeout = timeout;
  if (absl::GetFlag(FLAGS_backend) == "cuda") {
    ASSIGN_OR_RETURN(options.data_plane,
                     gemma::parallel::ParseDataPlane(absl::GetFlag(FLAGS_data_plane)));
    // A GPU rank process sees one device (its CUDA_VISIBLE_DEVICES, set by StartRank).
    options.cuda_device = 0;
  }
  // Followers wait on the control group for as long as the replica is idle.
  options.control_timeout = std::chrono::hours(24 * 365);
  absl::Status status = gemma::replica::RunProcessRank(options, *store, body);
  if (rank == 0) store->Clear().IgnoreError();
  return status;
}

absl::Status Run() {
  // The join token travels in the environment: the calls here read it, and the rank processes
  // inherit it.
  if (const std::string token = absl::GetFlag(FLAGS_join_token); !token.empty()) {
    setenv(gemma::kJoinTokenEnv, token.c_str(), 1);
  }
  if (absl::GetFlag(FLAGS_rank) >= 0) return RunRank();
  return Supervise();
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv, argv + argc);
  g_argv = &args;
  return gemma::ToolMain(
      argc, argv, "gemma-worker",
      "serves one replica of the model (one process per rank) and registers it with the "
      "coordinator\n"
      "  gemma-worker --coordinator HOST:PORT --model DIR [--cpu-ranks N | --backend cuda "
      "--gpus N]\n"
      "               [--listen HOST:PORT] [--advertise HOST:PORT] [--tokenizer FILE] "
      "[--threads T]",
      Run);
}
