// Helpers shared by the command-line tools (the rank loader and ToolMain live in
// worker/replica/load.h and common/tool_main.h). Errors are Statuses the tools print before
// exiting non-zero.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace gemma::cli {

// "2,17,301" -> {2, 17, 301}. INVALID_ARGUMENT naming the bad item.
absl::StatusOr<std::vector<int32_t>> ParseTokenList(absl::string_view text);

}  // namespace gemma::cli
