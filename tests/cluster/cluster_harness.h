// Helpers for the cluster tier: the real gemma-coordinator, gemma-worker and gemmactl started
// as child processes on loopback, health polling with deadlines (never fixed sleeps), and a
// streaming Generate that collects what arrives.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "gemma/internal/v1/worker.grpc.pb.h"
#include "gemma/v1/cluster.grpc.pb.h"
#include "gemma/v1/inference.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "tests/testing/child_process.h"

namespace gemma::testing::cluster {

using Clock = std::chrono::steady_clock;

extern const std::string kBin;       // build/bin/
extern const std::string kTinyMoe;   // tests/golden/data/tiny-moe
extern const std::string kTinyDense; // tests/golden/data/tiny-dense

std::chrono::system_clock::time_point In(std::chrono::milliseconds ms);

// True once grpc.health.v1 at `address` answers SERVING for `service` (empty: the server as a
// whole), false at `deadline`.
bool WaitServing(const std::string& address, Clock::time_point deadline,
                 const std::string& service = "");

struct StreamResult {
  grpc::Status status;
  std::vector<int32_t> ids;
  std::string text;
  int num_responses = 0;
  bool has_final = false;
  gemma::v1::GenerateFinal final;
};

// Polls `done` every 10 ms until it holds or `timeout` passes; what `done` says last.
bool PollUntil(const std::function<bool()>& done, std::chrono::milliseconds timeout);

// One streaming Generate, read to its end. `on_response`, when given, sees the result so far
// after each response (e.g. to kill the replica serving the stream mid-way).
StreamResult Generate(gemma::v1::Inference::Stub& stub, const gemma::v1::GenerateRequest& request,
                      std::chrono::milliseconds timeout = std::chrono::seconds(60),
                      const std::function<void(const StreamResult&)>& on_response = nullptr);

gemma::v1::GenerateRequest TokenRequest(const std::vector<int32_t>& prompt, int64_t max_tokens);

// Runs build/bin/<args[0]> to completion; its stdout and stderr together.
std::string RunTool(std::vector<std::string> args, int* exit_code);

// Writes `content` to `path`; returns `path`.
std::string WriteFile(const std::string& path, const std::string& content);

struct ToolRun {
  int exit_code = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

// Runs bin/`args[0]` (or `args[0]` itself when it is an absolute path) with `stdin_text` as its
// standard input (a file, so not a terminal), for at most `timeout`.
ToolRun RunWithStdin(std::vector<std::string> args, const std::string& stdin_text,
                     std::chrono::milliseconds timeout = std::chrono::seconds(30));

// Loads `url` in Debian's headless chromium (console messages on stderr) with `extra` flags
// (e.g. --dump-dom, --screenshot=FILE), giving its scripts 3 s of virtual time.
ToolRun HeadlessChromium(const std::string& url, const std::vector<std::string>& extra);

// The integers of a line of text.
std::vector<int32_t> ParseIds(const std::string& line);

// What gemma-generate prints (greedy, stopping at an end id) run with `threads` threads.
std::string GemmaGenerateOutput(const std::string& model, const std::vector<int32_t>& prompt,
                                int64_t max_new_tokens, int threads, int* exit_code);

// The ids gemma-generate gives (one thread), the reference of the tier.
std::vector<int32_t> GemmaGenerate(const std::string& model, const std::vector<int32_t>& prompt,
                                   int64_t max_new_tokens);

// A coordinator and any number of workers, each logging to a file in a per-test directory.
// Everything still running is SIGKILLed by the destructor (rank processes die with their
// supervisor).
class Cluster {
 public:
  explicit Cluster(const std::string& name);
  ~Cluster();

  // Starts the coordinator with extra flags and waits until it serves; false (with the log in
  // *error) if it does not within 10 s.
  bool StartCoordinator(const std::vector<std::string>& flags, std::string* error);
  // SIGKILLs the coordinator and starts it again on the same address with the same flags
  // (workers register again on their next heartbeat); false (with the log) if it does not
  // serve within 10 s.
  bool RestartCoordinator(std::string* error);
  // Starts a worker (a supervisor) on `model` with extra flags (e.g. --cpu-ranks 2); its index.
  int StartWorker(const std::string& model, const std::vector<std::string>& flags);
  // Starts worker `index` again with the flags it had.
  void RestartWorker(int index);
  // Waits until the coordinator reports `n` healthy replicas.
  bool WaitHealthy(int n, Clock::time_point deadline);
  // SIGTERM to every worker still running, then to the coordinator, each given `grace` to exit
  // before it is SIGKILLed.
  void Stop(std::chrono::milliseconds grace);

  gemma::v1::GetStatusResponse Status();
  // The replicas the coordinator counts healthy now.
  int HealthyReplicas();
  gemma::v1::Inference::Stub& inference() { return *inference_; }
  gemma::v1::Cluster::Stub& cluster() { return *cluster_; }
  gemma::internal::v1::Coordinator::Stub& internal() { return *internal_; }
  const std::string& coordinator_address() const { return coordinator_address_; }
  ChildProcess& worker(int index) { return *workers_[index].process; }
  ChildProcess& coordinator() { return *coordinator_; }
  // The rank processes of worker `index` (children of its supervisor), by pid order.
  std::vector<pid_t> RankPids(int index);
  // The pid of rank `rank` of worker `index` (by its --rank flag), -1 if there is none.
  pid_t RankPid(int index, int rank);
  // The worker's or the coordinator's log ("coordinator" or "worker<N>").
  std::string Log(const std::string& which);
  const std::string& dir() const { return dir_; }

 private:
  struct Worker {
    std::vector<std::string> args;
    std::unique_ptr<ChildProcess> process;
    int starts = 0;
  };
  std::string dir_;
  std::string coordinator_address_;
  std::vector<std::string> coordinator_flags_;
  int coordinator_starts_ = 0;
  std::unique_ptr<ChildProcess> coordinator_;
  std::vector<Worker> workers_;
  std::unique_ptr<gemma::v1::Inference::Stub> inference_;
  std::unique_ptr<gemma::v1::Cluster::Stub> cluster_;
  std::unique_ptr<gemma::internal::v1::Coordinator::Stub> internal_;
};

// Client threads of a test, stopped and joined however the test leaves its scope: a failed
// ASSERT returns early, and terminating with threads running would leave the cluster's
// processes behind. `stop` tells the threads to finish.
class ThreadJoiner {
 public:
  ThreadJoiner(std::function<void()> stop, std::vector<std::thread>* threads)
      : stop_(std::move(stop)), threads_(threads) {}
  ThreadJoiner(const ThreadJoiner&) = delete;
  ThreadJoiner& operator=(const ThreadJoiner&) = delete;
  ~ThreadJoiner() {
    stop_();
    for (std::thread& t : *threads_) {
      if (t.joinable()) t.join();
    }
  }

 private:
  std::function<void()> stop_;
  std::vector<std::thread>* threads_;
};

}  // namespace gemma::testing::cluster
