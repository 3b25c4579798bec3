#include "worker/parallel/data_plane.h"

#include <map>

#include "absl/strings/str_cat.h"

namespace gemma::parallel {

absl::StatusOr<DataPlane> ParseDataPlane(absl::string_view text) {
  if (text == "gloo") return DataPlane::kGloo;
  if (text == "nccl") return DataPlane::kNccl;
  if (text == "auto") return DataPlane::kAuto;
  return absl::InvalidArgumentError(
      absl::StrCat("--data-plane \"", text, "\" is not one of auto, nccl, gloo"));
}

const char* DataPlaneName(DataPlane plane) {
  switch (plane) {
    case DataPlane::kGloo:
      return "gloo";
    case DataPlane::kNccl:
      return "nccl";
    case DataPlane::kAuto:
      return "auto";
  }
  return "?";
}

absl::StatusOr<DataPlane> DecideDataPlane(DataPlane requested, const std::vector<std::string>& gpus,
                                          bool nccl_built, std::string* why) {
  why->clear();
  if (requested == DataPlane::kGloo) {
    *why = "--data-plane gloo";
    return DataPlane::kGloo;
  }
  if (!nccl_built) {
    *why = "this build has no NCCL (configured without the CUDA toolkit or NCCL)";
  } else {
    std::map<std::string, int> first_rank_on;
    for (int r = 0; r < static_cast<int>(gpus.size()) && why->empty(); ++r) {
      if (gpus[r].empty()) {
        *why = absl::StrCat("rank ", r, " has no CUDA device");
        continue;
      }
      auto [it, fresh] = first_rank_on.emplace(gpus[r], r);
      if (!fresh) {
        *why = absl::StrCat("ranks ", it->second, " and ", r, " share GPU ", gpus[r],
                            " and NCCL takes one rank per GPU");
      }
    }
  }
  if (why->empty()) return DataPlane::kNccl;
  if (requested == DataPlane::kNccl) {
    return absl::FailedPreconditionError(absl::StrCat(
        "--data-plane nccl cannot serve this replica: ", *why,
        "; give each rank its own GPU (CUDA_VISIBLE_DEVICES), or use --data-plane gloo"));
  }
  return DataPlane::kGloo;
}

}  // namespace gemma::parallel
