#include "eplb/simulate.h"

#include <cmath>
#include <span>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace gemma::eplb {
namespace {

// BalancedPlacement takes integer counts; the moving average is scaled up before rounding so
// that small windows (a few tokens an expert) keep their ratios.
constexpr double kFitScale = 1024.0;

void Score(const Placement& placement, const CopyTable& copies, const SimConfig& config,
           std::span<const int64_t> window, PolicyScore& score) {
  score.balancedness += Balancedness(placement, window);
  const LayerTime t = MeanLayerTime(config.cost, placement, copies, config.topology, window);
  score.layer_time.gemm_s += t.gemm_s;
  score.layer_time.comm_s += t.comm_s;
}

void Average(int count, PolicyScore& score) {
  score.balancedness /= count;
  score.layer_time.gemm_s /= count;
  score.layer_time.comm_s /= count;
}

}  // namespace

absl::StatusOr<SimResult> SimulateOne(const Trace& trace, const SimConfig& config) {
  const Topology& topo = config.topology;
  if (trace.windows.size() < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "trace ", trace.name, " has ", trace.windows.size(),
        " window(s); the simulator fits on earlier windows and scores on later ones, so it "
        "needs at least 2"));
  }
  if (!(config.ema > 0 && config.ema <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("the moving-average weight is ", config.ema, "; expected (0, 1]"));
  }
  if (absl::Status s =
          CheckShape(trace.num_layers, trace.num_experts, topo.num_ranks, config.redundant);
      !s.ok()) {
    return s;
  }
  if (topo.ranks_per_node < 1 || topo.num_ranks % topo.ranks_per_node != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        topo.num_ranks, " ranks do not split into nodes of ", topo.ranks_per_node, " ranks"));
  }
  const size_t cells = static_cast<size_t>(trace.num_layers) * trace.num_experts;
  for (const std::vector<int64_t>& w : trace.windows) {
    if (w.size() != cells) {
      return absl::InvalidArgumentError(absl::StrCat("trace ", trace.name, " has a window of ",
                                                     w.size(), " counts; expected ", cells));
    }
  }
  absl::StatusOr<Placement> fixed =
      StaticPlacement(trace.num_layers, trace.num_experts, topo.num_ranks, config.redundant);
  if (!fixed.ok()) return fixed.status();
  absl::StatusOr<Placement> round_robin =
      RoundRobinPlacement(trace.num_layers, trace.num_experts, topo.num_ranks, config.redundant);
  if (!round_robin.ok()) return round_robin.status();
  const CopyTable fixed_copies(*fixed);
  const CopyTable round_robin_copies(*round_robin);

  SimResult result;
  std::vector<double> average(trace.windows[0].begin(), trace.windows[0].end());
  std::vector<int64_t> fit(cells);
  for (size_t w = 1; w < trace.windows.size(); ++w) {
    for (size_t i = 0; i < cells; ++i) fit[i] = std::llround(average[i] * kFitScale);
    absl::StatusOr<Placement> balanced =
        BalancedPlacement(fit, trace.num_layers, trace.num_experts, topo, config.redundant);
    if (!balanced.ok()) return balanced.status();
    balanced->epoch = w;
    const std::span<const int64_t> window = trace.windows[w];
    Score(*fixed, fixed_copies, config, window, result.static_blocks);
    Score(*round_robin, round_robin_copies, config, window, result.round_robin);
    Score(*balanced, CopyTable(*balanced), config, window, result.balanced);
    const LayerTime ideal = MeanIdealLayerTime(config.cost, topo, trace.num_layers, window);
    result.ideal.gemm_s += ideal.gemm_s;
    result.ideal.comm_s += ideal.comm_s;
    ++result.scored_windows;
    // Only now does window w join the load the next placement is fitted to.
    for (size_t i = 0; i < cells; ++i) {
      average[i] = config.ema * static_cast<double>(window[i]) + (1 - config.ema) * average[i];
    }
  }
  Average(result.scored_windows, result.static_blocks);
  Average(result.scored_windows, result.round_robin);
  Average(result.scored_windows, result.balanced);
  result.ideal.gemm_s /= result.scored_windows;
  result.ideal.comm_s /= result.scored_windows;
  return result;
}

}  // namespace gemma::eplb
