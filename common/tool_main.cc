#include "common/tool_main.h"

#include <iostream>

#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "common/flags.h"
#include "glog/logging.h"

namespace gemma {

int ToolMain(int argc, char** argv, const char* name, const char* usage,
             const std::function<absl::Status()>& run) {
  absl::SetProgramUsageMessage(usage);
  ParseFlags(argc, argv);
  google::InitGoogleLogging(argv[0]);
  // A crash (SIGSEGV, SIGABRT, ...) prints its stack to the log before the process dies.
  google::InstallFailureSignalHandler();
  FLAGS_logtostderr = true;
  absl::Status status = run();
  if (!status.ok()) {
    std::cerr << name << ": " << status.message() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace gemma
