#include "eplb/placement.h"

#include <algorithm>
#include <cstring>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace gemma::eplb {
namespace {

Placement Empty(int num_layers, int num_experts, int num_ranks, int redundant) {
  Placement p;
  p.num_layers = num_layers;
  p.num_experts = num_experts;
  p.num_ranks = num_ranks;
  p.slots_per_rank = (num_experts + redundant) / num_ranks;
  p.slots.assign(static_cast<size_t>(num_layers) * num_ranks * p.slots_per_rank, -1);
  return p;
}

int32_t* LayerSlots(Placement& p, int layer) {
  return p.slots.data() + static_cast<size_t>(layer) * p.num_ranks * p.slots_per_rank;
}

// Fills layer `layer`'s slots: rank r gets `first[r]` in its first slots, then the spare slots
// take experts dealt in id order from `cursor`, skipping experts the rank already holds.
void FillWithSpares(Placement& p, int layer, const std::vector<std::vector<int32_t>>& first) {
  const int n = p.num_ranks, spr = p.slots_per_rank, e_count = p.num_experts;
  int32_t* slots = LayerSlots(p, layer);
  std::vector<std::vector<char>> held(n, std::vector<char>(e_count, 0));
  std::vector<int> used(n, 0);
  for (int r = 0; r < n; ++r) {
    for (int32_t e : first[r]) {
      slots[r * spr + used[r]++] = e;
      held[r][e] = 1;
    }
  }
  int cursor = 0;
  for (bool more = true; more;) {
    more = false;
    for (int r = 0; r < n; ++r) {
      if (used[r] == spr) continue;
      for (int tries = 0; tries < e_count; ++tries) {
        const int e = (cursor + tries) % e_count;
        if (held[r][e]) continue;
        slots[r * spr + used[r]++] = e;
        held[r][e] = 1;
        cursor = (e + 1) % e_count;
        break;
      }
      more = more || used[r] < spr;
    }
  }
}

void PutU64(std::string& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void PutI32(std::string& out, int32_t v) {
  const uint32_t u = static_cast<uint32_t>(v);
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((u >> (8 * i)) & 0xff));
}
uint64_t GetU(absl::string_view bytes, size_t at, int width) {
  uint64_t v = 0;
  for (int i = 0; i < width; ++i) {
    v |= static_cast<uint64_t>(static_cast<uint8_t>(bytes[at + i])) << (8 * i);
  }
  return v;
}

}  // namespace

absl::Status CheckShape(int num_layers, int num_experts, int num_ranks, int redundant) {
  if (num_layers < 0 || num_experts < 1 || num_ranks < 1 || redundant < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "expert placement needs at least one expert and one rank and no negative counts; got ",
        num_layers, " layers, ", num_experts, " experts, ", num_ranks, " ranks, ", redundant,
        " redundant experts"));
  }
  if ((num_experts + redundant) % num_ranks != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        num_experts, " experts plus ", redundant, " redundant copies do not divide over ",
        num_ranks, " ranks: every rank holds the same number of slots, so choose a redundant "
        "count that makes experts + redundant a multiple of ", num_ranks));
  }
  if (num_experts + redundant < num_ranks) {
    return absl::InvalidArgumentError(absl::StrCat(num_experts, " experts plus ", redundant,
                                                   " redundant copies leave some of the ",
                                                   num_ranks, " ranks without a slot"));
  }
  if (static_cast<int64_t>(num_experts) + redundant >
      static_cast<int64_t>(num_experts) * num_ranks) {
    return absl::InvalidArgumentError(absl::StrCat(
        redundant, " redundant copies over ", num_ranks, " ranks would put two copies of one "
        "expert on a rank: at most ", static_cast<int64_t>(num_experts) * (num_ranks - 1),
        " redundant copies"));
  }
  return absl::OkStatus();
}

