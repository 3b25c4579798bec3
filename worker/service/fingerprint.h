// The model fingerprint a worker presents when it registers: 64-bit FNV-1a over config.json and
// the header of every *.safetensors file (in name order), as 16 hex digits. Reads only headers.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace gemma::service {

// NOT_FOUND / DATA_LOSS when config.json or a safetensors header cannot be read.
absl::StatusOr<std::string> ModelFingerprint(const std::string& model_dir);

}  // namespace gemma::service
