// gemma-worker: one single-rank CPU replica. Loads the model, runs the engine loop on a
// background thread, serves gemma.internal.v1.Replica, registers with the coordinator and
// heartbeats every second until SIGTERM or SIGINT.
//   gemma-worker --coordinator HOST:PORT --model DIR --listen HOST:PORT [--tokenizer FILE]
#include <signal.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "gemma/internal/v1/worker.grpc.pb.h"
#include "glog/logging.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "worker/cli/cli_common.h"
#include "worker/engine/engine.h"
#include "worker/engine/kv_cache.h"
#include "worker/service/fingerprint.h"
#include "worker/service/replica_service.h"

ABSL_FLAG(std::string, coordinator, "", "coordinator address HOST:PORT");
ABSL_FLAG(std::string, model, "", "Hugging Face Gemma 4 checkpoint directory");
ABSL_FLAG(std::string, listen, "127.0.0.1:0", "address to serve the replica on, HOST:PORT");
ABSL_FLAG(std::string, advertise, "", "address the coordinator dials (default: --listen)");
ABSL_FLAG(std::string, tokenizer, "", "tokenizer.json (text requests need one)");
ABSL_FLAG(int32_t, threads, 0, "CPU threads (0: all cores)");
ABSL_FLAG(int64_t, cache_tokens, 16384, "KV-cache capacity in positions");
ABSL_FLAG(int64_t, page_size, 16, "KV-cache page size in tokens");

namespace {

constexpr uint32_t kProtocolVersion = 1;
std::atomic<bool> g_stop{false};

void OnSignal(int) { g_stop.store(true); }

namespace iv1 = gemma::internal::v1;

absl::Status FromGrpc(const grpc::Status& status, absl::string_view what) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      absl::StrCat(what, ": ", status.error_message()));
}

absl::StatusOr<std::string> Register(iv1::Coordinator::Stub& stub, const std::string& fingerprint,
                                     const std::string& address) {
  iv1::RegisterRequest request;
  request.set_protocol_version(kProtocolVersion);
  request.set_model_fingerprint(fingerprint);
  request.set_address(address);
  iv1::RegisterResponse response;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  RETURN_IF_ERROR(FromGrpc(stub.Register(&context, request, &response),
                           absl::StrCat("registering with ", absl::GetFlag(FLAGS_coordinator))));
  return response.replica_id();
}

absl::Status Run() {
  const std::string coordinator = absl::GetFlag(FLAGS_coordinator);
  if (coordinator.empty()) return absl::InvalidArgumentError("--coordinator is required");
  const std::string model_dir = absl::GetFlag(FLAGS_model);
  ASSIGN_OR_RETURN(std::string fingerprint, gemma::service::ModelFingerprint(model_dir));
  std::unique_ptr<gemma::tokenizer::Tokenizer> tokenizer;
  if (!absl::GetFlag(FLAGS_tokenizer).empty()) {
    ASSIGN_OR_RETURN(tokenizer, gemma::tokenizer::Tokenizer::FromFile(absl::GetFlag(FLAGS_tokenizer)));
  }
  ASSIGN_OR_RETURN(gemma::cli::LoadedModel loaded,
                   gemma::cli::LoadForCli(model_dir, absl::GetFlag(FLAGS_threads),
                                          absl::GetFlag(FLAGS_cache_tokens),
                                          absl::GetFlag(FLAGS_page_size)));
  gemma::engine::EngineOptions options;
  options.tokenizer = tokenizer.get();
  ASSIGN_OR_RETURN(std::unique_ptr<gemma::engine::Engine> engine,
                   gemma::engine::Engine::Create(loaded.model.get(), loaded.cache.get(), options));
  gemma::service::ReplicaLoad load;
  for (int pool = 0; pool < 2; ++pool) {
    load.pages_total[pool] = loaded.cache->pool(pool).num_pages();
  }
  engine->set_step_observer([&load](const gemma::engine::StepStats& stats) {
    load.running = stats.num_running;
    load.waiting = stats.num_waiting;
    for (int pool = 0; pool < 2; ++pool) {
      load.pages_used[pool] = stats.pages_used[pool];
      load.pages_total[pool] = stats.pages_total[pool];
    }
  });

  std::atomic<bool> engine_stop{false};
  absl::Status engine_status;
  std::thread engine_thread([&] {
    engine_status = engine->Run(&engine_stop);
    if (!engine_status.ok()) {
      LOG(ERROR) << "engine loop failed: " << engine_status;
      g_stop.store(true);
    }
  });

  gemma::service::ReplicaService service(engine.get(), tokenizer.get());
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(absl::GetFlag(FLAGS_listen), grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  auto stop_engine = [&] {
    engine_stop.store(true);
    engine_thread.join();
  };
  if (server == nullptr || port == 0) {
    stop_engine();
    return absl::UnavailableError(absl::StrCat("cannot listen on ", absl::GetFlag(FLAGS_listen)));
  }
  std::string address = absl::GetFlag(FLAGS_advertise);
  if (address.empty()) {
    const std::string listen = absl::GetFlag(FLAGS_listen);
    address = absl::StrCat(listen.substr(0, listen.rfind(':')), ":", port);
  }
  LOG(INFO) << "replica serving on " << address << ", fingerprint " << fingerprint;

  auto channel = grpc::CreateChannel(coordinator, grpc::InsecureChannelCredentials());
  std::unique_ptr<iv1::Coordinator::Stub> stub = iv1::Coordinator::NewStub(channel);
  absl::StatusOr<std::string> replica_id = Register(*stub, fingerprint, address);
  if (!replica_id.ok()) {
    server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    stop_engine();
    return replica_id.status();
  }
  LOG(INFO) << "registered with " << coordinator << " as replica " << *replica_id;

  signal(SIGTERM, OnSignal);
  signal(SIGINT, OnSignal);
  auto next_beat = std::chrono::steady_clock::now();
  while (!g_stop.load()) {
    if (std::chrono::steady_clock::now() >= next_beat) {
      next_beat += std::chrono::seconds(1);
      iv1::HeartbeatRequest beat;
      beat.set_replica_id(*replica_id);
      beat.set_running(load.running);
      beat.set_waiting(load.waiting);
      const char* names[2] = {"sliding", "full"};
      for (int pool = 0; pool < 2; ++pool) {
        gemma::v1::KvPoolUsage* usage = beat.add_kv_pools();
        usage->set_name(names[pool]);
        usage->set_pages_used(load.pages_used[pool]);
        usage->set_pages_total(load.pages_total[pool]);
      }
      iv1::HeartbeatResponse reply;
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(900));
      grpc::Status status = stub->Heartbeat(&context, beat, &reply);
      if (!status.ok()) {
        LOG_EVERY_N(WARNING, 10) << "heartbeat to " << coordinator << " failed: "
                                 << status.error_message();
      } else if (!reply.known()) {
        LOG(WARNING) << "the coordinator forgot replica " << *replica_id << "; registering again";
        absl::StatusOr<std::string> again = Register(*stub, fingerprint, address);
        if (again.ok()) {
          replica_id = again;
        } else {
          LOG(WARNING) << again.status();
        }
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  LOG(INFO) << "shutting down";
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  stop_engine();
  return engine_status;
}

}  // namespace

int main(int argc, char** argv) {
  return gemma::cli::ToolMain(
      argc, argv, "gemma-worker",
      "serves one single-rank CPU replica and registers it with the coordinator\n"
      "  gemma-worker --coordinator HOST:PORT --model DIR --listen HOST:PORT [--tokenizer FILE]",
      Run);
}
