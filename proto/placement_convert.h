// Expert placements between their wire form (gemma.v1.ExpertPlacement) and eplb::Placement,
// for the coordinator, the replica leaders and gemmactl. Knows no model.
#pragma once

#include "absl/status/statusor.h"
#include "eplb/placement.h"
#include "gemma/v1/cluster.pb.h"

namespace gemma {

gemma::v1::ExpertPlacement PlacementToProto(const eplb::Placement& placement,
                                            int ranks_per_node = 0);
// Validated (eplb::Validate): INVALID_ARGUMENT naming what is wrong.
absl::StatusOr<eplb::Placement> PlacementFromProto(const gemma::v1::ExpertPlacement& proto);

}  // namespace gemma
