#include "tests/cluster/cluster_harness.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "grpcpp/generic/generic_stub.h"
#include "gtest/gtest.h"

namespace gemma::testing::cluster {

using std::chrono::milliseconds;
using std::chrono::seconds;

const std::string kBin = std::string(GEMMA_BINARY_DIR) + "/bin/";
const std::string kTinyMoe = std::string(GEMMA_SOURCE_DIR) + "/tests/golden/data/tiny-moe";
const std::string kTinyDense = std::string(GEMMA_SOURCE_DIR) + "/tests/golden/data/tiny-dense";

std::chrono::system_clock::time_point In(milliseconds ms) {
  return std::chrono::system_clock::now() + ms;
}

namespace {

// One grpc.health.v1.Health/Check of `service` (empty: the server as a whole): true when it
// answers SERVING. The request is field 1 (service, a string), absent when empty; the response
// is field 1 (status) = 1 (SERVING): bytes 08 01.
bool HealthServing(grpc::GenericStub& stub, const std::string& service = "") {
  grpc::ClientContext context;
  context.set_deadline(In(milliseconds(500)));
  grpc::CompletionQueue cq;
  std::string body;
  if (!service.empty()) {
    body = std::string(1, '\x0a') + static_cast<char>(service.size()) + service;
  }
  grpc::Slice empty(body);
  grpc::ByteBuffer request(&empty, 1);
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> call =
      stub.PrepareUnaryCall(&context, "/grpc.health.v1.Health/Check", request, &cq);
  call->StartCall();
  grpc::ByteBuffer response;
  grpc::Status status;
  call->Finish(&response, &status, reinterpret_cast<void*>(1));
  void* tag = nullptr;
  bool ok = false;
  cq.Next(&tag, &ok);
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  if (!status.ok()) return false;
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return false;
  std::string bytes;
  for (const grpc::Slice& slice : slices) bytes += std::string(slice.begin(), slice.end());
  return bytes == std::string("\x08\x01", 2);
}

}  // namespace

bool WaitServing(const std::string& address, Clock::time_point deadline,
                 const std::string& service) {
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  while (Clock::now() < deadline) {
    if (HealthServing(stub, service)) return true;
    channel->WaitForConnected(In(milliseconds(100)));
  }
  return false;
}

bool PollUntil(const std::function<bool()>& done, milliseconds timeout) {
  const Clock::time_point deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    if (done()) return true;
    std::this_thread::sleep_for(milliseconds(10));
  }
  return done();
}

StreamResult Generate(gemma::v1::Inference::Stub& stub, const gemma::v1::GenerateRequest& request,
                      milliseconds timeout,
                      const std::function<void(const StreamResult&)>& on_response) {
  grpc::ClientContext context;
  context.set_deadline(In(timeout));
  std::unique_ptr<grpc::ClientReader<gemma::v1::GenerateResponse>> reader =
      stub.Generate(&context, request);
  StreamResult result;
  gemma::v1::GenerateResponse response;
  while (reader->Read(&response)) {
    ++result.num_responses;
    result.ids.insert(result.ids.end(), response.token_ids().begin(), response.token_ids().end());
    result.text += response.text();
    if (response.has_final()) {
      result.has_final = true;
      result.final = response.final();
    }
    if (on_response) on_response(result);
  }
  result.status = reader->Finish();
  return result;
}

gemma::v1::GenerateRequest TokenRequest(const std::vector<int32_t>& prompt, int64_t max_tokens) {
  gemma::v1::GenerateRequest request;
  for (int32_t id : prompt) request.mutable_token_ids()->add_ids(id);
  request.set_max_tokens(max_tokens);
  return request;
}

std::string RunTool(std::vector<std::string> args, int* exit_code) {
  static std::atomic<int> counter{0};
  const std::string output = absl::StrCat(::testing::TempDir(), "/tool_", getpid(), "_",
                                          counter++, ".out");
  args[0] = kBin + args[0];
  ChildProcess child(args, output);
  *exit_code = child.WaitForExitCode(seconds(60));
  return ReadFileToString(output);
}

namespace {

std::string ShellQuote(const std::string& arg) {
  std::string quoted = "'";
  for (char c : arg) {
    if (c == '\'') {
      quoted += "'\\''";
    } else {
      quoted += c;
    }
  }
  return quoted + "'";
}

}  // namespace

