// Element types shared by checkpoints, host tensors and backends, with the bf16/f16 <-> f32
// conversions. Knows nothing of models or devices.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace gemma {

enum class DType : uint8_t { kF32, kBF16, kF16, kI32, kI64 };

// Bytes per element.
size_t DTypeSize(DType dtype);
// "F32", "BF16", ... as safetensors spells them.
const char* DTypeName(DType dtype);
// Parses a safetensors dtype string; INVALID_ARGUMENT naming the string if unknown.
absl::StatusOr<DType> ParseDType(std::string_view name);

inline float Bf16ToF32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round-to-nearest-even, NaN kept quiet (the conversion torch uses).
inline uint16_t F32ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

float F16ToF32(uint16_t v);

// Converts `count` elements of `src` (of type `dtype`, one of F32/BF16/F16) to float.
void ConvertToF32(DType dtype, const void* src, size_t count, float* dst);

}  // namespace gemma
