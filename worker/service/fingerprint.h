// The model fingerprint a worker presents when it registers: 64-bit FNV-1a over config.json, the
// header of every safetensors file of the checkpoint, and the tokenizer the replica serves with
// (if any), as 16 hex digits. Reads only headers of the weight files.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace gemma::service {

// NOT_FOUND when config.json is missing; the checkpoint reader's error for a bad safetensors file.
// `tokenizer_path` empty: the checkpoint's tokenizer.json when present.
absl::StatusOr<std::string> ModelFingerprint(const std::string& model_dir,
                                             const std::string& tokenizer_path = "");

}  // namespace gemma::service
