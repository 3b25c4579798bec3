// gemma-coordinator: the cluster's front door. Serves gemma.v1.Inference (admitted, routed to the
// healthy replica with the fewest outstanding requests, moved to another replica when one
// fails), gemma.v1.Cluster, the internal Coordinator service for workers (membership and the
// rendezvous store), grpc.health.v1 and reflection, until SIGTERM or SIGINT.
//   gemma-coordinator --listen HOST:PORT [--heartbeat-timeout-ms 3000]
//                     [--max-outstanding-per-replica 256] [--max-attempts 3]
#include <arpa/inet.h>
#include <netinet/in.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <string>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/flags.h"
#include "coordinator/auth.h"
#include "coordinator/batch_store.h"
#include "coordinator/batches.h"
#include "coordinator/dashboard.h"
#include "coordinator/metrics.h"
#include "coordinator/openai_api.h"
#include "coordinator/openai_batch_api.h"
#include "coordinator/proxy.h"
#include "coordinator/registry.h"
#include "coordinator/services.h"
#include "coordinator/store.h"
#include "proto/parse_errors.h"
#include "proto/listen.h"
#include "proto/tls.h"
#include "glog/logging.h"
#include "google/protobuf/util/json_util.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "httplib.h"

ABSL_FLAG(std::string, listen, "0.0.0.0:50051", "address to serve on, HOST:PORT");
ABSL_FLAG(int64_t, heartbeat_timeout_ms, 3000,
          "a replica without a heartbeat for this long is unhealthy; also how long a request "
          "whose replica failed waits for a healthy replica to take it over");
ABSL_FLAG(int64_t, forget_after_ms, 60000,
          "a replica without a heartbeat for this long is dropped from the status (0: never); "
          "its worker registers again if it comes back");
ABSL_FLAG(int64_t, max_outstanding_per_replica, 256,
          "admission limit: requests in flight on one replica; when every healthy replica is "
          "at it, new requests get RESOURCE_EXHAUSTED");
ABSL_FLAG(std::string, http_listen, "",
          "HOST:PORT of the HTTP port (/metrics in the Prometheus text format, /dashboard, the "
          "OpenAI-compatible /v1 API); empty: none");
ABSL_FLAG(int32_t, http_threads, 512,
          "threads serving the HTTP port: each open HTTP connection (a streaming request, an "
          "idle keep-alive connection for up to 5 s) holds one, and connections beyond them "
          "wait for one");
ABSL_FLAG(bool, metrics_per_expert, false,
          "also export gemma:expert_tokens_total per layer and expert (layers x experts series)");
ABSL_FLAG(std::string, served_model_name, "gemma-4",
          "the model id of the OpenAI-compatible API on the HTTP port (the \"model\" clients "
          "name; GET /v1/models lists it)");
ABSL_FLAG(std::string, data_dir, "",
          "directory of the coordinator's durable state (batch jobs and uploaded files, in "
          "SQLite); created if missing; empty: no batches");
ABSL_FLAG(int32_t, batch_max_in_flight_per_replica, 4,
          "batch items running at once per healthy replica (interactive requests go first)");
ABSL_FLAG(int64_t, stall_timeout_ms, 60000,
          "a replica's call that streams nothing for this long (the first token included) "
          "fails that replica and moves the request on; 0: no watchdog");
ABSL_FLAG(std::string, auth_tokens, "",
          "file of bearer tokens, one \"TOKEN ROLE [NAME]\" a line (roles: user for the API, "
          "worker for workers joining, admin for both): every gRPC call and every /v1 request "
          "must carry one; empty: the coordinator is open to anyone who can reach it");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain of this coordinator: with --tls-key, its gRPC port and its "
          "HTTP port speak TLS only (clients verify it: gemmactl --tls-ca, gemma-worker "
          "--coordinator-ca)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls-cert");
ABSL_FLAG(std::string, internal_listen, "",
          "HOST:PORT of a separate internal port for workers (registration, heartbeats, the "
          "rendezvous store): with it the public --listen port no longer serves them; empty: "
          "workers join on the public port");
ABSL_FLAG(std::string, internal_tls_cert, "",
          "PEM certificate chain the internal port serves (with --internal-tls-key); with "
          "--internal-ca it is also the client certificate this coordinator presents to the "
          "workers' replica ports");
