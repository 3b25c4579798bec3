// A child process for tests: fork + exec with arguments, optional stdout/stderr capture to a
// file, polling waits with deadlines, SIGKILLed and reaped on destruction if still running.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

namespace gemma::testing {

class ChildProcess {
 public:
  using Clock = std::chrono::steady_clock;

  // args[0] is the executable's path. With `output_path`, stdout and stderr go to that file.
  explicit ChildProcess(const std::vector<std::string>& args, const std::string& output_path = "");
  ~ChildProcess();
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  void Signal(int sig);
  // SIGKILL and reap.
  void Kill();
  // Polls for exit until `deadline`; the raw wait status, or nullopt if still running.
  std::optional<int> WaitUntil(Clock::time_point deadline);
  // The exit code after a normal exit, -1 otherwise (or still running after `timeout`).
  int WaitForExitCode(std::chrono::milliseconds timeout);
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
  std::optional<int> exit_status_;
};

// A TCP port on 127.0.0.1 that was free a moment ago.
int FreeLocalPort();

// The whole content of a file ("" if unreadable).
std::string ReadFileToString(const std::string& path);

}  // namespace gemma::testing
