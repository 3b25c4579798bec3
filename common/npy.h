// NumPy .npy files (format 1.0/2.0, little-endian, C order) for logits dumps and test fixtures.
// CUDA-free and gRPC-free.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/dtype.h"

namespace gemma {

struct NpyArray {
  DType dtype = DType::kF32;  // F32 ('<f4'), I32 ('<i4'), I64 ('<i8'), F16 ('<f2')
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;  // raw little-endian elements, C order

  int64_t NumElements() const;
  // Elements converted to float / int64 (any supported dtype).
  std::vector<float> AsFloat() const;
  std::vector<int64_t> AsInt64() const;
};

// Writes `data` (C order, shape `shape`) as a .npy v1.0 file (v2.0 if the header needs it).
// F32, F16, I32 and I64 are supported.
absl::Status WriteNpy(const std::string& path, DType dtype, const std::vector<int64_t>& shape,
                      const void* data);
// Reads a .npy file; errors name the file and what was wrong (bad magic, fortran order, ...).
absl::StatusOr<NpyArray> ReadNpy(const std::string& path);

}  // namespace gemma