ABSL_FLAG(std::string, internal_tls_key, "", "PEM private key of --internal-tls-cert");
ABSL_FLAG(std::string, internal_ca, "",
          "PEM CA of the workers' certificates: the internal port speaks mutual TLS (a worker "
          "joins only with a client certificate this CA signed, no join token needed) and the "
          "coordinator calls replicas over TLS, verifying their certificates against it");
ABSL_FLAG(std::string, replica_tls_name, "",
          "with --internal-ca: the DNS name every worker's certificate must carry, checked "
          "instead of the host of the address it registers (for pods, whose addresses are not "
          "known when their certificate is made: give all workers one certificate naming, "
          "e.g., gemma-worker); empty: each worker's certificate must name its --advertise host");
ABSL_FLAG(bool, insecure, false,
          "serve without TLS (no --tls-cert) or without tokens (no --auth-tokens): without "
          "this flag the coordinator refuses to start open");
ABSL_FLAG(int64_t, queue_wait_ms, 5000,
          "a request that finds every replica of its model full (or none up) waits up to this "
          "long in the admission queue (and never past its own deadline) before it is refused; "
          "0: refused at once");
ABSL_FLAG(int64_t, max_queued, 1024, "requests the admission queue holds; past it, refused at once");
ABSL_FLAG(std::string, models, "",
          "JSON or YAML (.yaml, .yml) file of the models served: per model its name, checkpoint path on the workers, "
          "replica layout and replica count (min/max); workers started without --model are "
          "assigned from it, requests pick one by name (\"model\"); the first is the default. "
          "Empty: one model, named --served-model-name");
ABSL_FLAG(double, rebalance_threshold, 0.85,
          "rebalance a replica's experts on its own when its rank balancedness (mean over max "
          "tokens per rank) over --rebalance-window windows is below this; 0: only on request "
          "(gemmactl rebalance)");
ABSL_FLAG(int32_t, rebalance_window, 10,
          "expert-load windows (about a heartbeat each) a rebalance is fitted to and judged on");
ABSL_FLAG(int32_t, rebalance_min_interval_s, 60,
          "seconds at least between two automatic rebalances of one replica");
ABSL_FLAG(double, rebalance_min_gain, 0.05,
          "the rise in predicted rank balancedness an automatic rebalance needs");
ABSL_FLAG(int32_t, max_attempts, 3,
          "sends of one request to replicas, the first included, before it fails with "
          "UNAVAILABLE (each failure moves it to another replica)");

namespace {

constexpr char kUsage[] =
    "routes gemma.v1 requests to the registered replicas\n"
    "  gemma-coordinator --listen HOST:PORT [--heartbeat-timeout-ms 3000]\n"
    "                    [--max-outstanding-per-replica 256] [--max-attempts 3]\n"
    "  --listen HOST:PORT               where to serve (default 0.0.0.0:50051)\n"
    "  --heartbeat-timeout-ms N         a replica without a heartbeat for N ms is unhealthy;\n"
    "                                   a request whose replica failed waits up to N ms for a\n"
    "                                   healthy replica to take it over (default 3000)\n"
    "  --max-outstanding-per-replica N  admission: new requests get RESOURCE_EXHAUSTED when\n"
    "                                   every healthy replica has N in flight (default 256)\n"
    "  --max-attempts N                 sends of one request, the first included, when\n"
    "                                   replicas fail (default 3)";

// "HOST" of "HOST:PORT" ("[::1]:0" gives "[::1]").
std::string HostOf(const std::string& address) {
  const size_t colon = address.rfind(':');
  return colon == std::string::npos ? address : address.substr(0, colon);
}

constexpr int kHttpListenBacklog = 4096;

// Raises the listen backlog of this process's listening TCP socket on `port` (the one a library
// opened and keeps to itself); a warning when there is none.
void RaiseListenBacklog(int port, int backlog) {
  for (int fd = 0; fd < 4096; ++fd) {
    sockaddr_storage address{};
    socklen_t length = sizeof(address);
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) continue;
    int bound_port = -1;
    if (address.ss_family == AF_INET) {
      bound_port = ntohs(reinterpret_cast<sockaddr_in*>(&address)->sin_port);
    } else if (address.ss_family == AF_INET6) {
      bound_port = ntohs(reinterpret_cast<sockaddr_in6*>(&address)->sin6_port);
    }
    int accepting = 0;
    socklen_t size = sizeof(accepting);
    if (bound_port != port || getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &accepting, &size) != 0 ||
        accepting == 0) {
      continue;
    }
    if (listen(fd, backlog) != 0) {
      LOG(WARNING) << "cannot raise the listen backlog of port " << port << ": "
                   << strerror(errno);
    }
    return;
  }
  LOG(WARNING) << "no listening socket on port " << port << " to raise the backlog of";
}

