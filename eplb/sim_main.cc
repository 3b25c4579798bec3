// gemma-eplb-sim: replays expert-load traces (recorded by `gemmactl experts --record` or
// synthetic) against the static, round-robin and balanced expert placements over a sweep of EP
// sizes, redundant copies and node counts, and prints balancedness and the modelled MoE layer
// time of each.
//
//   gemma-eplb-sim --synthetic zipf --zipf-s 1.2 --ep 8,16,32,64 --redundant 0,16,32,64 --nodes 1,4
//   gemma-eplb-sim --trace load.jsonl [--replica ID] --format markdown
//
// The balanced placement for window w + 1 is fitted on an exponential moving average of windows
// 0..w (--ema) and scored on window w + 1; the baselines do not change. Usage errors exit 2,
// a trace that cannot be read exits 1.
#include <algorithm>
#include <iostream>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/usage.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/flags.h"
#include "eplb/cost_model.h"
#include "eplb/simulate.h"
#include "eplb/traces.h"
#include "glog/logging.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, trace, "",
          "expert-load trace(s) recorded by `gemmactl experts --record`, comma-separated");
ABSL_FLAG(std::string, replica, "", "with --trace: keep only this replica's windows");
ABSL_FLAG(std::string, synthetic, "",
          "synthetic trace(s), comma-separated: zipf, hot-expert, hot-rank, rotating, burst");
ABSL_FLAG(int32_t, layers, 30, "synthetic: MoE layers");
ABSL_FLAG(int32_t, experts, 128, "synthetic: experts per layer");
ABSL_FLAG(int32_t, top_k, 8, "synthetic: experts per token");
ABSL_FLAG(int64_t, tokens_per_window, 4096, "synthetic: tokens per window (one step's batch)");
ABSL_FLAG(int32_t, windows, 20, "synthetic: windows");
ABSL_FLAG(uint64_t, seed, 1, "synthetic: seed of std::mt19937_64");
ABSL_FLAG(double, zipf_s, 1.0, "zipf: exponent of the Zipf weights 1 / rank^s");
ABSL_FLAG(int32_t, hot_experts, 2, "hot-expert, rotating: hot experts per layer");
ABSL_FLAG(double, hot_share, 0.5,
          "hot-expert, hot-rank, rotating: share of the routing weight on the hot experts");
ABSL_FLAG(int32_t, hot_rank_blocks, 8,
          "hot-rank: the experts are cut into this many static rank blocks; one per layer is hot");
ABSL_FLAG(int32_t, rotate_every, 5, "rotating: windows between moves of the hot experts");
ABSL_FLAG(double, burst_probability, 0.2, "burst: chance that a window is a burst");
ABSL_FLAG(double, burst_s, 1.5, "burst: Zipf exponent of a burst window");
ABSL_FLAG(std::string, ep, "8,16,32,64", "EP sizes (ranks the experts spread over)");
ABSL_FLAG(std::string, redundant, "0,16,32,64", "redundant expert copies per layer");
ABSL_FLAG(std::string, nodes, "1,2,4,8", "nodes the EP ranks are spread over");
ABSL_FLAG(double, ema, 0.5,
          "weight of the newest window in the load the placement is fitted to (1: last window)");
ABSL_FLAG(std::string, format, "table", "table, json or markdown");
ABSL_FLAG(bool, breakdown, false, "table, markdown: also the GEMM and all-to-all parts");
ABSL_FLAG(int64_t, hidden_size, 2816, "cost model: hidden size (26B-A4B)");
ABSL_FLAG(int64_t, moe_intermediate_size, 704, "cost model: expert intermediate size (26B-A4B)");
ABSL_FLAG(double, weight_bytes, 2, "cost model: bytes per expert weight (bf16: 2)");
ABSL_FLAG(double, hbm_gb_per_s, 3350, "cost model: HBM bandwidth per GPU, GB/s (H100: 3350)");
ABSL_FLAG(double, peak_tflops, 989, "cost model: dense bf16 TFLOP/s per GPU (H100: 989)");
ABSL_FLAG(double, nvlink_gb_per_s, 450, "cost model: NVLink GB/s per direction per GPU");
ABSL_FLAG(double, nic_gb_per_s, 50, "cost model: NIC GB/s per direction per GPU (400 Gb/s)");

