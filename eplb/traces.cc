#include "eplb/traces.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"

namespace gemma::eplb {
namespace {

using Json = nlohmann::json;

// The member `snake` or, failing that, its lowerCamelCase JSON name `camel`; null when neither.
const Json* Member(const Json& object, const char* snake, const char* camel) {
  for (const char* key : {snake, camel}) {
    auto it = object.find(key);
    if (it != object.end()) return &*it;
  }
  return nullptr;
}

// A proto3 JSON integer: a number, or a decimal string (how int64 fields are printed).
absl::StatusOr<int64_t> JsonInt(const Json& value) {
  if (value.is_number_integer() && !value.is_number_unsigned()) return value.get<int64_t>();
  if (value.is_number_unsigned()) {
    const uint64_t u = value.get<uint64_t>();
    if (u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return static_cast<int64_t>(u);
    }
  }
  if (value.is_string()) {
    int64_t v = 0;
    if (absl::SimpleAtoi(value.get<std::string>(), &v)) return v;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("expected an integer (a number or a decimal string), got ", value.dump()));
}

struct RecordedWindow {
  std::string replica;
  int num_layers = 0;
  int num_experts = 0;
  std::vector<int64_t> counts;
};

// One line's window, or why not (without the line number).
absl::StatusOr<RecordedWindow> ParseWindowLine(const std::string& line) {
  const Json root = Json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) return absl::InvalidArgumentError("not valid JSON");
  if (!root.is_object()) {
    return absl::InvalidArgumentError("not a JSON object (an ExpertLoadWindow is expected)");
  }
  RecordedWindow out;
  if (const Json* id = Member(root, "replica_id", "replicaId")) {
    if (!id->is_string()) return absl::InvalidArgumentError("replica_id is not a string");
    out.replica = id->get<std::string>();
  }
  const Json* window = Member(root, "window", "window");
  if (window == nullptr || !window->is_object()) {
    return absl::InvalidArgumentError("no \"window\" object (an ExpertLoadWindow is expected)");
  }
  int64_t dims[2] = {0, 0};
  const char* names[2][2] = {{"num_layers", "numLayers"}, {"num_experts", "numExperts"}};
  for (int i = 0; i < 2; ++i) {
    const Json* v = Member(*window, names[i][0], names[i][1]);
    if (v == nullptr)
      return absl::InvalidArgumentError(absl::StrCat("window has no ", names[i][0]));
    absl::StatusOr<int64_t> n = JsonInt(*v);
    if (!n.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(names[i][0], ": ", n.status().message()));
    }
    if (*n < 1 || *n > 65536) {
      return absl::InvalidArgumentError(
          absl::StrCat(names[i][0], " is ", *n, "; expected 1 to 65536"));
    }
    dims[i] = *n;
  }
  out.num_layers = static_cast<int>(dims[0]);
  out.num_experts = static_cast<int>(dims[1]);
  const Json* counts = Member(*window, "counts", "counts");
  if (counts == nullptr || !counts->is_array()) {
    return absl::InvalidArgumentError("window has no \"counts\" array");
  }
  const size_t want = static_cast<size_t>(dims[0] * dims[1]);
  if (counts->size() != want) {
    return absl::InvalidArgumentError(absl::StrCat("counts has ", counts->size(), " entries; ",
                                                   dims[0], " layers x ", dims[1], " experts need ",
                                                   want));
  }
  out.counts.reserve(want);
  for (size_t i = 0; i < want; ++i) {
    absl::StatusOr<int64_t> c = JsonInt((*counts)[i]);
    if (!c.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("counts[", i, "]: ", c.status().message()));
    }
    if (*c < 0) {
      return absl::InvalidArgumentError(absl::StrCat("counts[", i, "] is negative (", *c, ")"));
    }
    out.counts.push_back(*c);
  }
  return out;
}

