// A first-order model of one MoE layer's time under an expert placement: the expert GEMMs of the
// busiest rank plus the dp-ep all-to-all (dispatch and combine) of the busiest rank. Arithmetic
// over counts and a Placement: knows no model weights, backend, communicator or trace format.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "eplb/placement.h"

namespace gemma::eplb {

// The expert shape and the machine. Defaults: the Gemma 4 26B-A4B experts (hidden_size 2816,
// moe_intermediate_size 704, bf16 weights) on H100s (3.35 TB/s HBM, 989 TFLOP/s dense bf16,
// NVLink 450 GB/s per direction per GPU, a 400 Gb/s NIC = 50 GB/s per GPU).
struct CostModel {
  int64_t hidden_size = 2816;
  int64_t moe_intermediate_size = 704;
  double bytes_per_weight = 2;
  double activation_bytes = 2;  // bf16 tokens on the wire
  double hbm_bytes_per_s = 3.35e12;
  double peak_flops = 989e12;
  double intra_node_bytes_per_s = 450e9;
  double inter_node_bytes_per_s = 50e9;

  // gate_up [2I, H] and down [H, I]: 3 * H * I weights.
  double ExpertWeightBytes() const {
    return 3.0 * static_cast<double>(hidden_size) * moe_intermediate_size * bytes_per_weight;
  }
  // 2 * 3 * H * I flops per (token, expert).
  double FlopsPerToken() const {
    return 6.0 * static_cast<double>(hidden_size) * moe_intermediate_size;
  }
  // Dispatch and combine: one bf16 hidden vector each way per (token, remote copy).
  double WireBytesPerToken() const {
    return 2.0 * static_cast<double>(hidden_size) * activation_bytes;
  }
  // The model in one line, for the simulator's header.
  std::string Describe() const;
};

// One layer's modelled time, seconds.
struct LayerTime {
  double gemm_s = 0;  // max over ranks of the expert GEMM time
  double comm_s = 0;  // max over ranks of the all-to-all time
  double total_s() const { return gemm_s + comm_s; }
};

// The modelled time of `layer` under `placement` (with `copies` = CopyTable(placement)) for
// `expert_load` ([num_experts] (token, expert) pairs), in expectation:
//  - tokens originate evenly over the ranks (dp-ep), so each expert's load splits evenly over
//    source ranks; from each source it goes to the copy ChooseCopy picks: the source's own copy,
//    else the copies on its node in equal shares, else all copies in equal shares;
//  - a rank's GEMM time is max(weight reads * ExpertWeightBytes / HBM bandwidth,
//    its pairs * FlopsPerToken / peak flops), where a slot expecting lambda pairs reads its
//    weights once with probability 1 - exp(-lambda) (a slot receiving tokens reads them once);
//  - a rank's all-to-all time is, per link class, max(pairs it sends, pairs it receives) from
//    other ranks * WireBytesPerToken / bandwidth, NVLink within a node plus the NIC across
//    nodes;
//  - the layer's time is the max over ranks of the GEMM time plus the max over ranks of the
//    all-to-all time.
// Cost: O(num_experts * (copies + nodes) + num_ranks).
LayerTime ModelLayerTime(const CostModel& model, const Placement& placement,
                         const CopyTable& copies, const Topology& topology, int layer,
                         std::span<const int64_t> expert_load);

// The same for every layer of a window ([num_layers * num_experts], layer-major), as the mean
// over layers.
LayerTime MeanLayerTime(const CostModel& model, const Placement& placement, const CopyTable& copies,
                        const Topology& topology, std::span<const int64_t> load);

// The perfectly balanced time for one layer: every rank gets 1/N of the pairs and of the
// weight reads of the layer's experts, each held once (no copies), and exchanges its pairs
// with the other ranks evenly (so (ranks_per_node - 1) / N of them over NVLink and
// (N - ranks_per_node) / N over the NIC). A placement without copies that gives every rank
// the same number of experts of the same loads models to exactly this; copies can do better
// on the all-to-all (a copy on the source's rank or node saves the NIC).
LayerTime IdealLayerTime(const CostModel& model, const Topology& topology,
                         std::span<const int64_t> expert_load);
// Mean over the layers of a window.
LayerTime MeanIdealLayerTime(const CostModel& model, const Topology& topology, int num_layers,
                             std::span<const int64_t> load);

}  // namespace gemma::eplb