namespace gemma::eplb {
namespace {

constexpr char kName[] = "gemma-eplb-sim";
constexpr int kUsageExit = 2;

enum class Format { kTable, kJson, kMarkdown };

struct Options {
  std::vector<std::string> trace_files;
  std::string replica;
  std::vector<SyntheticParams> synthetic;
  std::vector<int> ep, redundant, nodes;
  double ema = 0.5;
  Format format = Format::kTable;
  bool breakdown = false;
  CostModel cost;
};

// A comma-separated list of distinct integers >= min, in the order given.
absl::StatusOr<std::vector<int>> IntList(const char* flag, const std::string& value, int min,
                                         const char* example) {
  std::vector<int> out;
  for (absl::string_view item : absl::StrSplit(value, ',', absl::SkipWhitespace())) {
    int v = 0;
    if (!absl::SimpleAtoi(item, &v) || v < min) {
      return absl::InvalidArgumentError(
          absl::StrCat(flag, ": \"", item, "\" is not ", min == 0 ? "a non-negative" : "a positive",
                       " integer; expected a comma-separated list such as ", example));
    }
    if (std::find(out.begin(), out.end(), v) == out.end()) out.push_back(v);
  }
  if (out.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, " is empty; expected a comma-separated list such as ", example));
  }
  return out;
}

absl::Status Positive(const char* flag, double value) {
  if (value > 0) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(flag, " is ", value, "; expected a positive number"));
}