std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop.store(true); }

int Run() {
  const int64_t timeout_ms = absl::GetFlag(FLAGS_heartbeat_timeout_ms);
  const int64_t max_outstanding = absl::GetFlag(FLAGS_max_outstanding_per_replica);
  const int32_t max_attempts = absl::GetFlag(FLAGS_max_attempts);
  if (timeout_ms <= 0) {
    std::cerr << "gemma-coordinator: --heartbeat-timeout-ms must be positive\n";
    return 1;
  }
  if (max_outstanding <= 0) {
    std::cerr << "gemma-coordinator: --max-outstanding-per-replica must be positive\n";
    return 1;
  }
  if (absl::GetFlag(FLAGS_served_model_name).empty()) {
    std::cerr << "gemma-coordinator: --served-model-name must not be empty (the model id "
                 "OpenAI clients name)\n";
    return 1;
  }
  if (max_attempts <= 0) {
    std::cerr << "gemma-coordinator: --max-attempts must be positive\n";
    return 1;
  }
  const int64_t forget_after_ms = absl::GetFlag(FLAGS_forget_after_ms);
  if (forget_after_ms != 0 && forget_after_ms <= timeout_ms) {
    std::cerr << "gemma-coordinator: --forget-after-ms must be 0 (never) or longer than "
                 "--heartbeat-timeout-ms\n";
    return 1;
  }
  gemma::coordinator::RegistryOptions registry_options;
  registry_options.heartbeat_timeout = std::chrono::milliseconds(timeout_ms);
  registry_options.max_outstanding_per_replica = max_outstanding;
  registry_options.forget_after = std::chrono::milliseconds(forget_after_ms);
  registry_options.default_model = absl::GetFlag(FLAGS_served_model_name);
  if (const std::string models = absl::GetFlag(FLAGS_models); !models.empty()) {
    absl::StatusOr<std::vector<gemma::coordinator::ModelSpec>> specs =
        gemma::coordinator::ReadModelSpecs(models);
    if (!specs.ok()) {
      std::cerr << "gemma-coordinator: " << specs.status().message() << "\n";
      return 1;
    }
    registry_options.models = *std::move(specs);
    registry_options.default_model = registry_options.models.front().name;
    for (const gemma::coordinator::ModelSpec& spec : registry_options.models) {
      LOG(INFO) << "serving model " << spec.name << " from " << spec.path << " ("
                << gemma::coordinator::DescribeLayout(spec.layout) << ", replicas "
                << spec.min_replicas << ".." << spec.max_replicas << ")";
    }
  }
  // The internal port: mutual TLS with --internal-ca, which also secures the calls to replicas.
  const std::string internal_listen = absl::GetFlag(FLAGS_internal_listen);
  const gemma::CertificateFiles internal_cert{absl::GetFlag(FLAGS_internal_tls_cert),
                                              absl::GetFlag(FLAGS_internal_tls_key),
                                              "--internal-tls-cert", "--internal-tls-key"};
  const std::string internal_ca = absl::GetFlag(FLAGS_internal_ca);
  for (const auto& [flag, value] : {std::pair{"listen", absl::GetFlag(FLAGS_listen)},
                                    std::pair{"internal-listen", internal_listen}}) {
    if (value.empty() && std::string(flag) == "internal-listen") continue;
    if (absl::Status checked = gemma::CheckListenAddress(flag, value); !checked.ok()) {
      std::cerr << "gemma-coordinator: " << checked.message() << "\n";
      return 1;
    }
  }
  if (internal_listen.empty() && (!internal_cert.cert.empty() || !internal_ca.empty())) {
    std::cerr << "gemma-coordinator: --internal-tls-cert and --internal-ca are for the internal "
                 "port: give --internal-listen HOST:PORT too\n";
    return 1;
  }
  auto internal_credentials = gemma::ServerCredentialsFor(internal_cert, internal_ca);
  if (!internal_credentials.ok()) {
    std::cerr << "gemma-coordinator: the internal port: " << internal_credentials.status().message()
              << "\n";
    return 1;
  }
  const bool mutual_tls = !internal_ca.empty();
  if (mutual_tls) {
    auto to_replicas = gemma::ChannelCredentialsFor(internal_ca, internal_cert);
    if (!to_replicas.ok()) {
      std::cerr << "gemma-coordinator: " << to_replicas.status().message() << "\n";
      return 1;
    }
    registry_options.replica_credentials = *to_replicas;
    registry_options.replica_tls_name = absl::GetFlag(FLAGS_replica_tls_name);
  } else if (!absl::GetFlag(FLAGS_replica_tls_name).empty()) {
    std::cerr << "gemma-coordinator: --replica-tls-name names the workers' certificates, which "
                 "only --internal-ca asks for; give --internal-ca too, or drop it\n";
    return 1;
  }
  gemma::coordinator::Registry registry(registry_options);
  gemma::coordinator::Store store;
  gemma::coordinator::Metrics metrics(&registry, absl::GetFlag(FLAGS_metrics_per_expert));
  gemma::coordinator::ProxyOptions proxy_options;
  proxy_options.metrics = &metrics;
  proxy_options.max_attempts = max_attempts;
  proxy_options.requeue_wait = std::chrono::milliseconds(timeout_ms);
  if (absl::GetFlag(FLAGS_stall_timeout_ms) < 0) {
    std::cerr << "gemma-coordinator: --stall-timeout-ms must be >= 0 (0: no watchdog)\n";
    return 1;
  }
  proxy_options.stall_timeout = std::chrono::milliseconds(absl::GetFlag(FLAGS_stall_timeout_ms));
  if (absl::GetFlag(FLAGS_queue_wait_ms) < 0 || absl::GetFlag(FLAGS_max_queued) < 0) {
    std::cerr << "gemma-coordinator: --queue-wait-ms and --max-queued must be >= 0\n";
    return 1;
  }
  proxy_options.queue_wait = std::chrono::milliseconds(absl::GetFlag(FLAGS_queue_wait_ms));
  proxy_options.max_queued = absl::GetFlag(FLAGS_max_queued);
  std::unique_ptr<gemma::coordinator::Authenticator> auth =
      std::make_unique<gemma::coordinator::Authenticator>();
  if (const std::string tokens = absl::GetFlag(FLAGS_auth_tokens); !tokens.empty()) {
    auto loaded = gemma::coordinator::Authenticator::FromFile(tokens);
    if (!loaded.ok()) {
      std::cerr << "gemma-coordinator: --auth-tokens: " << loaded.status().message() << "\n";
      return 1;
    }
    auth = std::move(*loaded);
  } else {
    LOG(WARNING) << "no --auth-tokens: anyone who can reach this coordinator may use it and "
                    "join workers to it";
  }
  // Closed by default: plaintext or no tokens only when asked for.
  if (!absl::GetFlag(FLAGS_insecure)) {
    std::vector<std::string> open;
    if (absl::GetFlag(FLAGS_tls_cert).empty()) open.push_back("plaintext (no --tls-cert/--tls-key)");
    if (!auth->enabled()) open.push_back("open to anyone (no --auth-tokens)");
    if (!internal_listen.empty() && internal_cert.cert.empty()) {
      open.push_back("the internal port in plaintext (no --internal-tls-cert/--internal-tls-key)");
    }
    if (!open.empty()) {
      std::cerr << "gemma-coordinator: refusing to serve " << absl::StrJoin(open, " and ")
                << "; give them, or --insecure to run open on purpose (a local demo, a test)\n";
      return 1;
    }
  }
  const std::string internal_token = auth->enabled() ? auth->internal_token() : "";
  gemma::coordinator::InferenceService inference(&registry, proxy_options, auth.get());
  const double rebalance_threshold = absl::GetFlag(FLAGS_rebalance_threshold);
  const int32_t rebalance_window = absl::GetFlag(FLAGS_rebalance_window);
  const int32_t rebalance_interval = absl::GetFlag(FLAGS_rebalance_min_interval_s);
  const double rebalance_gain = absl::GetFlag(FLAGS_rebalance_min_gain);
  if (rebalance_threshold < 0 || rebalance_threshold > 1 || rebalance_window < 1 ||
      rebalance_interval < 0 || rebalance_gain < 0) {
    std::cerr << "gemma-coordinator: --rebalance-threshold must be in [0, 1], "
                 "--rebalance-window at least 1, --rebalance-min-interval-s and "
                 "--rebalance-min-gain not negative\n";
    return 1;
  }
  gemma::coordinator::Rebalancer rebalancer(
      &registry, {.threshold = rebalance_threshold,
                  .window = rebalance_window,
                  .min_interval = std::chrono::seconds(rebalance_interval),
                  .min_gain = rebalance_gain});
  gemma::coordinator::ClusterService cluster(&registry, auth.get(), &rebalancer);
  // Behind mutual TLS a worker is known by its certificate: no join token is asked for.
  const gemma::coordinator::Authenticator open_to_certified;
  gemma::coordinator::CoordinatorService coordinator(&registry, &store,
                                                     mutual_tls ? &open_to_certified : auth.get());
  // Batches: durable in --data-dir, run through this coordinator's own Inference service (the
  // channel exists once the server is built).
  const std::string data_dir = absl::GetFlag(FLAGS_data_dir);
  const int32_t batch_in_flight = absl::GetFlag(FLAGS_batch_max_in_flight_per_replica);
  if (batch_in_flight <= 0) {
    std::cerr << "gemma-coordinator: --batch-max-in-flight-per-replica must be positive\n";
    return 1;
  }
  std::unique_ptr<gemma::coordinator::BatchStore> batch_store;
  if (!data_dir.empty()) {
    std::error_code error;
    std::filesystem::create_directories(data_dir, error);
    if (error) {
      std::cerr << "gemma-coordinator: cannot create --data-dir " << data_dir << ": "
                << error.message() << "\n";
      return 1;
    }
    // One coordinator a data directory: a second would run the same batches (its results would
    // stay one per item, but every item could run twice). The lock goes with the process.
    const std::string lock_path = data_dir + "/coordinator.lock";
    const int lock_fd = open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (lock_fd < 0 || flock(lock_fd, LOCK_EX | LOCK_NB) != 0) {
      std::string holder;
      if (lock_fd >= 0) {
        char pid[32] = {};
        if (pread(lock_fd, pid, sizeof(pid) - 1, 0) > 0) holder = absl::StrCat(" (pid ", pid, ")");
      }
      std::cerr << "gemma-coordinator: --data-dir " << data_dir
                << " is in use by another coordinator" << holder
                << "; give each coordinator its own --data-dir\n";
      return 1;
    }
    const std::string pid = std::to_string(getpid());
    if (ftruncate(lock_fd, 0) != 0 || pwrite(lock_fd, pid.data(), pid.size(), 0) < 0) {
      LOG(WARNING) << "cannot write the pid into " << lock_path;
    }
    auto opened = gemma::coordinator::BatchStore::Open(data_dir + "/batches.db");
    if (!opened.ok()) {
      std::cerr << "gemma-coordinator: " << opened.status().message() << "\n";
      return 1;
    }
    batch_store = std::move(*opened);
  }
  gemma::coordinator::OpenAiOptions openai_options;
  openai_options.model_name = registry.ResolveModel("");
  openai_options.served_models = [&registry] { return registry.ServedModels(); };
  openai_options.max_model_len = [&registry](const std::string& model) {
    return registry.Limits(model).max_context;
  };
  openai_options.created = gemma::coordinator::UnixNow();
  std::unique_ptr<gemma::coordinator::BatchRunner> batch_runner;
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  // TLS when a certificate and key are given (both or neither).
  const std::string tls_cert = absl::GetFlag(FLAGS_tls_cert);
  const std::string tls_key = absl::GetFlag(FLAGS_tls_key);
  if (tls_cert.empty() != tls_key.empty()) {
    std::cerr << "gemma-coordinator: --tls-cert and --tls-key go together\n";
    return 1;
  }
  auto credentials = gemma::ServerCredentialsFor({tls_cert, tls_key});
  if (!credentials.ok()) {
    std::cerr << "gemma-coordinator: " << credentials.status().message() << "\n";
    return 1;
  }
  if (tls_cert.empty()) LOG(WARNING) << "no --tls-cert: the gRPC and HTTP ports speak plaintext";
  gemma::ListenExclusively(builder, absl::GetFlag(FLAGS_listen), *credentials, &port);
  builder.experimental().SetInterceptorCreators(gemma::ParseErrorInterceptors());
  builder.RegisterService(&inference);
  builder.RegisterService(&cluster);
  // Workers join on the public port unless they have a port of their own.
  std::unique_ptr<grpc::Server> internal_server;
  if (internal_listen.empty()) {
    builder.RegisterService(&coordinator);
  } else {
    grpc::ServerBuilder internal_builder;
    int internal_port = 0;
    gemma::ListenExclusively(internal_builder, internal_listen, *internal_credentials,
                             &internal_port);
    internal_builder.experimental().SetInterceptorCreators(gemma::ParseErrorInterceptors());
    internal_builder.RegisterService(&coordinator);
    internal_server = internal_builder.BuildAndStart();
    if (internal_server == nullptr || internal_port == 0) {
      std::cerr << "gemma-coordinator: cannot listen on --internal-listen " << internal_listen
                << " (in use by another process?)\n";
      return 1;
    }
    // On stdout, for scripts that start the coordinator with port 0.
    std::printf("internal serving on %s:%d (%s)\n", HostOf(internal_listen).c_str(),
                internal_port,
                mutual_tls ? "mutual TLS"
                           : (internal_cert.cert.empty() ? "plaintext" : "TLS, join tokens"));
    std::fflush(stdout);
  }
  // The Batches service is registered before the server starts; its runner starts after,
  // when the in-process channel to Inference exists.
  std::atomic<gemma::coordinator::BatchRunner*> runner_slot{nullptr};
  gemma::coordinator::BatchesService batches_service(&runner_slot, auth.get());
  builder.RegisterService(&batches_service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    std::cerr << "gemma-coordinator: cannot listen on " << absl::GetFlag(FLAGS_listen)
              << " (in use by another process?)\n";
    return 1;
  }
  if (batch_store != nullptr) {
    gemma::coordinator::BatchOptions batch_options;
    batch_options.max_in_flight_per_replica = batch_in_flight;
    batch_runner = std::make_unique<gemma::coordinator::BatchRunner>(
        batch_store.get(), &registry, server->InProcessChannel(grpc::ChannelArguments()),
        &openai_options, batch_options, internal_token);
    batch_runner->Start();
    runner_slot.store(batch_runner.get());
  }
  // The HTTP port: one server for everything HTTP. Streams hold a thread each.
  std::unique_ptr<httplib::Server> http_server =
      tls_cert.empty() ? std::make_unique<httplib::Server>()
                       : std::make_unique<httplib::SSLServer>(tls_cert.c_str(), tls_key.c_str());
  if (!http_server->is_valid()) {
    std::cerr << "gemma-coordinator: the HTTP port cannot use --tls-cert " << tls_cert
              << " with --tls-key " << tls_key << "\n";
    server->Shutdown();
    return 1;
  }
  httplib::Server& http = *http_server;
  const int32_t http_threads = absl::GetFlag(FLAGS_http_threads);
  if (http_threads < 1 || http_threads > 65536) {
    std::cerr << "gemma-coordinator: --http-threads must be in [1, 65536]\n";
    server->Shutdown();
    return 1;
  }
  http.new_task_queue = [http_threads] { return new httplib::ThreadPool(http_threads); };
  std::thread http_thread;
  if (const std::string http_listen = absl::GetFlag(FLAGS_http_listen); !http_listen.empty()) {
    const size_t colon = http_listen.rfind(':');
    int http_port = 0;
    if (colon == std::string::npos ||
        !absl::SimpleAtoi(http_listen.substr(colon + 1), &http_port) || http_port < 0 ||
        http_port > 65535) {
      std::cerr << "gemma-coordinator: --http-listen \"" << http_listen
                << "\" is not HOST:PORT\n";
      server->Shutdown();
      return 1;
    }
    http.Get("/metrics", [&metrics](const httplib::Request&, httplib::Response& response) {
      response.set_content(metrics.Scrape(), "text/plain; version=0.0.4; charset=utf-8");
    });
    // The dashboard and the JSON it polls (the gRPC messages in their JSON form).
    http.Get("/dashboard", [](const httplib::Request&, httplib::Response& response) {
      response.set_content(gemma::coordinator::DashboardHtml(), "text/html; charset=utf-8");
    });
    auto json = [](const google::protobuf::Message& message, httplib::Response& response) {
      std::string out;
      if (!google::protobuf::util::MessageToJsonString(message, &out).ok()) {
        response.status = 500;
        return;
      }
      response.set_content(out, "application/json");
    };
    http.Get("/api/status", [&registry, &json](const httplib::Request&,
                                                httplib::Response& response) {
      json(registry.Status(), response);
    });
    http.Get("/api/expert-load", [&registry, &json](const httplib::Request& request,
                                                     httplib::Response& response) {
      auto load = registry.ExpertLoad(request.has_param("windows"),
                                      request.get_param_value("model"));
      if (!load.ok()) {
        response.status = 404;
        response.set_content(std::string(load.status().message()), "text/plain");
        return;
      }
      json(*load, response);
    });
    // The OpenAI-compatible API, through this coordinator's own Inference service.
    gemma::coordinator::OpenAiBatchOptions file_options;
    http.set_payload_max_length(std::max(openai_options.max_body_bytes,
                                         file_options.max_file_bytes));
    // The OpenAI API needs a user token when tokens are on (the OpenAI clients' api_key);
    // /metrics, /dashboard and its JSON stay open (read-only cluster state).
    http.set_pre_routing_handler([&auth](const httplib::Request& request,
                                         httplib::Response& response) {
      gemma::coordinator::ReadMissingBodyAsEmpty(request);
      if (request.path.rfind("/v1/", 0) != 0) return httplib::Server::HandlerResponse::Unhandled;
      absl::Status allowed = auth->CheckHeader(request.get_header_value("Authorization"),
                                               {gemma::coordinator::Role::kUser}, request.path);
      if (allowed.ok()) return httplib::Server::HandlerResponse::Unhandled;
      gemma::coordinator::ApiError error;
      error.message = std::string(allowed.message());
      error.http_status = allowed.code() == absl::StatusCode::kPermissionDenied ? 403 : 401;
      error.type = allowed.code() == absl::StatusCode::kPermissionDenied ? "permission_error"
                                                                       : "authentication_error";
      error.code = "invalid_api_key";
      response.status = error.http_status;
      response.set_content(gemma::coordinator::Dump(nlohmann::json{{"error", error.ToJson()}}),
                           "application/json");
      return httplib::Server::HandlerResponse::Handled;
    });
    gemma::coordinator::AddOpenAiRoutes(http, server->InProcessChannel(grpc::ChannelArguments()),
                                        internal_token, openai_options);
    gemma::coordinator::AddOpenAiErrorBodies(http, batch_runner != nullptr);
    if (batch_runner != nullptr) {
      gemma::coordinator::AddOpenAiBatchRoutes(http, batch_runner.get(), &openai_options,
                                               file_options, auth.get());
    }
    const std::string host = http_listen.substr(0, colon);
    const int bound = http_port == 0 ? http.bind_to_any_port(host)
                                     : (http.bind_to_port(host, http_port) ? http_port : -1);
    if (bound <= 0) {
      std::cerr << "gemma-coordinator: cannot listen for HTTP on " << http_listen << "\n";
      server->Shutdown();
      return 1;
    }
    // cpp-httplib listens with a backlog of 5: a burst of clients connecting at once overflows
    // it, and the kernel drops or resets their handshakes. listen() again on the same socket
    // only raises the backlog.
    RaiseListenBacklog(bound, kHttpListenBacklog);
    http_thread = std::thread([&http] { http.listen_after_bind(); });
    // On stdout, for scripts that start the coordinator with port 0.
    std::printf("http serving on %s:%d\n", host.c_str(), bound);
    std::fflush(stdout);
    LOG(INFO) << "HTTP /metrics on " << host << ":" << bound;
  }
  LOG(INFO) << "coordinator serving on port " << port << " (heartbeat timeout " << timeout_ms
            << " ms, at most " << max_outstanding << " requests per replica, "
            << max_attempts << " attempts per request)";
  signal(SIGTERM, OnSignal);
  signal(SIGINT, OnSignal);
  // The balancer looks at the replicas' expert load about once a heartbeat.
  auto next_tick = std::chrono::steady_clock::now();
  while (!g_stop.load()) {
    if (std::chrono::steady_clock::now() >= next_tick) {
      rebalancer.Tick();
      next_tick += std::chrono::milliseconds(1000);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  LOG(INFO) << "shutting down";
  if (http_thread.joinable()) {
    http.stop();
    http_thread.join();
  }
  runner_slot.store(nullptr);
  if (batch_runner != nullptr) batch_runner->Stop();  // items in flight stay pending
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  if (internal_server != nullptr) {
    internal_server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(kUsage);
  gemma::ParseFlags(argc, argv);
  google::InitGoogleLogging(argv[0]);
  // A crash (SIGSEGV, SIGABRT, ...) prints its stack to the log before the process dies.
  google::InstallFailureSignalHandler();
  FLAGS_logtostderr = true;
  return Run();
}
