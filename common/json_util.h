// JSON parsing without exceptions for files we read (config.json, safetensors headers and
// indexes): a parse error says where the parser stopped. CUDA-free and gRPC-free.
#pragma once

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"

namespace gemma {

// Parses `text`; INVALID_ARGUMENT "<what> is not valid JSON at byte N: <reason>" on failure.
absl::StatusOr<nlohmann::json> ParseJson(absl::string_view text, absl::string_view what);

}  // namespace gemma
