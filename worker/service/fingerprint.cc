#include "worker/service/fingerprint.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/fnv.h"
#include "common/safetensors.h"
#include "common/status_macros.h"

namespace gemma::service {

absl::StatusOr<std::string> ModelFingerprint(const std::string& model_dir,
                                             const std::string& tokenizer_path) {
  namespace fs = std::filesystem;
  uint64_t hash = kFnv1aOffset;
  auto mix_file = [&](const fs::path& path, bool required) -> absl::Status {
    std::ifstream in(path, std::ios::binary);
    if (!in) {
      if (!required) return absl::OkStatus();
      return absl::NotFoundError(absl::StrCat("cannot read ", path.string()));
    }
    std::stringstream bytes;
    bytes << in.rdbuf();
    const std::string text = bytes.str();
    hash = Fnv1a64(text.data(), text.size(), hash);
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(mix_file(fs::path(model_dir) / "config.json", /*required=*/true));
  // The safetensors headers (names, dtypes, shapes, offsets), in the checkpoint's file order.
  ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> checkpoint, Checkpoint::Open(model_dir));
  for (const auto& file : checkpoint->files()) {
    hash = Fnv1a64(file->header().data(), file->header().size(), hash);
  }
  if (tokenizer_path.empty()) {
    RETURN_IF_ERROR(mix_file(fs::path(model_dir) / "tokenizer.json", /*required=*/false));
  } else {
    RETURN_IF_ERROR(mix_file(tokenizer_path, /*required=*/true));
  }
  return absl::StrFormat("%016x", hash);
}

}  // namespace gemma::service
