#include "worker/cli/model_flags.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <string>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "common/model_config.h"
#include "common/status_macros.h"
#include "eplb/placement.h"
#include "eplb/placement_json.h"
#include "glog/logging.h"

ABSL_FLAG(std::string, model, "", "Hugging Face Gemma 4 checkpoint directory");
ABSL_FLAG(std::string, backend, "cpu", "cpu or cuda (every rank of this process on device 0)");
ABSL_FLAG(int32_t, threads, 0, "CPU threads per rank (0: the cores divided among the ranks)");
ABSL_FLAG(std::string, kv_dtype, "auto", gemma::replica::kKvDtypeFlagHelp);
ABSL_FLAG(bool, enforce_eager, false, gemma::replica::kEnforceEagerFlagHelp);
ABSL_FLAG(int64_t, page_size, 16, "KV-cache page size in tokens");
ABSL_FLAG(int64_t, cache_tokens, 4096,
          "KV-cache capacity in positions (raised to what the prompt and generation need)");
ABSL_FLAG(int64_t, prefill_chunk, 0, "tokens per prefill step (0: all in one step)");
ABSL_FLAG(int32_t, redundant_experts, 0,
          "MoE: spare expert slots over the expert-parallel ranks, filled with copies in the "
          "static placement (experts + N must be a multiple of the ranks; 0: no copies)");
ABSL_FLAG(std::string, expert_placement, "",
          "MoE: a JSON expert placement file (epoch, num_experts, num_ranks, slots_per_rank, "
          "layers -> ranks -> expert ids) for the expert-parallel ranks (tp mode: the tp "
          "group; dp-ep: every rank); wins over --redundant-experts");

namespace gemma::cli {
namespace {

absl::StatusOr<eplb::Placement> PlacementFromFlags(const std::string& model_dir, int ep_size) {
  const int redundant = absl::GetFlag(FLAGS_redundant_experts);
  const std::string file = absl::GetFlag(FLAGS_expert_placement);
  const std::string flag = file.empty() ? absl::StrCat("--redundant-experts ", redundant)
                                        : absl::StrCat("--expert-placement ", file);
  if (redundant < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--redundant-experts ", redundant, " must not be negative"));
  }
  ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(model_dir));
  if (!config.enable_moe_block || config.num_experts <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, ": ", model_dir, " is a dense model; it has no experts to place"));
  }
  const int num_layers = static_cast<int>(config.num_hidden_layers);
  const int num_experts = static_cast<int>(config.num_experts);
  if (file.empty()) {
    absl::StatusOr<eplb::Placement> placement =
        eplb::StaticPlacement(num_layers, num_experts, ep_size, redundant);
    if (!placement.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          flag, " over ", ep_size, " expert-parallel ranks: ", placement.status().message()));
    }
    return placement;
  }
  if (redundant != 0) {
    LOG(WARNING) << "--expert-placement " << file << " wins over --redundant-experts " << redundant;
  }
  absl::StatusOr<eplb::Placement> placement = eplb::ReadPlacementFile(file);
  if (!placement.ok()) {
    return absl::Status(placement.status().code(),
                        absl::StrCat("--expert-placement: ", placement.status().message()));
  }
  if (placement->num_ranks != ep_size) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, ": the placement is for ", placement->num_ranks,
                     " ranks, but the experts are "
                     "split over ",
                     ep_size,
                     " expert-parallel ranks (tp mode: the tp group; dp-ep: every "
                     "rank)"));
  }
  if (placement->num_layers != num_layers || placement->num_experts != num_experts) {
    return absl::InvalidArgumentError(absl::StrCat(
        flag, ": the placement has ", placement->num_layers, " layers of ", placement->num_experts,
        " experts, but ", model_dir, " has ", num_layers, " layers of ", num_experts, " experts"));
  }
  return placement;
}

// The placement the flags ask for over `ep_size` ranks, built once per process: ranks that are
// threads of one process share it, and it outlives every load. Null without the flags.
absl::StatusOr<const eplb::Placement*> SharedPlacement(const std::string& model_dir, int ep_size) {
  if (absl::GetFlag(FLAGS_expert_placement).empty() &&
      absl::GetFlag(FLAGS_redundant_experts) == 0) {
    return nullptr;
  }
  if (model_dir.empty()) return nullptr;  // LoadRank says --model is required
  static std::mutex mu;
  static std::map<int, absl::StatusOr<eplb::Placement>>* built =
      new std::map<int, absl::StatusOr<eplb::Placement>>();
  std::lock_guard<std::mutex> lock(mu);
  auto it = built->find(ep_size);
  if (it == built->end()) {
    it = built->emplace(ep_size, PlacementFromFlags(model_dir, ep_size)).first;
    if (it->second.ok()) {
      const eplb::Placement& p = *it->second;
      const std::string file = absl::GetFlag(FLAGS_expert_placement);
      LOG(INFO) << "expert placement " << (file.empty() ? "static" : "from " + file) << ": "
                << p.num_experts << " experts and " << p.redundant() << " copies over "
                << p.num_ranks << " ranks, " << p.slots_per_rank << " slots per rank";
    }
  }
  if (!it->second.ok()) return it->second.status();
  return &*it->second;
}

}  // namespace

absl::StatusOr<replica::LoadOptions> RankLoadOptions(const RankEnv& env, int64_t min_cache_tokens) {
  replica::LoadOptions options = {
      .model_dir = absl::GetFlag(FLAGS_model),
      .backend = absl::GetFlag(FLAGS_backend),
      .threads = absl::GetFlag(FLAGS_threads),
      .ranks_in_process = env.ranks_in_process,
      .cache_tokens = std::max(absl::GetFlag(FLAGS_cache_tokens), min_cache_tokens),
      .page_size = absl::GetFlag(FLAGS_page_size),
      .kv_dtype = absl::GetFlag(FLAGS_kv_dtype),
      .enforce_eager = absl::GetFlag(FLAGS_enforce_eager),
      .parallel = env.parallel};
  ASSIGN_OR_RETURN(options.parallel.placement,
                   SharedPlacement(options.model_dir, env.parallel.layout.ep_size));
  return options;
}

}  // namespace gemma::cli
