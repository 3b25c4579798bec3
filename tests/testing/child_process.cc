#include "tests/testing/child_process.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <thread>

#include "glog/logging.h"

namespace gemma::testing {

ChildProcess::ChildProcess(const std::vector<std::string>& args, const std::string& output_path) {
  std::vector<char*> argv;
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_ = fork();
  CHECK_GE(pid_, 0) << "fork failed";
  if (pid_ == 0) {
    if (!output_path.empty()) {
      int fd = open(output_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd >= 0) {
        dup2(fd, STDOUT_FILENO);
        dup2(fd, STDERR_FILENO);
        close(fd);
      }
    }
    execv(argv[0], argv.data());
    _exit(127);
  }
}

ChildProcess::~ChildProcess() {
  if (!exit_status_.has_value()) Kill();
}

void ChildProcess::Signal(int sig) { kill(pid_, sig); }

void ChildProcess::Kill() {
  if (exit_status_.has_value()) return;
  kill(pid_, SIGKILL);
  int status;
  waitpid(pid_, &status, 0);
  exit_status_ = status;
}

std::optional<int> ChildProcess::WaitUntil(Clock::time_point deadline) {
  while (!exit_status_.has_value()) {
    int status;
    pid_t r = waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      exit_status_ = status;
      break;
    }
    if (Clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return exit_status_;
}

int ChildProcess::WaitForExitCode(std::chrono::milliseconds timeout) {
  std::optional<int> status = WaitUntil(Clock::now() + timeout);
  if (!status.has_value() || !WIFEXITED(*status)) return -1;
  return WEXITSTATUS(*status);
}

int FreeLocalPort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  CHECK_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  CHECK_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  socklen_t len = sizeof(addr);
  CHECK_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  close(fd);
  return ntohs(addr.sin_port);
}

std::string ReadFileToString(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace gemma::testing
