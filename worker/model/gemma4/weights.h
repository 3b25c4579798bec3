// Gemma 4 text-decoder weights on a backend, loaded from a Hugging Face checkpoint by their real
// tensor names, every shape checked against config.json.
#pragma once

#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model_config.h"
#include "common/safetensors.h"
#include "worker/backend/backend.h"
#include "worker/model/gemma4/sharding.h"

namespace gemma::gemma4 {

struct LayerWeights {
  BufferPtr input_layernorm;           // [H]
  BufferPtr q_proj;                    // [heads * d, H]
  BufferPtr k_proj;                    // [kv_heads * d, H]
  BufferPtr v_proj;                    // [kv_heads * d, H]; null on k_eq_v layers
  BufferPtr o_proj;                    // [H, heads * d]
  BufferPtr q_norm;                    // [d]
  BufferPtr k_norm;                    // [d]
  BufferPtr post_attention_layernorm;  // [H]
  BufferPtr pre_feedforward_layernorm; // [H]
  BufferPtr mlp_gate_up;               // [2 * I, H]: gate_proj rows, then up_proj rows
  BufferPtr mlp_down;                  // [H, I]
  BufferPtr post_feedforward_layernorm;// [H]
  BufferPtr layer_scalar;              // [1]
  // MoE layers only.
  BufferPtr router_proj;               // [E, H]
  BufferPtr router_scale;              // [H]
  BufferPtr per_expert_scale;          // [E]
  BufferPtr pre_feedforward_layernorm_2;   // [H] expert input norm
  BufferPtr post_feedforward_layernorm_1;  // [H] dense-branch output norm
  BufferPtr post_feedforward_layernorm_2;  // [H] expert output norm
};

struct Weights {
  BufferPtr embed_tokens;  // [V, H]
  BufferPtr lm_head;       // [V, H]; null when tied to embed_tokens
  BufferPtr final_norm;    // [H]
  std::vector<LayerWeights> layers;

  const Buffer& LmHead() const { return lm_head ? *lm_head : *embed_tokens; }
};

// One rank's expert slots of one MoE layer: the slots' experts, in slot order.
struct ExpertSlotWeights {
  BufferPtr gate_up;  // [slots, 2 * I_moe, H]: gate rows first
  BufferPtr down;     // [slots, H, I_moe]
};

// Reads the experts `experts` (logical ids, one per slot) of layer `layer_idx` out of the mapped
// checkpoint and uploads them as one slot array. Touches only those experts' bytes. Safe to call
// on another thread while the backend runs steps (it only allocates new buffers).
absl::StatusOr<ExpertSlotWeights> LoadExpertSlots(const ModelConfig& config,
                                                  const Checkpoint& checkpoint, int layer_idx,
                                                  std::span<const int32_t> experts,
                                                  Backend& backend);

// Loads this rank's slice (`dims`, split as ShardSpecFor says) of every text-decoder weight but the experts (LoadExpertSlots) of
// `checkpoint` (names under config.tensor_prefix) onto `backend`, reading only the slice's bytes
// of the memory-mapped files. Shapes are checked whole, against the config, before slicing.
// Errors name the tensor, its file, and the expected and found shapes.
absl::StatusOr<std::unique_ptr<Weights>> LoadWeights(const ModelConfig& config,
                                                     const Checkpoint& checkpoint,
                                                     const LocalDims& dims, Backend& backend);

}  // namespace gemma::gemma4