// The flags as options; INVALID_ARGUMENT naming the flag when one is out of range.
absl::StatusOr<Options> OptionsFromFlags() {
  Options o;
  for (absl::string_view f : absl::StrSplit(absl::GetFlag(FLAGS_trace), ',', absl::SkipEmpty())) {
    o.trace_files.emplace_back(f);
  }
  o.replica = absl::GetFlag(FLAGS_replica);
  if (!o.replica.empty() && o.trace_files.empty()) {
    return absl::InvalidArgumentError("--replica filters a recorded trace; give --trace FILE");
  }
  SyntheticParams base;
  base.num_layers = absl::GetFlag(FLAGS_layers);
  base.num_experts = absl::GetFlag(FLAGS_experts);
  base.top_k = absl::GetFlag(FLAGS_top_k);
  base.tokens_per_window = absl::GetFlag(FLAGS_tokens_per_window);
  base.num_windows = absl::GetFlag(FLAGS_windows);
  base.seed = absl::GetFlag(FLAGS_seed);
  base.zipf_s = absl::GetFlag(FLAGS_zipf_s);
  base.hot_experts = absl::GetFlag(FLAGS_hot_experts);
  base.hot_share = absl::GetFlag(FLAGS_hot_share);
  base.hot_rank_blocks = absl::GetFlag(FLAGS_hot_rank_blocks);
  base.rotate_every = absl::GetFlag(FLAGS_rotate_every);
  base.burst_probability = absl::GetFlag(FLAGS_burst_probability);
  base.burst_s = absl::GetFlag(FLAGS_burst_s);
  for (absl::string_view kind :
       absl::StrSplit(absl::GetFlag(FLAGS_synthetic), ',', absl::SkipWhitespace())) {
    absl::StatusOr<SyntheticKind> k = ParseSyntheticKind(kind);
    if (!k.ok())
      return absl::InvalidArgumentError(absl::StrCat("--synthetic: ", k.status().message()));
    SyntheticParams p = base;
    p.kind = *k;
    o.synthetic.push_back(p);
  }
  if (o.trace_files.empty() && o.synthetic.empty()) {
    return absl::InvalidArgumentError(
        "no trace: give --trace FILE (from gemmactl experts --record) or --synthetic "
        "zipf|hot-expert|hot-rank|rotating|burst");
  }
  if (!o.synthetic.empty()) {
    if (absl::Status s = CheckSyntheticParams(base); !s.ok()) return s;
    if (base.num_windows < 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("--windows is ", base.num_windows,
                       "; the simulator fits on earlier windows and scores "
                       "on later ones, so it needs at least 2"));
    }
  }
  absl::StatusOr<std::vector<int>> ep = IntList("--ep", absl::GetFlag(FLAGS_ep), 1, "8,16,32,64");
  if (!ep.ok()) return ep.status();
  absl::StatusOr<std::vector<int>> redundant =
      IntList("--redundant", absl::GetFlag(FLAGS_redundant), 0, "0,16,32,64");
  if (!redundant.ok()) return redundant.status();
  absl::StatusOr<std::vector<int>> nodes =
      IntList("--nodes", absl::GetFlag(FLAGS_nodes), 1, "1,2,4,8");
  if (!nodes.ok()) return nodes.status();
  o.ep = *ep;
  o.redundant = *redundant;
  o.nodes = *nodes;
  o.ema = absl::GetFlag(FLAGS_ema);
  if (!(o.ema > 0 && o.ema <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--ema is ", o.ema, "; expected a weight in (0, 1] (1: the last window)"));
  }
  const std::string format = absl::GetFlag(FLAGS_format);
  if (format == "table") {
    o.format = Format::kTable;
  } else if (format == "json") {
    o.format = Format::kJson;
  } else if (format == "markdown") {
    o.format = Format::kMarkdown;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--format is \"", format, "\"; expected table, json or markdown"));
  }
  o.breakdown = absl::GetFlag(FLAGS_breakdown);
  o.cost.hidden_size = absl::GetFlag(FLAGS_hidden_size);
  o.cost.moe_intermediate_size = absl::GetFlag(FLAGS_moe_intermediate_size);
  o.cost.bytes_per_weight = absl::GetFlag(FLAGS_weight_bytes);
  o.cost.hbm_bytes_per_s = absl::GetFlag(FLAGS_hbm_gb_per_s) * 1e9;
  o.cost.peak_flops = absl::GetFlag(FLAGS_peak_tflops) * 1e12;
  o.cost.intra_node_bytes_per_s = absl::GetFlag(FLAGS_nvlink_gb_per_s) * 1e9;
  o.cost.inter_node_bytes_per_s = absl::GetFlag(FLAGS_nic_gb_per_s) * 1e9;
  for (const auto& [flag, value] : std::vector<std::pair<const char*, double>>{
           {"--hidden-size", static_cast<double>(o.cost.hidden_size)},
           {"--moe-intermediate-size", static_cast<double>(o.cost.moe_intermediate_size)},
           {"--weight-bytes", o.cost.bytes_per_weight},
           {"--hbm-gb-per-s", o.cost.hbm_bytes_per_s},
           {"--peak-tflops", o.cost.peak_flops},
           {"--nvlink-gb-per-s", o.cost.intra_node_bytes_per_s},
           {"--nic-gb-per-s", o.cost.inter_node_bytes_per_s}}) {
    if (absl::Status s = Positive(flag, value); !s.ok()) return s;
  }
  return o;
}

struct Row {
  std::string trace;
  int ep = 0, redundant = 0, nodes = 0;
  SimResult result;
};

double Us(double seconds) { return seconds * 1e6; }

// One cell per column, as text.
std::vector<std::string> Header(bool breakdown) {
  std::vector<std::string> h = {"trace", "EP", "R", "nodes"};
  for (const char* policy : {"static", "round-robin", "ours"}) {
    h.push_back(absl::StrCat(policy, " bal"));
    h.push_back(absl::StrCat(policy, " us"));
    if (breakdown) {
      h.push_back(absl::StrCat(policy, " GEMM"));
      h.push_back(absl::StrCat(policy, " a2a"));
    }
  }
  h.push_back("ideal us");
  h.push_back("speed-up");
  return h;
}

std::vector<std::string> Cells(const Row& row, bool breakdown) {
  std::vector<std::string> c = {row.trace, absl::StrCat(row.ep), absl::StrCat(row.redundant),
                                absl::StrCat(row.nodes)};
  for (const PolicyScore* s :
       {&row.result.static_blocks, &row.result.round_robin, &row.result.balanced}) {
    c.push_back(absl::StrFormat("%.3f", s->balancedness));
    c.push_back(absl::StrFormat("%.1f", Us(s->layer_time.total_s())));
    if (breakdown) {
      c.push_back(absl::StrFormat("%.1f", Us(s->layer_time.gemm_s)));
      c.push_back(absl::StrFormat("%.1f", Us(s->layer_time.comm_s)));
    }
  }
  c.push_back(absl::StrFormat("%.1f", Us(row.result.ideal.total_s())));
  c.push_back(absl::StrFormat("%.2fx", row.result.SpeedupOverStatic()));
  return c;
}

