// The sampling parameters of one generated token: one type from the public API (proto
// gemma.v1.SamplingParams) through the engine and the step plan to the samplers, with one set of
// defaults (greedy, no cuts).
#pragma once

#include <cstdint>
#include <optional>

namespace gemma {

// Temperatures below this are greedy (Model::Sample makes them 0): dividing f32 logits by a
// tiny temperature overflows to inf, and the softmax to NaN.
inline constexpr float kMinTemperature = 1e-5f;

// temperature below kMinTemperature means greedy (argmax, lowest id on ties). Otherwise: divide
// by temperature, keep the top_k (0 = all), then the smallest set whose probability reaches
// top_p, and draw with the uniform keyed by (seed, request_key, position), so a seeded request
// yields the same tokens whatever shares its batch and after a preemption.
struct SamplingParams {
  float temperature = 0.0f;
  int32_t top_k = 0;     // 0: no top-k cut
  float top_p = 1.0f;    // 1: no nucleus cut
  // Unset: the engine draws one when the request is submitted; the samplers read value_or(0).
  std::optional<uint64_t> seed;
  uint64_t request_key = 0;
  int64_t position = 0;  // of the token being drawn; set per step
  bool operator==(const SamplingParams&) const = default;
};

}  // namespace gemma
