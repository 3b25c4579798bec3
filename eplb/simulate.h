// The core of gemma-eplb-sim: replays a load trace window by window, refitting the balanced
// placement on the load seen so far and scoring it, and the static and round-robin baselines,
// on the next window. Knows placements, traces and the cost model; no flags, files or output.
#pragma once

#include "absl/status/statusor.h"
#include "eplb/cost_model.h"
#include "eplb/placement.h"
#include "eplb/traces.h"

namespace gemma::eplb {

struct SimConfig {
  Topology topology;  // num_ranks = the EP size
  int redundant = 0;  // spare slots per layer over all ranks
  // Weight of the newest window in the load the balancer fits (an exponential moving average
  // over windows); 1 fits the last window only. In (0, 1].
  double ema = 0.5;
  CostModel cost;
};

struct PolicyScore {
  double balancedness = 0;  // mean over scored windows of Balancedness()
  LayerTime layer_time;     // mean over scored windows and layers
};

struct SimResult {
  PolicyScore static_blocks;  // StaticPlacement, the same every window
  PolicyScore round_robin;    // RoundRobinPlacement, the same every window
  PolicyScore balanced;       // BalancedPlacement refitted before every scored window
  LayerTime ideal;            // IdealLayerTime, mean over scored windows and layers
  int scored_windows = 0;
  double SpeedupOverStatic() const {
    return balanced.layer_time.total_s() > 0
               ? static_blocks.layer_time.total_s() / balanced.layer_time.total_s()
               : 1.0;
  }
};

// Window w + 1 is scored with a placement fitted on windows 0..w (never on itself), so windows
// 1..W-1 are scored. INVALID_ARGUMENT when the trace has fewer than two windows, when the
// experts, redundant copies and ranks do not make a placement (CheckShape's message), or when
// the ranks do not split into the topology's nodes. Cost per scored window: one
// BalancedPlacement and three cost-model passes over every layer.
absl::StatusOr<SimResult> SimulateOne(const Trace& trace, const SimConfig& config);

}  // namespace gemma::eplb