// Draws from std::mt19937_64 with this file's own arithmetic: the standard distributions may
// differ between standard libraries, these do not.
class Rng {
 public:
  explicit Rng(uint64_t seed) : engine_(seed) {}
  // Uniform in [0, 1), 53 bits.
  double Uniform() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }
  // Uniform in [0, n), n >= 1, unbiased.
  uint64_t Below(uint64_t n) {
    const uint64_t limit =
        std::numeric_limits<uint64_t>::max() - std::numeric_limits<uint64_t>::max() % n;
    uint64_t x = engine_();
    while (x >= limit) x = engine_();
    return x % n;
  }
  // A uniformly random permutation of 0..n-1 (Fisher-Yates).
  std::vector<int> Permutation(int n) {
    std::vector<int> p(n);
    for (int i = 0; i < n; ++i) p[i] = i;
    for (int i = n - 1; i > 0; --i) {
      std::swap(p[i], p[static_cast<int>(Below(static_cast<uint64_t>(i) + 1))]);
    }
    return p;
  }

 private:
  std::mt19937_64 engine_;
};

// Zipf weights over a permutation: expert perm[i] weighs 1 / (i + 1)^s.
std::vector<double> ZipfWeights(const std::vector<int>& perm, double s) {
  std::vector<double> w(perm.size());
  for (size_t i = 0; i < perm.size(); ++i) w[perm[i]] = std::pow(static_cast<double>(i + 1), -s);
  return w;
}

// `hot` experts share `share` of the weight, the others the rest evenly.
std::vector<double> HotWeights(int num_experts, const std::vector<int>& hot, double share) {
  const double hot_each = share / static_cast<double>(hot.size());
  const double cold_each = (1.0 - share) / static_cast<double>(num_experts - hot.size());
  std::vector<double> w(num_experts, cold_each);
  for (int e : hot) w[e] = hot_each;
  return w;
}

std::vector<int> RandomHotSet(Rng& rng, int num_experts, int count) {
  std::vector<int> perm = rng.Permutation(num_experts);
  perm.resize(count);
  return perm;
}

// Adds one layer's window to `counts` ([num_experts]): each token draws `top_k` distinct
// experts in turn, each proportional to the weights of those it has not drawn. A draw from all
// the weights that hits an expert already drawn is repeated (the same distribution, exactly);
// after 64 misses in a row the draw is made over the remaining experts directly.
void SampleLayer(const std::vector<double>& weights, int top_k, int64_t tokens, Rng& rng,
                 int64_t* counts) {
  const int n = static_cast<int>(weights.size());
  std::vector<double> cdf(n);
  double total = 0;
  for (int e = 0; e < n; ++e) cdf[e] = total += weights[e];
  std::vector<int> chosen(top_k);
  std::vector<char> taken(n, 0);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int k = 0; k < top_k; ++k) {
      int pick = -1;
      for (int miss = 0; miss < 64 && pick < 0; ++miss) {
        const double u = rng.Uniform() * total;
        int e = static_cast<int>(std::upper_bound(cdf.begin(), cdf.end(), u) - cdf.begin());
        e = std::min(e, n - 1);
        if (!taken[e] && weights[e] > 0) pick = e;
      }
      if (pick < 0) {
        double remaining = 0;
        for (int e = 0; e < n; ++e) remaining += taken[e] ? 0.0 : weights[e];
        const double u = rng.Uniform() * remaining;
        double acc = 0;
        for (int e = 0; e < n && pick < 0; ++e) {
          if (taken[e]) continue;
          acc += weights[e];
          if (u < acc) pick = e;
        }
        for (int e = n - 1; e >= 0 && pick < 0; --e) {
          if (!taken[e]) pick = e;
        }
      }
      taken[pick] = 1;
      chosen[k] = pick;
      ++counts[pick];
    }
    for (int k = 0; k < top_k; ++k) taken[chosen[k]] = 0;
  }
}

std::string Percent(double share) { return absl::StrFormat("%g%%", 100.0 * share); }

std::string SyntheticName(const SyntheticParams& p) {
  std::string detail;
  switch (p.kind) {
    case SyntheticKind::kZipf:
      detail = absl::StrFormat("s=%g", p.zipf_s);
      break;
    case SyntheticKind::kHotExpert:
      detail = absl::StrCat(p.hot_experts, " hot ", Percent(p.hot_share));
      break;
    case SyntheticKind::kHotRank:
      detail = absl::StrCat("1/", p.hot_rank_blocks, " hot ", Percent(p.hot_share));
      break;
    case SyntheticKind::kRotating:
      detail =
          absl::StrCat(p.hot_experts, " hot ", Percent(p.hot_share), " every ", p.rotate_every);
      break;
    case SyntheticKind::kBurst:
      detail = absl::StrFormat("p=%g s=%g", p.burst_probability, p.burst_s);
      break;
  }
  return absl::StrCat(SyntheticKindName(p.kind), " ", detail, ", ", p.tokens_per_window, " tok");
}

}  // namespace