std::string WriteFile(const std::string& path, const std::string& content) {
  std::ofstream(path, std::ios::binary) << content;
  return path;
}

ToolRun RunWithStdin(std::vector<std::string> args, const std::string& stdin_text,
                     std::chrono::milliseconds timeout) {
  static std::atomic<int> counter{0};
  const std::string base =
      absl::StrCat(::testing::TempDir(), "/run_", getpid(), "_", counter++);
  WriteFile(base + ".in", stdin_text);
  if (args[0].rfind('/', 0) != 0) args[0] = kBin + args[0];
  std::vector<std::string> quoted;
  for (const std::string& arg : args) quoted.push_back(ShellQuote(arg));
  const std::string command =
      absl::StrCat("exec ", absl::StrJoin(quoted, " "), " < ", ShellQuote(base + ".in"), " 2> ",
                   ShellQuote(base + ".err"));
  ChildProcess child({"/bin/sh", "-c", command}, base + ".out");
  ToolRun run;
  run.exit_code = child.WaitForExitCode(timeout);
  run.out = ReadFileToString(base + ".out");
  run.err = ReadFileToString(base + ".err");
  return run;
}

ToolRun HeadlessChromium(const std::string& url, const std::vector<std::string>& extra) {
  std::vector<std::string> args = {"/usr/bin/chromium", "--headless", "--no-sandbox",
                                   "--disable-gpu", "--enable-logging=stderr", "--v=0",
                                   "--virtual-time-budget=3000"};
  args.insert(args.end(), extra.begin(), extra.end());
  args.push_back(url);
  return RunWithStdin(args, "");
}

std::vector<int32_t> ParseIds(const std::string& line) {
  std::vector<int32_t> ids;
  for (absl::string_view item : absl::StrSplit(line, ' ', absl::SkipWhitespace())) {
    int32_t id = 0;
    if (absl::SimpleAtoi(item, &id)) ids.push_back(id);
  }
  return ids;
}

std::string GemmaGenerateOutput(const std::string& model, const std::vector<int32_t>& prompt,
                                int64_t max_new_tokens, int threads, int* exit_code) {
  return RunTool({"gemma-generate", "--model", model, "--tokens", absl::StrJoin(prompt, ","),
                  "--max-new-tokens", std::to_string(max_new_tokens), "--stop-at-eos", "--threads",
                  std::to_string(threads)},
                 exit_code);
}

std::vector<int32_t> GemmaGenerate(const std::string& model, const std::vector<int32_t>& prompt,
                                   int64_t max_new_tokens) {
  int exit_code = -1;
  const std::string out = GemmaGenerateOutput(model, prompt, max_new_tokens, 1, &exit_code);
  EXPECT_EQ(exit_code, 0) << out;
  return ParseIds(out);
}

Cluster::Cluster(const std::string& name) {
  dir_ = absl::StrCat(::testing::TempDir(), "/", name, "_", getpid());
  std::filesystem::create_directories(dir_);
}

Cluster::~Cluster() {
  for (Worker& w : workers_) {
    if (w.process != nullptr) w.process->Kill();
  }
  if (coordinator_ != nullptr) coordinator_->Kill();
}

bool Cluster::StartCoordinator(const std::vector<std::string>& flags, std::string* error) {
  coordinator_address_ = absl::StrCat("127.0.0.1:", FreeLocalPort());
  coordinator_flags_ = flags;
  return RestartCoordinator(error);
}

bool Cluster::RestartCoordinator(std::string* error) {
  const std::string log = dir_ + "/coordinator.log";
  if (coordinator_ != nullptr) {
    coordinator_->Kill();
    coordinator_->WaitForExitCode(seconds(10));
    // Keep the earlier runs' logs.
    std::filesystem::rename(log, absl::StrCat(log, ".", coordinator_starts_));
  }
  ++coordinator_starts_;
  // Plaintext on loopback (--insecure); tests of TLS start their coordinator themselves.
  std::vector<std::string> args = {kBin + "gemma-coordinator", "--listen", coordinator_address_,
                                   "--insecure"};
  args.insert(args.end(), coordinator_flags_.begin(), coordinator_flags_.end());
  coordinator_ = std::make_unique<ChildProcess>(args, log);
  if (!WaitServing(coordinator_address_, Clock::now() + seconds(10))) {
    *error = Log("coordinator");
    return false;
  }
  auto channel = grpc::CreateChannel(coordinator_address_, grpc::InsecureChannelCredentials());
  inference_ = gemma::v1::Inference::NewStub(channel);
  cluster_ = gemma::v1::Cluster::NewStub(channel);
  internal_ = gemma::internal::v1::Coordinator::NewStub(channel);
  return true;
}

