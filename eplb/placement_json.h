// The JSON form of an expert placement, for files people write and read (the tools'
// --expert-placement); the binary form in placement.h is for step plans. Knows no model.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "eplb/placement.h"

namespace gemma::eplb {

// {"epoch": 0, "num_experts": 16, "num_ranks": 2, "slots_per_rank": 9,
//  "layers": [[[0, 1, ...], [...]], ...]}: layers -> ranks -> the logical expert of each slot.
// The number of layers is the length of "layers"; "epoch" may be left out (0). One line per
// rank's slots.
std::string PlacementToJson(const Placement& placement);

// Parses and validates the JSON form. INVALID_ARGUMENT naming the path of the first bad field
// (e.g. "layers[2][1][3]"), an unknown field, or what Validate finds wrong.
absl::StatusOr<Placement> PlacementFromJson(absl::string_view json);

// Reads a JSON placement file: NOT_FOUND naming `path` when it cannot be opened; a parse or
// validation error comes back prefixed with `path`.
absl::StatusOr<Placement> ReadPlacementFile(const std::string& path);

}  // namespace gemma::eplb
