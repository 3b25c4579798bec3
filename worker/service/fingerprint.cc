#include "worker/service/fingerprint.h"

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace gemma::service {
namespace {

constexpr uint64_t kFnvOffset = 1469598103934665603ULL;
constexpr uint64_t kFnvPrime = 1099511628211ULL;

void Mix(const char* data, size_t size, uint64_t* hash) {
  for (size_t i = 0; i < size; ++i) {
    *hash ^= static_cast<unsigned char>(data[i]);
    *hash *= kFnvPrime;
  }
}

}  // namespace

absl::StatusOr<std::string> ModelFingerprint(const std::string& model_dir) {
  namespace fs = std::filesystem;
  uint64_t hash = kFnvOffset;
  const fs::path config = fs::path(model_dir) / "config.json";
  {
    std::ifstream in(config, std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", config.string()));
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    Mix(bytes.data(), bytes.size(), &hash);
  }
  std::vector<fs::path> shards;
  std::error_code error;
  for (const auto& entry : fs::directory_iterator(model_dir, error)) {
    if (entry.path().extension() == ".safetensors") shards.push_back(entry.path());
  }
  if (error) return absl::NotFoundError(absl::StrCat("cannot list ", model_dir, ": ", error.message()));
  std::sort(shards.begin(), shards.end());
  for (const fs::path& shard : shards) {
    std::ifstream in(shard, std::ios::binary);
    unsigned char size_bytes[8] = {};
    if (!in.read(reinterpret_cast<char*>(size_bytes), 8)) {
      return absl::DataLossError(absl::StrCat(shard.string(), ": no safetensors header"));
    }
    uint64_t header_size = 0;
    for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | size_bytes[i];
    if (header_size > (uint64_t{100} << 20)) {
      return absl::DataLossError(
          absl::StrCat(shard.string(), ": safetensors header of ", header_size, " bytes"));
    }
    std::vector<char> header(header_size);
    if (!in.read(header.data(), static_cast<std::streamsize>(header_size))) {
      return absl::DataLossError(absl::StrCat(shard.string(), ": truncated safetensors header"));
    }
    Mix(header.data(), header.size(), &hash);
  }
  return absl::StrFormat("%016x", hash);
}

}  // namespace gemma::service
