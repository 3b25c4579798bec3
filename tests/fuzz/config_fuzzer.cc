// libFuzzer entry point: arbitrary bytes as config.json. Parsing must return a Status or a
// config whose derived per-layer helpers are safe to call for every layer.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "common/model_config.h"
#include "glog/logging.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  auto config = gemma::ParseModelConfig(text, "fuzz/config.json");
  if (!config.ok()) return 0;
  CHECK_EQ(static_cast<int64_t>(config->layer_types.size()), config->num_hidden_layers);
  CHECK(config->IsFull(static_cast<int>(config->num_hidden_layers - 1)));
  for (int64_t i = 0; i < config->num_hidden_layers && i < 4096; ++i) {
    int layer = static_cast<int>(i);
    CHECK_GT(config->LayerHeadDim(layer), 0);
    CHECK_GT(config->LayerKvHeads(layer), 0);
    CHECK_EQ(config->num_attention_heads % config->LayerKvHeads(layer), 0);
  }
  return 0;
}
