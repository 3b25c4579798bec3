// Types shared by the kernel launchers: the element type of a weight or of the KV cache, and the
// rotary embedding parameters. Plain data; knows nothing of the rest of the project.
#pragma once

#include <cstdint>

namespace gemma::kernels {

// Storage type of a weight or of the KV cache (activations are always f32; bf16 is widened to
// f32 as it is read).
enum class ElemType : uint8_t { kF32, kBF16 };

// Half-split rotary embedding: pair i < rotary_pairs of (j, j + head_dim / 2) turns by
// position * theta^(-2i / head_dim) / factor; pairs past rotary_pairs do not turn.
struct Rope {
  int64_t head_dim = 0;
  int64_t rotary_pairs = 0;
  double theta = 10000.0;
  double factor = 1.0;
};

}  // namespace gemma::kernels