nlohmann::ordered_json PolicyJson(const PolicyScore& s) {
  return {{"balancedness", s.balancedness},
          {"layer_us", Us(s.layer_time.total_s())},
          {"gemm_us", Us(s.layer_time.gemm_s)},
          {"all_to_all_us", Us(s.layer_time.comm_s)}};
}

void Print(const Options& o, const std::vector<std::string>& preamble, const std::vector<Row>& rows,
           const std::vector<std::string>& skipped) {
  if (o.format == Format::kJson) {
    nlohmann::ordered_json out;
    out["cost_model"] = o.cost.Describe();
    out["notes"] = preamble;
    out["skipped"] = skipped;
    out["rows"] = nlohmann::ordered_json::array();
    for (const Row& r : rows) {
      out["rows"].push_back({{"trace", r.trace},
                             {"ep", r.ep},
                             {"redundant", r.redundant},
                             {"nodes", r.nodes},
                             {"scored_windows", r.result.scored_windows},
                             {"static", PolicyJson(r.result.static_blocks)},
                             {"round_robin", PolicyJson(r.result.round_robin)},
                             {"ours", PolicyJson(r.result.balanced)},
                             {"ideal_us", Us(r.result.ideal.total_s())},
                             {"ideal_gemm_us", Us(r.result.ideal.gemm_s)},
                             {"ideal_all_to_all_us", Us(r.result.ideal.comm_s)},
                             {"speedup_over_static", r.result.SpeedupOverStatic()}});
    }
    std::cout << out.dump(2) << "\n";
    return;
  }
  const std::vector<std::string> header = Header(o.breakdown);
  std::vector<std::vector<std::string>> cells;
  for (const Row& r : rows) cells.push_back(Cells(r, o.breakdown));
  if (o.format == Format::kMarkdown) {
    std::cout << "Cost model: " << o.cost.Describe() << ".\n\n";
    for (const std::string& line : preamble) std::cout << line << "\n\n";
    std::cout << "| " << absl::StrJoin(header, " | ") << " |\n|";
    for (size_t i = 0; i < header.size(); ++i) std::cout << (i == 0 ? "---|" : "---:|");
    std::cout << "\n";
    for (const auto& c : cells) std::cout << "| " << absl::StrJoin(c, " | ") << " |\n";
    if (!skipped.empty()) {
      std::cout << "\nSkipped:\n\n";
      for (const std::string& s : skipped) std::cout << "- " << s << "\n";
    }
    return;
  }
  std::cout << "# cost model: " << o.cost.Describe() << "\n";
  for (const std::string& line : preamble) std::cout << "# " << line << "\n";
  for (const std::string& s : skipped) std::cout << "# skipped " << s << "\n";
  std::vector<size_t> width(header.size());
  for (size_t i = 0; i < header.size(); ++i) width[i] = header[i].size();
  for (const auto& c : cells) {
    for (size_t i = 0; i < c.size(); ++i) width[i] = std::max(width[i], c[i].size());
  }
  auto line = [&](const std::vector<std::string>& c) {
    std::string out;
    for (size_t i = 0; i < c.size(); ++i) {
      const std::string pad(width[i] - c[i].size(), ' ');
      absl::StrAppend(&out, i == 0 ? "" : "  ", i == 0 ? c[i] + pad : pad + c[i]);
    }
    std::cout << out << "\n";
  };
  line(header);
  for (const auto& c : cells) line(c);
}

