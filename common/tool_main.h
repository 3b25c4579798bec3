// The main() of every binary: sets the usage text, parses the flags (dashes allowed), sends
// logs to stderr, runs `run`, and on error prints "NAME: message" and returns 1.
#pragma once

#include <functional>

#include "absl/status/status.h"

namespace gemma {

int ToolMain(int argc, char** argv, const char* name, const char* usage,
             const std::function<absl::Status()>& run);

}  // namespace gemma
