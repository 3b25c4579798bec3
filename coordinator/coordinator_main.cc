// gemma-coordinator: the cluster's front door. Serves gemma.v1.Inference (routed to the healthy
// replica with the fewest outstanding requests), gemma.v1.Cluster, the internal Coordinator
// service for workers, grpc.health.v1 and reflection, until SIGTERM or SIGINT.
//   gemma-coordinator --listen HOST:PORT [--heartbeat-timeout-ms 3000]
#include <signal.h>

#include <atomic>
#include <chrono>
#include <iostream>
#include <memory>
#include <string>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "coordinator/registry.h"
#include "coordinator/services.h"
#include "glog/logging.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"

ABSL_FLAG(std::string, listen, "0.0.0.0:50051", "address to serve on, HOST:PORT");
ABSL_FLAG(int64_t, heartbeat_timeout_ms, 3000,
          "a replica without a heartbeat for this long is unhealthy");

namespace {

std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop.store(true); }

// "--some-flag" -> "--some_flag" (flags are documented with dashes).
void NormalizeFlagDashes(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--") break;
    if (arg.rfind("--", 0) != 0) continue;
    for (char* p = argv[i] + 2; *p != '\0' && *p != '='; ++p) {
      if (*p == '-') *p = '_';
    }
  }
}

int Run() {
  const int64_t timeout_ms = absl::GetFlag(FLAGS_heartbeat_timeout_ms);
  if (timeout_ms <= 0) {
    std::cerr << "gemma-coordinator: --heartbeat-timeout-ms must be positive\n";
    return 1;
  }
  gemma::coordinator::Registry registry{std::chrono::milliseconds(timeout_ms)};
  gemma::coordinator::InferenceService inference(&registry);
  gemma::coordinator::ClusterService cluster(&registry);
  gemma::coordinator::CoordinatorService coordinator(&registry);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(absl::GetFlag(FLAGS_listen), grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&inference);
  builder.RegisterService(&cluster);
  builder.RegisterService(&coordinator);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    std::cerr << "gemma-coordinator: cannot listen on " << absl::GetFlag(FLAGS_listen) << "\n";
    return 1;
  }
  LOG(INFO) << "coordinator serving on port " << port;
  signal(SIGTERM, OnSignal);
  signal(SIGINT, OnSignal);
  while (!g_stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  LOG(INFO) << "shutting down";
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "routes gemma.v1 requests to the registered replicas\n"
      "  gemma-coordinator --listen HOST:PORT [--heartbeat-timeout-ms 3000]");
  NormalizeFlagDashes(argc, argv);
  absl::ParseCommandLine(argc, argv);
  google::InitGoogleLogging(argv[0]);
  FLAGS_logtostderr = true;
  return Run();
}