absl::StatusOr<Trace> ReadRecordedTrace(std::istream& in, absl::string_view source,
                                        absl::string_view replica) {
  Trace trace;
  std::vector<std::string> seen;
  std::string line;
  int64_t line_no = 0;
  int64_t first_line = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    absl::StatusOr<RecordedWindow> w = ParseWindowLine(line);
    if (!w.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ":", line_no, ": ", w.status().message()));
    }
    if (std::find(seen.begin(), seen.end(), w->replica) == seen.end()) seen.push_back(w->replica);
    if (!replica.empty() && w->replica != replica) continue;
    if (trace.windows.empty()) {
      trace.num_layers = w->num_layers;
      trace.num_experts = w->num_experts;
      first_line = line_no;
    } else if (w->num_layers != trace.num_layers || w->num_experts != trace.num_experts) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ":", line_no, ": window of ", w->num_layers, " layers x ",
                       w->num_experts, " experts, but line ", first_line, " had ", trace.num_layers,
                       " x ", trace.num_experts, "; pick one replica's windows with --replica"));
    }
    trace.windows.push_back(std::move(w->counts));
  }
  if (in.bad()) return absl::DataLossError(absl::StrCat("cannot read ", source));
  if (trace.windows.empty()) {
    if (replica.empty()) {
      return absl::NotFoundError(absl::StrCat(source, " holds no expert-load window"));
    }
    for (std::string& s : seen) s = absl::StrCat("\"", s, "\"");
    return absl::NotFoundError(
        absl::StrCat(source, " holds no window of replica \"", replica,
                     "\"; replicas seen: ", seen.empty() ? "none" : absl::StrJoin(seen, ", ")));
  }
  return trace;
}

absl::StatusOr<Trace> ReadRecordedTraceFile(const std::string& path, absl::string_view replica) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open trace file ", path));
  absl::StatusOr<Trace> trace = ReadRecordedTrace(in, path, replica);
  if (!trace.ok()) return trace.status();
  trace->name = std::filesystem::path(path).filename().string();
  if (!replica.empty()) absl::StrAppend(&trace->name, " (", replica, ")");
  return trace;
}

absl::StatusOr<SyntheticKind> ParseSyntheticKind(absl::string_view name) {
  for (SyntheticKind k : {SyntheticKind::kZipf, SyntheticKind::kHotExpert, SyntheticKind::kHotRank,
                          SyntheticKind::kRotating, SyntheticKind::kBurst}) {
    if (name == SyntheticKindName(k)) return k;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown synthetic trace \"", name,
                   "\"; expected zipf, hot-expert, hot-rank, rotating or "
                   "burst"));
}

const char* SyntheticKindName(SyntheticKind kind) {
  switch (kind) {
    case SyntheticKind::kZipf:
      return "zipf";
    case SyntheticKind::kHotExpert:
      return "hot-expert";
    case SyntheticKind::kHotRank:
      return "hot-rank";
    case SyntheticKind::kRotating:
      return "rotating";
    case SyntheticKind::kBurst:
      return "burst";
  }
  return "?";
}

