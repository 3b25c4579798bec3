// The model fingerprint a worker presents when it registers: 64-bit FNV-1a over config.json, the
// header of every safetensors file of the checkpoint, and tokenizer.json when present, as 16 hex
// digits. Reads only headers of the weight files.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace gemma::service {

// NOT_FOUND when config.json is missing; the checkpoint reader's error for a bad safetensors file.
absl::StatusOr<std::string> ModelFingerprint(const std::string& model_dir);

}  // namespace gemma::service