absl::Status Run(const Options& o) {
  std::vector<Trace> traces;
  for (const std::string& file : o.trace_files) {
    absl::StatusOr<Trace> t = ReadRecordedTraceFile(file, o.replica);
    if (!t.ok()) return t.status();
    traces.push_back(*std::move(t));
  }
  for (const SyntheticParams& p : o.synthetic) {
    absl::StatusOr<Trace> t = SyntheticTrace(p);
    if (!t.ok()) return t.status();
    traces.push_back(*std::move(t));
  }
  std::vector<std::string> preamble;
  preamble.push_back(absl::StrFormat(
      "ours: BalancedPlacement refitted before each window on an EMA (weight %g on the newest) "
      "of the windows before it, scored on the next; bal = mean rank load / max rank load; us = "
      "modelled MoE layer time, mean over scored windows and layers; speed-up = static us / "
      "ours us",
      o.ema));
  for (const Trace& t : traces) {
    preamble.push_back(absl::StrFormat("trace %s: %d windows, %d layers x %d experts%s", t.name,
                                       t.windows.size(), t.num_layers, t.num_experts,
                                       t.top_k > 0 ? absl::StrCat(", top-", t.top_k) : ""));
  }
  std::vector<Row> rows;
  std::vector<std::string> skipped;
  std::set<std::string> said;
  auto skip = [&](std::string message) {
    if (said.insert(message).second) skipped.push_back(std::move(message));
  };
  for (const Trace& t : traces) {
    if (t.windows.size() < 2) {
      skip(absl::StrCat(t.name, ": ", t.windows.size(),
                        " window(s); at least 2 are needed (fit on one, score on the next)"));
      continue;
    }
    for (int ep : o.ep) {
      for (int redundant : o.redundant) {
        if (absl::Status s = CheckShape(t.num_layers, t.num_experts, ep, redundant); !s.ok()) {
          skip(absl::StrCat(t.num_experts, " experts, EP=", ep, " R=", redundant, ": ",
                            s.message()));
          continue;
        }
        for (int nodes : o.nodes) {
          if (nodes > ep || ep % nodes != 0) {
            skip(absl::StrCat("EP=", ep, " nodes=", nodes, ": ", ep,
                              " ranks do not split evenly over ", nodes, " nodes"));
            continue;
          }
          SimConfig config;
          config.topology = Topology{ep, ep / nodes};
          config.redundant = redundant;
          config.ema = o.ema;
          config.cost = o.cost;
          absl::StatusOr<SimResult> result = SimulateOne(t, config);
          if (!result.ok()) {
            return absl::Status(result.status().code(),
                                absl::StrCat(t.name, ", EP=", ep, " R=", redundant,
                                             " nodes=", nodes, ": ", result.status().message()));
          }
          rows.push_back({t.name, ep, redundant, nodes, *result});
        }
      }
    }
  }
  Print(o, preamble, rows, skipped);
  if (rows.empty()) {
    return absl::FailedPreconditionError(
        "no combination of --ep, --redundant and --nodes fits the trace(s); see the skipped "
        "lines for why");
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace gemma::eplb

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "replays expert-load traces against the static, round-robin and balanced expert "
      "placements and prints balancedness and the modelled MoE layer time\n"
      "  gemma-eplb-sim --synthetic zipf --zipf-s 1.2 [--ep 8,16,32,64 --redundant 0,16,32,64 "
      "--nodes 1,4]\n"
      "  gemma-eplb-sim --trace FILE.jsonl [--replica ID] [--format table|json|markdown]");
  const std::vector<char*> args = gemma::ParseFlags(argc, argv);
  google::InitGoogleLogging(argv[0]);
  FLAGS_logtostderr = true;
  if (args.size() > 1) {
    std::cerr << gemma::eplb::kName << ": unexpected argument \"" << args[1]
              << "\"; every input is a flag (see --help)\n";
    return gemma::eplb::kUsageExit;
  }
  absl::StatusOr<gemma::eplb::Options> options = gemma::eplb::OptionsFromFlags();
  if (!options.ok()) {
    std::cerr << gemma::eplb::kName << ": " << options.status().message() << " (see --help)\n";
    return gemma::eplb::kUsageExit;
  }
  if (absl::Status status = gemma::eplb::Run(*options); !status.ok()) {
    std::cerr << gemma::eplb::kName << ": " << status.message() << "\n";
    return 1;
  }
  return 0;
}
