// Expert-load traces for the placement simulator: windows of per-layer, per-expert token counts,
// read from a `gemmactl experts --record` file or generated from a seeded synthetic model.
// Counts only: knows no placement, cost model, gRPC or protobuf (the recorded JSON is parsed as
// plain JSON).
#pragma once

#include <cstdint>
#include <istream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace gemma::eplb {

// A sequence of load windows of one expert layout.
struct Trace {
  std::string name;  // for tables: the file's base name, or the generator and its parameters
  int num_layers = 0;
  int num_experts = 0;
  // Experts per token, where known (synthetic traces); 0 for recorded ones.
  int top_k = 0;
  // Each [num_layers * num_experts], layer-major: the (token, expert) pairs routed to each
  // expert in the window. A window stands for one step's worth of routing in the cost model.
  std::vector<std::vector<int64_t>> windows;
};

// Reads JSON lines as `gemmactl experts --record FILE` writes them: one
// gemma.v1.ExpertLoadWindow a line, printed by protobuf's JSON printer
// ({"replica_id": ..., "window": {"num_layers": ..., "num_experts": ..., "counts": [...]}}).
// Both the proto field names and their lowerCamelCase JSON names are accepted, and 64-bit
// counts as strings or numbers; blank lines are skipped. With `replica` non-empty only that
// replica's windows are kept, else every window in file order (several replicas may
// interleave; they must share one layout). INVALID_ARGUMENT naming `source` and the line for a
// malformed line, NOT_FOUND when no window is left.
absl::StatusOr<Trace> ReadRecordedTrace(std::istream& in, absl::string_view source,
                                        absl::string_view replica);
// The same from a file; NOT_FOUND when it cannot be opened. The trace is named by the file's
// base name (and the replica, when filtered).
absl::StatusOr<Trace> ReadRecordedTraceFile(const std::string& path, absl::string_view replica);

enum class SyntheticKind {
  // Per layer a random permutation of the experts with Zipf weights 1 / rank^zipf_s.
  kZipf,
  // Per layer `hot_experts` random experts share `hot_share` of the routing weight; the rest
  // is uniform.
  kHotExpert,
  // Per layer one random block of the static placement over `hot_rank_blocks` ranks (its
  // num_experts / hot_rank_blocks consecutive experts) shares `hot_share` of the weight.
  kHotRank,
  // Like kHotExpert, with the hot experts drawn again every `rotate_every` windows.
  kRotating,
  // Uniform weights; each window is, with probability `burst_probability`, a burst: Zipf
  // weights with exponent `burst_s` over a fresh permutation per layer.
  kBurst,
};

// "zipf", "hot-expert", "hot-rank", "rotating", "burst".
absl::StatusOr<SyntheticKind> ParseSyntheticKind(absl::string_view name);
const char* SyntheticKindName(SyntheticKind kind);

struct SyntheticParams {
  SyntheticKind kind = SyntheticKind::kZipf;
  int num_layers = 30;
  int num_experts = 128;
  int top_k = 8;
  int64_t tokens_per_window = 4096;
  int num_windows = 20;
  uint64_t seed = 1;
  double zipf_s = 1.0;
  int hot_experts = 2;
  double hot_share = 0.5;
  int hot_rank_blocks = 8;
  int rotate_every = 5;
  double burst_probability = 0.2;
  double burst_s = 1.5;
};

// INVALID_ARGUMENT naming the parameter (as its command-line flag) that is out of range.
absl::Status CheckSyntheticParams(const SyntheticParams& params);

// Generates the trace: in every window and layer each of `tokens_per_window` tokens picks
// `top_k` distinct experts, drawn one after another from the window's weights without
// replacement (each pick proportional to the weights of the experts not yet picked), so a
// layer's counts sum to tokens_per_window * top_k. Deterministic: std::mt19937_64 from `seed`
// and this file's own integer and real draws, so one seed gives one trace on every platform.
// Cost: about tokens * top_k * log2(experts) draws per layer and window.
absl::StatusOr<Trace> SyntheticTrace(const SyntheticParams& params);

}  // namespace gemma::eplb
