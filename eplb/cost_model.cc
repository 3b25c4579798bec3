#include "eplb/cost_model.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/strings/str_format.h"
#include "glog/logging.h"

namespace gemma::eplb {
namespace {

// Expected weight reads of a slot that expects `pairs` (token, expert) pairs: it reads its
// weights when at least one arrives, taken as Poisson.
double ExpectedReads(double pairs) { return pairs > 0 ? -std::expm1(-pairs) : 0.0; }

double GemmSeconds(const CostModel& m, double reads, double pairs) {
  return std::max(reads * m.ExpertWeightBytes() / m.hbm_bytes_per_s,
                  pairs * m.FlopsPerToken() / m.peak_flops);
}

double CommSeconds(const CostModel& m, double intra_pairs, double inter_pairs) {
  return m.WireBytesPerToken() *
         (intra_pairs / m.intra_node_bytes_per_s + inter_pairs / m.inter_node_bytes_per_s);
}

}  // namespace

std::string CostModel::Describe() const {
  return absl::StrFormat(
      "MoE layer time = max over ranks of max(weight reads x %.2f MB / %.0f GB/s HBM, "
      "(token, expert) pairs x %.2f MFLOP / %.0f TFLOP/s) + max over ranks of dispatch+combine "
      "%.2f kB per remote pair at %.0f GB/s in a node, %.0f GB/s across nodes; tokens from every "
      "rank evenly, each to the copy ChooseCopy picks; a slot expecting L pairs reads its weights "
      "with probability 1-exp(-L) (H=%d, I=%d, %g-byte weights)",
      ExpertWeightBytes() / 1e6, hbm_bytes_per_s / 1e9, FlopsPerToken() / 1e6, peak_flops / 1e12,
      WireBytesPerToken() / 1e3, intra_node_bytes_per_s / 1e9, inter_node_bytes_per_s / 1e9,
      hidden_size, moe_intermediate_size, bytes_per_weight);
}

LayerTime ModelLayerTime(const CostModel& model, const Placement& placement,
                         const CopyTable& copies, const Topology& topology, int layer,
                         std::span<const int64_t> expert_load) {
  const int n = placement.num_ranks;
  const int spr = placement.slots_per_rank;
  CHECK_EQ(topology.num_ranks, n) << "cost model: topology and placement disagree on ranks";
  CHECK(topology.ranks_per_node >= 1 && n % topology.ranks_per_node == 0)
      << "cost model: " << n << " ranks do not split into nodes of " << topology.ranks_per_node;
  CHECK_EQ(static_cast<int>(expert_load.size()), placement.num_experts)
      << "cost model: expert load of the wrong size";
  const int rpn = topology.ranks_per_node;
  const int nodes = topology.num_nodes();
  // Per rank: (token, expert) pairs it computes, expected weight reads, pairs it receives from
  // and sends to other ranks in its node (intra) and outside it (inter).
  std::vector<double> pairs(n, 0), reads(n, 0), intra_in(n, 0), inter_in(n, 0), intra_out(n, 0);
  // Per node: what each of its ranks without a copy of an expert sends, summed over experts.
  std::vector<double> node_intra_send(nodes, 0), node_inter_send(nodes, 0);
  std::vector<int> node_copies(nodes);
  for (int e = 0; e < placement.num_experts; ++e) {
    if (expert_load[e] <= 0) continue;
    const std::span<const int32_t> cs = copies.Copies(layer, e);
    const double per_source = static_cast<double>(expert_load[e]) / n;
    std::fill(node_copies.begin(), node_copies.end(), 0);
    for (int32_t c : cs) ++node_copies[topology.NodeOf(c / spr)];
    // Sources on a node with no copy spread over every copy, over the NIC.
    double inter_each = 0;
    for (int k = 0; k < nodes; ++k) {
      if (node_copies[k] > 0) {
        node_intra_send[k] += per_source;
      } else {
        inter_each += rpn * per_source / static_cast<double>(cs.size());
        node_inter_send[k] += per_source;
      }
    }
    for (int32_t c : cs) {
      const int r = c / spr;
      const int k = topology.NodeOf(r);
      // Its own rank's tokens, its node's ranks without a copy in equal shares, and the share of
      // the nodes without a copy.
      const double intra = (rpn - node_copies[k]) * per_source / node_copies[k];
      const double into = per_source + intra + inter_each;
      pairs[r] += into;
      reads[r] += ExpectedReads(into);
      intra_in[r] += intra;
      inter_in[r] += inter_each;
      // This rank holds a copy: it sends this expert nothing.
      intra_out[r] -= per_source;
    }
  }
  LayerTime t;
  for (int r = 0; r < n; ++r) {
    const int k = topology.NodeOf(r);
    const double sent_intra = std::max(0.0, intra_out[r] + node_intra_send[k]);
    const double sent_inter = node_inter_send[k];
    t.gemm_s = std::max(t.gemm_s, GemmSeconds(model, reads[r], pairs[r]));
    t.comm_s = std::max(t.comm_s, CommSeconds(model, std::max(intra_in[r], sent_intra),
                                              std::max(inter_in[r], sent_inter)));
  }
  return t;
}

LayerTime MeanLayerTime(const CostModel& model, const Placement& placement, const CopyTable& copies,
                        const Topology& topology, std::span<const int64_t> load) {
  LayerTime mean;
  if (placement.num_layers == 0) return mean;
  const size_t e = static_cast<size_t>(placement.num_experts);
  for (int l = 0; l < placement.num_layers; ++l) {
    const LayerTime t = ModelLayerTime(model, placement, copies, topology, l,
                                       load.subspan(static_cast<size_t>(l) * e, e));
    mean.gemm_s += t.gemm_s;
    mean.comm_s += t.comm_s;
  }
  mean.gemm_s /= placement.num_layers;
  mean.comm_s /= placement.num_layers;
  return mean;
}

LayerTime IdealLayerTime(const CostModel& model, const Topology& topology,
                         std::span<const int64_t> expert_load) {
  const double n = topology.num_ranks;
  const double rpn = topology.ranks_per_node;
  double total_pairs = 0, total_reads = 0;
  for (int64_t x : expert_load) {
    if (x <= 0) continue;
    total_pairs += static_cast<double>(x);
    total_reads += ExpectedReads(static_cast<double>(x));
  }
  const double rank_pairs = total_pairs / n;
  LayerTime t;
  t.gemm_s = GemmSeconds(model, total_reads / n, rank_pairs);
  t.comm_s = CommSeconds(model, rank_pairs * (rpn - 1) / n, rank_pairs * (n - rpn) / n);
  return t;
}

LayerTime MeanIdealLayerTime(const CostModel& model, const Topology& topology, int num_layers,
                             std::span<const int64_t> load) {
  LayerTime mean;
  if (num_layers == 0) return mean;
  const size_t e = load.size() / static_cast<size_t>(num_layers);
  for (int l = 0; l < num_layers; ++l) {
    const LayerTime t =
        IdealLayerTime(model, topology, load.subspan(static_cast<size_t>(l) * e, e));
    mean.gemm_s += t.gemm_s;
    mean.comm_s += t.comm_s;
  }
  mean.gemm_s /= num_layers;
  mean.comm_s /= num_layers;
  return mean;
}

}  // namespace gemma::eplb
