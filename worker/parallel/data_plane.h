// Which library carries a replica's activations between its ranks (the data plane; step plans
// and lockstep flags always travel over Gloo, the control plane). Gloo reads host memory, so a
// GPU rank's device buffers are staged through the host; NCCL moves them device to device but
// takes at most one rank per GPU.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace gemma::parallel {

enum class DataPlane {
  kGloo,
  kNccl,
  // NCCL where every rank of the replica has a GPU of its own and this build has NCCL, else Gloo.
  kAuto,
};

// "gloo", "nccl" or "auto"; INVALID_ARGUMENT naming --data-plane otherwise.
absl::StatusOr<DataPlane> ParseDataPlane(absl::string_view text);
const char* DataPlaneName(DataPlane plane);

// The data plane the ranks of a replica use, from what was asked and the GPU each rank sits on
// (`gpus[r]`: its CudaDeviceIdentity, or empty for a rank without one). Every rank computes the
// same answer from the same list. kAuto never fails: it gives kGloo with the reason in *why when
// NCCL cannot serve (no NCCL in this build, a rank without a GPU, two ranks on one GPU). An
// explicit kNccl that cannot serve is FAILED_PRECONDITION saying why and what to do instead.
absl::StatusOr<DataPlane> DecideDataPlane(DataPlane requested, const std::vector<std::string>& gpus,
                                          bool nccl_built, std::string* why);

}  // namespace gemma::parallel
