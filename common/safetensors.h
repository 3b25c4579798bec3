// Memory-mapped, bounds-checked reader of safetensors checkpoints: one file, or shards listed by
// model.safetensors.index.json. Tensors are views into the mapping; nothing is copied.
// CUDA-free and gRPC-free.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/dtype.h"

namespace gemma {

// A read-only view of one tensor inside a mapped file. Valid while its SafetensorsFile lives.
struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t num_bytes = 0;
  std::string file;  // path of the file holding it, for error messages

  int64_t NumElements() const;
  // Row-major strides in elements.
  std::vector<int64_t> Strides() const;
};

// One mapped .safetensors file. Parsing validates: header length within the file, JSON header,
// known dtypes, shapes non-negative, data_offsets in range, ordered, not overlapping, and sized
// exactly shape x dtype. Every error names the file and, where it applies, the tensor.
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  // Parses an in-memory buffer (not copied; must outlive the object). Used by the fuzzer.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> FromBuffer(const uint8_t* data,
                                                                     size_t size,
                                                                     std::string_view name);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // The raw JSON header bytes (for fingerprints).
  std::string_view header() const { return header_; }

 private:
  SafetensorsFile() = default;
  absl::Status Parse(const uint8_t* data, size_t size);

  std::string path_;
  void* mapping_ = nullptr;
  size_t mapping_size_ = 0;
  std::string header_;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a checkpoint directory: `model.safetensors`, or the shards named by
// `model.safetensors.index.json` (every tensor must be in the shard the index names; a tensor in
// two shards is an error), or, failing both, every `*.safetensors` file in the directory.
class Checkpoint {
 public:
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir);

  // NOT_FOUND naming the tensor and the directory when absent.
  absl::StatusOr<TensorView> Get(std::string_view name) const;
  bool Has(std::string_view name) const;
  // Get() plus a shape check; INVALID_ARGUMENT naming tensor, file, expected and found shapes.
  absl::StatusOr<TensorView> GetWithShape(std::string_view name,
                                          const std::vector<int64_t>& shape) const;
  std::vector<std::string> Names() const;
  const std::vector<std::unique_ptr<SafetensorsFile>>& files() const { return files_; }
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, TensorView, std::less<>> index_;
};

// "[2, 3]" for messages.
std::string ShapeToString(const std::vector<int64_t>& shape);

}  // namespace gemma