absl::Status CheckSyntheticParams(const SyntheticParams& p) {
  auto bad = [](const char* flag, const std::string& got, const char* allowed) {
    return absl::InvalidArgumentError(absl::StrCat(flag, " is ", got, "; ", allowed));
  };
  if (p.num_layers < 1 || p.num_layers > 4096) {
    return bad("--layers", absl::StrCat(p.num_layers), "expected 1 to 4096");
  }
  if (p.num_experts < 2 || p.num_experts > 65536) {
    return bad("--experts", absl::StrCat(p.num_experts), "expected 2 to 65536");
  }
  if (p.top_k < 1 || p.top_k > p.num_experts) {
    return bad("--top-k", absl::StrCat(p.top_k), "expected 1 to the number of experts");
  }
  if (p.tokens_per_window < 1 || p.tokens_per_window > (int64_t{1} << 24)) {
    return bad("--tokens-per-window", absl::StrCat(p.tokens_per_window), "expected 1 to 16777216");
  }
  if (p.num_windows < 1 || p.num_windows > 100000) {
    return bad("--windows", absl::StrCat(p.num_windows), "expected 1 to 100000");
  }
  if (!(p.zipf_s >= 0 && p.zipf_s <= 10)) {
    return bad("--zipf-s", absl::StrCat(p.zipf_s), "expected 0 to 10");
  }
  if (p.hot_experts < 1 || p.hot_experts >= p.num_experts) {
    return bad("--hot-experts", absl::StrCat(p.hot_experts),
               "expected 1 to one less than the number of experts");
  }
  if (!(p.hot_share >= 0 && p.hot_share < 1)) {
    return bad("--hot-share", absl::StrCat(p.hot_share), "expected a fraction in [0, 1)");
  }
  if (p.hot_rank_blocks < 2 || p.hot_rank_blocks > p.num_experts) {
    return bad("--hot-rank-blocks", absl::StrCat(p.hot_rank_blocks),
               "expected 2 to the number of experts");
  }
  if (p.rotate_every < 1) {
    return bad("--rotate-every", absl::StrCat(p.rotate_every), "expected at least 1 window");
  }
  if (!(p.burst_probability >= 0 && p.burst_probability <= 1)) {
    return bad("--burst-probability", absl::StrCat(p.burst_probability),
               "expected a fraction in [0, 1]");
  }
  if (!(p.burst_s >= 0 && p.burst_s <= 10)) {
    return bad("--burst-s", absl::StrCat(p.burst_s), "expected 0 to 10");
  }
  return absl::OkStatus();
}

absl::StatusOr<Trace> SyntheticTrace(const SyntheticParams& p) {
  if (absl::Status s = CheckSyntheticParams(p); !s.ok()) return s;
  const int layers = p.num_layers, experts = p.num_experts;
  Trace trace;
  trace.name = SyntheticName(p);
  trace.num_layers = layers;
  trace.num_experts = experts;
  trace.top_k = p.top_k;
  Rng rng(p.seed);
  // Each layer's current weights.
  std::vector<std::vector<double>> weights(layers);
  const std::vector<double> uniform(experts, 1.0);
  switch (p.kind) {
    case SyntheticKind::kZipf:
      for (auto& w : weights) w = ZipfWeights(rng.Permutation(experts), p.zipf_s);
      break;
    case SyntheticKind::kHotExpert:
      for (auto& w : weights) {
        w = HotWeights(experts, RandomHotSet(rng, experts, p.hot_experts), p.hot_share);
      }
      break;
    case SyntheticKind::kHotRank:
      for (auto& w : weights) {
        const int64_t b = static_cast<int64_t>(rng.Below(p.hot_rank_blocks));
        std::vector<int> hot;
        for (int64_t e = b * experts / p.hot_rank_blocks; e < (b + 1) * experts / p.hot_rank_blocks;
             ++e) {
          hot.push_back(static_cast<int>(e));
        }
        w = HotWeights(experts, hot, p.hot_share);
      }
      break;
    case SyntheticKind::kRotating:
    case SyntheticKind::kBurst:
      break;  // per window below
  }
  trace.windows.assign(p.num_windows, std::vector<int64_t>(static_cast<size_t>(layers) * experts));
  for (int w = 0; w < p.num_windows; ++w) {
    if (p.kind == SyntheticKind::kRotating && w % p.rotate_every == 0) {
      for (auto& lw : weights) {
        lw = HotWeights(experts, RandomHotSet(rng, experts, p.hot_experts), p.hot_share);
      }
    }
    if (p.kind == SyntheticKind::kBurst) {
      const bool burst = rng.Uniform() < p.burst_probability;
      for (auto& lw : weights)
        lw = burst ? ZipfWeights(rng.Permutation(experts), p.burst_s) : uniform;
    }
    for (int l = 0; l < layers; ++l) {
      SampleLayer(weights[l], p.top_k, p.tokens_per_window, rng,
                  trace.windows[w].data() + static_cast<size_t>(l) * experts);
    }
  }
  return trace;
}

}  // namespace gemma::eplb
