// Expert placement for expert parallelism: which logical experts each rank's physical slots hold,
// per layer, how a token picks among an expert's copies, and the balancer that fits a placement
// to measured load. Pure functions over counts: knows no model, backend or communicator.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace gemma::eplb {

// Where each layer's logical experts live. Every rank holds `slots_per_rank` slots per layer;
// num_ranks * slots_per_rank = num_experts + the redundant copies. A logical expert may have
// copies on several ranks, never two on one rank.
struct Placement {
  uint64_t epoch = 0;
  int num_layers = 0;
  int num_experts = 0;
  int num_ranks = 0;
  int slots_per_rank = 0;
  // [num_layers, num_ranks, slots_per_rank]: the logical expert each slot holds.
  std::vector<int32_t> slots;

  int redundant() const { return num_ranks * slots_per_rank - num_experts; }
  std::span<const int32_t> RankSlots(int layer, int rank) const {
    return {slots.data() + (static_cast<size_t>(layer) * num_ranks + rank) * slots_per_rank,
            static_cast<size_t>(slots_per_rank)};
  }
  // Same slots (the epoch is not compared).
  bool SameSlots(const Placement& other) const {
    return num_layers == other.num_layers && num_experts == other.num_experts &&
           num_ranks == other.num_ranks && slots_per_rank == other.slots_per_rank &&
           slots == other.slots;
  }
};

// INVALID_ARGUMENT naming the first problem: sizes that do not multiply out, an id out of
// range, an expert with no copy in a layer, two copies of one expert on one rank.
absl::Status Validate(const Placement& placement);

// The checks shared by every constructor: `redundant` spare slots over `ranks` must leave every
// rank the same number of slots and never need two copies of one expert on a rank.
absl::Status CheckShape(int num_layers, int num_experts, int num_ranks, int redundant);

// Rank r holds experts [r * E / N, (r + 1) * E / N) in its first slots, as before any balancing;
// spare slots (redundant > 0) hold copies dealt round the other ranks' experts in id order.
absl::StatusOr<Placement> StaticPlacement(int num_layers, int num_experts, int num_ranks,
                                          int redundant);
// Expert e on rank e mod N (slot e / N), then the spare copies dealt the same way from expert 0:
// load-oblivious, the usual baseline.
absl::StatusOr<Placement> RoundRobinPlacement(int num_layers, int num_experts, int num_ranks,
                                              int redundant);

// Ranks grouped into nodes of `ranks_per_node` consecutive ranks (1 node: all of them).
struct Topology {
  int num_ranks = 1;
  int ranks_per_node = 1;
  int num_nodes() const { return ranks_per_node > 0 ? num_ranks / ranks_per_node : 0; }
  int NodeOf(int rank) const { return rank / ranks_per_node; }
};

// Fits a placement to `load` ([num_layers * num_experts] tokens, layer-major): per layer, the
// `redundant` extra copies go one at a time to the expert with the most load per copy (lowest id
// on ties, at most one copy per rank); then the copies, heaviest share first, go to the node
// with the least load that has room, and within each node to the rank with the least load that
// has room and no copy of that expert. Deterministic; the same load gives the same placement.
// An all-zero layer gets the static placement.
absl::StatusOr<Placement> BalancedPlacement(std::span<const int64_t> load, int num_layers,
                                            int num_experts, const Topology& topology,
                                            int redundant);

// Per layer, each expert's copies as global slot indices (rank * slots_per_rank + slot), in
// rank order; built once per placement for dispatch.
class CopyTable {
 public:
  explicit CopyTable(const Placement& placement);
  std::span<const int32_t> Copies(int layer, int expert) const {
    const size_t i = static_cast<size_t>(layer) * num_experts_ + expert;
    return {copies_.data() + begin_[i], static_cast<size_t>(begin_[i + 1] - begin_[i])};
  }
  int slots_per_rank() const { return slots_per_rank_; }
  int num_experts() const { return num_experts_; }
  // Whether every expert of every layer has exactly one copy in rank-major id order (the static
  // placement without spares), so ownership is id / (E / N).
  bool contiguous() const { return contiguous_; }

 private:
  int num_experts_ = 0;
  int slots_per_rank_ = 0;
  bool contiguous_ = false;
  std::vector<int32_t> begin_;
  std::vector<int32_t> copies_;
};

// The copy (a global slot from `copies`) that serves the `nth` token routed to this expert from
// `source_rank` in one step: a copy on the source rank if there is one, else the copies on its
// node taken in turn, else all copies taken in turn. Every rank computes the same answer.
int32_t ChooseCopy(std::span<const int32_t> copies, int slots_per_rank, int source_rank,
                   const Topology& topology, int64_t nth);

// Per rank, the tokens of one layer if each expert's `expert_load` is split evenly over its
// copies.
std::vector<double> RankLoads(const Placement& placement, int layer,
                              std::span<const int64_t> expert_load);
// Mean over layers of (mean rank load / max rank load) under RankLoads: 1 is even. Layers with
// no load count as 1.
double Balancedness(const Placement& placement, std::span<const int64_t> load);

// A compact binary form (little-endian) for step plans and files; Parse validates.
std::string SerializePlacement(const Placement& placement);
absl::StatusOr<Placement> ParsePlacement(absl::string_view bytes);

}  // namespace gemma::eplb