int Cluster::StartWorker(const std::string& model, const std::vector<std::string>& flags) {
  Worker worker;
  worker.args = {kBin + "gemma-worker", "--coordinator", coordinator_address_, "--model", model,
                 "--threads", "1"};
  worker.args.insert(worker.args.end(), flags.begin(), flags.end());
  workers_.push_back(std::move(worker));
  const int index = static_cast<int>(workers_.size()) - 1;
  RestartWorker(index);
  return index;
}

void Cluster::RestartWorker(int index) {
  Worker& worker = workers_[index];
  if (worker.process != nullptr) worker.process->Kill();
  const std::string log = absl::StrCat(dir_, "/worker", index, ".log");
  if (worker.starts++ > 0) {
    // Keep the earlier runs' logs together.
    std::ofstream(log, std::ios::app) << "\n----- restart " << worker.starts << " -----\n";
    std::filesystem::rename(log, absl::StrCat(log, ".", worker.starts - 1));
  }
  worker.process = std::make_unique<ChildProcess>(worker.args, log);
}

bool Cluster::WaitHealthy(int n, Clock::time_point deadline) {
  while (Clock::now() < deadline) {
    for (Worker& w : workers_) {
      // A worker that has exited will not become healthy: fail now, not at the deadline.
      if (w.process != nullptr && w.process->WaitUntil(Clock::now()).has_value()) return false;
    }
    if (HealthyReplicas() == n) return true;
    std::this_thread::sleep_for(milliseconds(20));
  }
  return false;
}

void Cluster::Stop(milliseconds grace) {
  std::vector<ChildProcess*> children;
  for (Worker& w : workers_) children.push_back(w.process.get());
  children.push_back(coordinator_.get());
  for (ChildProcess* child : children) {
    if (child == nullptr || child->WaitUntil(Clock::now()).has_value()) continue;
    child->Signal(SIGTERM);
    if (child->WaitForExitCode(grace) == -1) child->Kill();
  }
}

int Cluster::HealthyReplicas() {
  const gemma::v1::GetStatusResponse status = Status();
  return static_cast<int>(
      std::count_if(status.replicas().begin(), status.replicas().end(),
                    [](const gemma::v1::ReplicaStatus& r) { return r.healthy(); }));
}

gemma::v1::GetStatusResponse Cluster::Status() {
  grpc::ClientContext context;
  context.set_deadline(In(seconds(2)));
  gemma::v1::GetStatusResponse response;
  grpc::Status status = cluster_->GetStatus(&context, gemma::v1::GetStatusRequest(), &response);
  EXPECT_TRUE(status.ok()) << status.error_message();
  return response;
}

std::vector<pid_t> Cluster::RankPids(int index) {
  const pid_t pid = workers_[index].process->pid();
  std::vector<pid_t> pids;
  std::ifstream children(absl::StrCat("/proc/", pid, "/task/", pid, "/children"));
  pid_t child = 0;
  while (children >> child) pids.push_back(child);
  std::sort(pids.begin(), pids.end());
  return pids;
}

pid_t Cluster::RankPid(int index, int rank) {
  const std::string flag = absl::StrCat("--rank=", rank);
  for (pid_t pid : RankPids(index)) {
    const std::string cmdline = ReadFileToString(absl::StrCat("/proc/", pid, "/cmdline"));
    for (absl::string_view arg : absl::StrSplit(cmdline, '\0')) {
      if (arg == flag) return pid;
    }
  }
  return -1;
}

std::string Cluster::Log(const std::string& which) {
  return ReadFileToString(absl::StrCat(dir_, "/", which, ".log"));
}

}  // namespace gemma::testing::cluster