absl::Status Validate(const Placement& p) {
  if (absl::Status s = CheckShape(p.num_layers, p.num_experts, p.num_ranks, p.redundant());
      !s.ok()) {
    return s;
  }
  const size_t expected = static_cast<size_t>(p.num_layers) * p.num_ranks * p.slots_per_rank;
  if (p.slots.size() != expected) {
    return absl::InvalidArgumentError(absl::StrCat("expert placement has ", p.slots.size(),
                                                   " slots; ", p.num_layers, " layers x ",
                                                   p.num_ranks, " ranks x ", p.slots_per_rank,
                                                   " slots need ", expected));
  }
  for (int l = 0; l < p.num_layers; ++l) {
    std::vector<int> copies(p.num_experts, 0);
    for (int r = 0; r < p.num_ranks; ++r) {
      std::vector<char> on_rank(p.num_experts, 0);
      for (int32_t e : p.RankSlots(l, r)) {
        if (e < 0 || e >= p.num_experts) {
          return absl::InvalidArgumentError(absl::StrCat("expert placement: layer ", l, " rank ",
                                                         r, " holds expert ", e, ", outside [0, ",
                                                         p.num_experts, ")"));
        }
        if (on_rank[e]) {
          return absl::InvalidArgumentError(absl::StrCat(
              "expert placement: layer ", l, " rank ", r, " holds two copies of expert ", e));
        }
        on_rank[e] = 1;
        ++copies[e];
      }
    }
    for (int e = 0; e < p.num_experts; ++e) {
      if (copies[e] == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("expert placement: layer ", l, " has no copy of expert ", e));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Placement> StaticPlacement(int num_layers, int num_experts, int num_ranks,
                                          int redundant) {
  if (absl::Status s = CheckShape(num_layers, num_experts, num_ranks, redundant); !s.ok()) {
    return s;
  }
  Placement p = Empty(num_layers, num_experts, num_ranks, redundant);
  std::vector<std::vector<int32_t>> first(num_ranks);
  for (int r = 0; r < num_ranks; ++r) {
    const int begin = static_cast<int>(static_cast<int64_t>(r) * num_experts / num_ranks);
    const int end = static_cast<int>(static_cast<int64_t>(r + 1) * num_experts / num_ranks);
    for (int e = begin; e < end; ++e) first[r].push_back(e);
  }
  for (int l = 0; l < num_layers; ++l) FillWithSpares(p, l, first);
  return p;
}

absl::StatusOr<Placement> RoundRobinPlacement(int num_layers, int num_experts, int num_ranks,
                                              int redundant) {
  if (absl::Status s = CheckShape(num_layers, num_experts, num_ranks, redundant); !s.ok()) {
    return s;
  }
  Placement p = Empty(num_layers, num_experts, num_ranks, redundant);
  std::vector<std::vector<int32_t>> first(num_ranks);
  for (int e = 0; e < num_experts; ++e) first[e % num_ranks].push_back(e);
  for (int l = 0; l < num_layers; ++l) FillWithSpares(p, l, first);
  return p;
}

absl::StatusOr<Placement> BalancedPlacement(std::span<const int64_t> load, int num_layers,
                                            int num_experts, const Topology& topology,
                                            int redundant) {
  const int n = topology.num_ranks;
  if (absl::Status s = CheckShape(num_layers, num_experts, n, redundant); !s.ok()) return s;
  if (topology.ranks_per_node < 1 || n % topology.ranks_per_node != 0) {
    return absl::InvalidArgumentError(absl::StrCat(n, " ranks do not split into nodes of ",
                                                   topology.ranks_per_node, " ranks"));
  }
  if (load.size() != static_cast<size_t>(num_layers) * num_experts) {
    return absl::InvalidArgumentError(absl::StrCat("expert load has ", load.size(),
                                                   " counts; ", num_layers, " layers x ",
                                                   num_experts, " experts need ",
                                                   num_layers * num_experts));
  }
  for (int64_t v : load) {
    if (v < 0) return absl::InvalidArgumentError("expert load has a negative count");
  }
  absl::StatusOr<Placement> fallback = StaticPlacement(num_layers, num_experts, n, redundant);
  if (!fallback.ok()) return fallback.status();
  Placement p = *std::move(fallback);
  const int spr = p.slots_per_rank;
  const int rpn = topology.ranks_per_node;
  const int nodes = topology.num_nodes();

  for (int l = 0; l < num_layers; ++l) {
    const int64_t* w = load.data() + static_cast<size_t>(l) * num_experts;
    if (std::all_of(w, w + num_experts, [](int64_t v) { return v == 0; })) continue;
    // 1. Copies: each spare to the expert with the most load per copy.
    std::vector<int> copies(num_experts, 1);
    for (int i = 0; i < redundant; ++i) {
      int best = -1;
      for (int e = 0; e < num_experts; ++e) {
        if (copies[e] >= n) continue;
        // w[e] / copies[e] > w[best] / copies[best], without division.
        if (best < 0 || static_cast<__int128>(w[e]) * copies[best] >
                            static_cast<__int128>(w[best]) * copies[e]) {
          best = e;
        }
      }
      ++copies[best];
    }
    // 2. Items: one per copy, heaviest share first (then lower id).
    struct Item {
      int32_t expert;
      double share;
    };
    std::vector<Item> items;
    for (int e = 0; e < num_experts; ++e) {
      for (int c = 0; c < copies[e]; ++c) {
        items.push_back({e, static_cast<double>(w[e]) / copies[e]});
      }
    }
    std::stable_sort(items.begin(), items.end(),
                     [](const Item& a, const Item& b) { return a.share > b.share; });
    // 3. Nodes: least loaded with room, preferring one without a copy of the expert; never more
    // copies of an expert on a node than it has ranks.
    std::vector<double> node_load(nodes, 0.0);
    std::vector<int> node_room(nodes, rpn * spr);
    std::vector<std::vector<int>> node_copies(nodes, std::vector<int>(num_experts, 0));
    std::vector<std::vector<Item>> node_items(nodes);
    for (const Item& it : items) {
      int best = -1;
      for (int k = 0; k < nodes; ++k) {
        if (node_room[k] == 0 || node_copies[k][it.expert] >= rpn) continue;
        if (best < 0) {
          best = k;
          continue;
        }
        const bool has_k = node_copies[k][it.expert] > 0, has_b = node_copies[best][it.expert] > 0;
        if (has_k != has_b ? !has_k : node_load[k] < node_load[best]) best = k;
      }
      if (best < 0) {
        return absl::InternalError(absl::StrCat("expert placement: no node has room for a copy of "
                                                "expert ", it.expert, " in layer ", l));
      }
      node_load[best] += it.share;
      --node_room[best];
      ++node_copies[best][it.expert];
      node_items[best].push_back(it);
    }
    // 4. Ranks inside each node: least loaded with room and without this expert.
    int32_t* slots = LayerSlots(p, l);
    for (int k = 0; k < nodes; ++k) {
      std::vector<double> rank_load(rpn, 0.0);
      std::vector<std::vector<int32_t>> held(rpn);
      auto holds = [&](int r, int32_t e) {
        return std::find(held[r].begin(), held[r].end(), e) != held[r].end();
      };
      for (const Item& it : node_items[k]) {
        int best = -1;
        for (int r = 0; r < rpn; ++r) {
          if (static_cast<int>(held[r].size()) == spr || holds(r, it.expert)) continue;
          if (best < 0 || rank_load[r] < rank_load[best]) best = r;
        }
        if (best < 0) {
          // Every rank with room already holds this expert: move another expert from a rank
          // without it to the rank with room, and put this copy in its place.
          int roomy = -1;
          for (int r = 0; r < rpn && roomy < 0; ++r) {
            if (static_cast<int>(held[r].size()) < spr) roomy = r;
          }
          for (int r = 0; r < rpn && best < 0; ++r) {
            if (r == roomy || holds(r, it.expert)) continue;
            for (size_t i = 0; i < held[r].size(); ++i) {
              const int32_t f = held[r][i];
              if (holds(roomy, f)) continue;
              const double f_share = static_cast<double>(w[f]) / copies[f];
              held[roomy].push_back(f);
              rank_load[roomy] += f_share;
              held[r].erase(held[r].begin() + static_cast<std::ptrdiff_t>(i));
              rank_load[r] -= f_share;
              best = r;
              break;
            }
          }
          if (best < 0) {
            return absl::InternalError(absl::StrCat("expert placement: cannot place a copy of "
                                                    "expert ", it.expert, " in layer ", l));
          }
        }
        held[best].push_back(it.expert);
        rank_load[best] += it.share;
      }
      for (int r = 0; r < rpn; ++r) {
        // Slots in expert order, so a rank's weights read the checkpoint in order.
        std::sort(held[r].begin(), held[r].end());
        const int global = k * rpn + r;
        std::copy(held[r].begin(), held[r].end(), slots + global * spr);
      }
    }
  }
  if (absl::Status s = Validate(p); !s.ok()) {
    return absl::InternalError(absl::StrCat("balanced placement is invalid: ", s.message()));
  }
  return p;
}

CopyTable::CopyTable(const Placement& p)
    : num_experts_(p.num_experts), slots_per_rank_(p.slots_per_rank) {
  const size_t cells = static_cast<size_t>(p.num_layers) * p.num_experts;
  std::vector<std::vector<int32_t>> lists(cells);
  contiguous_ = p.redundant() == 0 && p.num_experts % p.num_ranks == 0;
  for (int l = 0; l < p.num_layers; ++l) {
    for (int r = 0; r < p.num_ranks; ++r) {
      std::span<const int32_t> s = p.RankSlots(l, r);
      for (int i = 0; i < p.slots_per_rank; ++i) {
        lists[static_cast<size_t>(l) * p.num_experts + s[i]].push_back(r * p.slots_per_rank + i);
        if (s[i] != r * p.slots_per_rank + i) contiguous_ = false;
      }
    }
  }
  begin_.reserve(cells + 1);
  begin_.push_back(0);
  for (const auto& list : lists) {
    copies_.insert(copies_.end(), list.begin(), list.end());
    begin_.push_back(static_cast<int32_t>(copies_.size()));
  }
}

int32_t ChooseCopy(std::span<const int32_t> copies, int slots_per_rank, int source_rank,
                   const Topology& topology, int64_t nth) {
  if (copies.size() == 1) return copies[0];
  const int node = topology.NodeOf(source_rank);
  int on_node = 0;
  for (int32_t c : copies) {
    const int rank = c / slots_per_rank;
    if (rank == source_rank) return c;
    if (topology.NodeOf(rank) == node) ++on_node;
  }
  if (on_node > 0) {
    int64_t want = nth % on_node;
    for (int32_t c : copies) {
      if (topology.NodeOf(c / slots_per_rank) == node && want-- == 0) return c;
    }
  }
  return copies[static_cast<size_t>(nth % static_cast<int64_t>(copies.size()))];
}

std::vector<double> RankLoads(const Placement& p, int layer, std::span<const int64_t> load) {
  std::vector<int> copies(p.num_experts, 0);
  for (int r = 0; r < p.num_ranks; ++r) {
    for (int32_t e : p.RankSlots(layer, r)) ++copies[e];
  }
  std::vector<double> ranks(p.num_ranks, 0.0);
  for (int r = 0; r < p.num_ranks; ++r) {
    for (int32_t e : p.RankSlots(layer, r)) {
      ranks[r] += static_cast<double>(load[e]) / copies[e];
    }
  }
  return ranks;
}

double Balancedness(const Placement& p, std::span<const int64_t> load) {
  if (p.num_layers == 0) return 1.0;
  double sum = 0;
  for (int l = 0; l < p.num_layers; ++l) {
    const std::vector<double> ranks =
        RankLoads(p, l, load.subspan(static_cast<size_t>(l) * p.num_experts, p.num_experts));
    const double max = *std::max_element(ranks.begin(), ranks.end());
    const double total = std::accumulate(ranks.begin(), ranks.end(), 0.0);
    sum += max > 0 ? total / p.num_ranks / max : 1.0;
  }
  return sum / p.num_layers;
}

std::string SerializePlacement(const Placement& p) {
  std::string out;
  out.reserve(24 + 4 * p.slots.size());
  PutU64(out, p.epoch);
  PutI32(out, p.num_layers);
  PutI32(out, p.num_experts);
  PutI32(out, p.num_ranks);
  PutI32(out, p.slots_per_rank);
  for (int32_t s : p.slots) PutI32(out, s);
  return out;
}

absl::StatusOr<Placement> ParsePlacement(absl::string_view bytes) {
  if (bytes.size() < 24 || (bytes.size() - 24) % 4 != 0) {
    return absl::DataLossError(absl::StrCat("expert placement of ", bytes.size(),
                                            " bytes is truncated"));
  }
  Placement p;
  p.epoch = GetU(bytes, 0, 8);
  p.num_layers = static_cast<int32_t>(GetU(bytes, 8, 4));
  p.num_experts = static_cast<int32_t>(GetU(bytes, 12, 4));
  p.num_ranks = static_cast<int32_t>(GetU(bytes, 16, 4));
  p.slots_per_rank = static_cast<int32_t>(GetU(bytes, 20, 4));
  const size_t count = (bytes.size() - 24) / 4;
  p.slots.resize(count);
  for (size_t i = 0; i < count; ++i) p.slots[i] = static_cast<int32_t>(GetU(bytes, 24 + 4 * i, 4));
  if (p.num_layers < 0 || p.num_layers > 4096 || p.num_experts < 1 || p.num_experts > 65536 ||
      p.num_ranks < 1 || p.num_ranks > 65536 || p.slots_per_rank < 1 ||
      p.slots_per_rank > p.num_experts) {
    return absl::InvalidArgumentError(absl::StrCat(
        "expert placement sizes out of range: ", p.num_layers, " layers, ", p.num_experts,
        " experts, ", p.num_ranks, " ranks, ", p.slots_per_rank, " slots per rank"));
  }
  if (absl::Status s = Validate(p); !s.ok()) return s;
  return p;
}

}  // namespace gemma::eplb
