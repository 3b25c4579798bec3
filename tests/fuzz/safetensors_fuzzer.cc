// libFuzzer entry point: arbitrary bytes as a .safetensors file. Every input must give a Status
// or a file whose tensor views lie inside the buffer; ASan catches any read outside it.
#include <cstddef>
#include <cstdint>

#include "common/safetensors.h"
#include "glog/logging.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = gemma::SafetensorsFile::FromBuffer(data, size, "fuzz.safetensors");
  if (!file.ok()) return 0;
  for (const auto& [name, view] : (*file)->tensors()) {
    CHECK(view.num_bytes == 0 || (view.data >= data && view.data + view.num_bytes <= data + size))
        << "tensor " << name << " lies outside the buffer";
    CHECK_EQ(static_cast<size_t>(view.NumElements()) * gemma::DTypeSize(view.dtype),
             view.num_bytes);
    // Touch the first and last byte so ASan sees an out-of-bounds view.
    if (view.num_bytes > 0) {
      volatile uint8_t sink = view.data[0] ^ view.data[view.num_bytes - 1];
      (void)sink;
    }
  }
  return 0;
}
