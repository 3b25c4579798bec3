#include "eplb/placement_json.h"

#include <cstdint>
#include <fstream>
#include <limits>
#include <sstream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/json_util.h"
#include "nlohmann/json.hpp"

namespace gemma::eplb {
namespace {

using Json = nlohmann::json;

constexpr char kWhat[] = "expert placement JSON";

absl::Status Bad(absl::string_view path, absl::string_view problem) {
  return absl::InvalidArgumentError(absl::StrCat(kWhat, ": ", path, ": ", problem));
}

// A non-negative count or id that fits an int32.
absl::StatusOr<int32_t> SmallInt(const Json& value, absl::string_view path) {
  if (!value.is_number_unsigned() ||
      value.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int32_t>::max())) {
    return Bad(path, absl::StrCat("expected a non-negative 32-bit integer, got ", value.dump()));
  }
  return static_cast<int32_t>(value.get<uint64_t>());
}

absl::StatusOr<int32_t> RequiredInt(const Json& root, const char* field) {
  auto it = root.find(field);
  if (it == root.end()) return Bad(field, "missing");
  return SmallInt(*it, field);
}

}  // namespace

std::string PlacementToJson(const Placement& p) {
  std::string out =
      absl::StrCat("{\n  \"epoch\": ", p.epoch, ",\n  \"num_experts\": ", p.num_experts,
                   ",\n  \"num_ranks\": ", p.num_ranks,
                   ",\n  \"slots_per_rank\": ", p.slots_per_rank, ",\n  \"layers\": [");
  for (int l = 0; l < p.num_layers; ++l) {
    absl::StrAppend(&out, l == 0 ? "\n" : ",\n", "    [");
    for (int r = 0; r < p.num_ranks; ++r) {
      absl::StrAppend(&out, r == 0 ? "\n" : ",\n", "      [",
                      absl::StrJoin(p.RankSlots(l, r), ", "), "]");
    }
    absl::StrAppend(&out, "\n    ]");
  }
  absl::StrAppend(&out, p.num_layers > 0 ? "\n  ]\n}\n" : "]\n}\n");
  return out;
}

absl::StatusOr<Placement> PlacementFromJson(absl::string_view json) {
  absl::StatusOr<Json> parsed = ParseJson(json, kWhat);
  if (!parsed.ok()) return parsed.status();
  const Json root = *std::move(parsed);
  if (!root.is_object()) return Bad("top level", "expected an object");
  for (const auto& [key, value] : root.items()) {
    if (key != "epoch" && key != "num_experts" && key != "num_ranks" && key != "slots_per_rank" &&
        key != "layers") {
      return Bad(key,
                 "unknown field (expected epoch, num_experts, num_ranks, slots_per_rank, "
                 "layers)");
    }
  }
  Placement p;
  if (auto it = root.find("epoch"); it != root.end()) {
    if (!it->is_number_unsigned()) {
      return Bad("epoch", absl::StrCat("expected a non-negative integer, got ", it->dump()));
    }
    p.epoch = it->get<uint64_t>();
  }
  absl::StatusOr<int32_t> v = RequiredInt(root, "num_experts");
  if (!v.ok()) return v.status();
  p.num_experts = *v;
  if (v = RequiredInt(root, "num_ranks"); !v.ok()) return v.status();
  p.num_ranks = *v;
  if (v = RequiredInt(root, "slots_per_rank"); !v.ok()) return v.status();
  p.slots_per_rank = *v;
  auto layers = root.find("layers");
  if (layers == root.end()) return Bad("layers", "missing");
  if (!layers->is_array()) return Bad("layers", "expected an array of layers");
  p.num_layers = static_cast<int>(layers->size());
  for (int l = 0; l < p.num_layers; ++l) {
    const Json& layer = (*layers)[l];
    const std::string layer_path = absl::StrCat("layers[", l, "]");
    if (!layer.is_array() || static_cast<int64_t>(layer.size()) != p.num_ranks) {
      return Bad(layer_path, absl::StrCat("expected an array of num_ranks = ", p.num_ranks,
                                          " ranks' slots, got ", layer.dump()));
    }
    for (int r = 0; r < p.num_ranks; ++r) {
      const Json& rank = layer[r];
      const std::string rank_path = absl::StrCat(layer_path, "[", r, "]");
      if (!rank.is_array() || static_cast<int64_t>(rank.size()) != p.slots_per_rank) {
        return Bad(rank_path, absl::StrCat("expected an array of slots_per_rank = ",
                                           p.slots_per_rank, " expert ids, got ", rank.dump()));
      }
      for (int s = 0; s < p.slots_per_rank; ++s) {
        absl::StatusOr<int32_t> expert = SmallInt(rank[s], absl::StrCat(rank_path, "[", s, "]"));
        if (!expert.ok()) return expert.status();
        p.slots.push_back(*expert);
      }
    }
  }
  if (absl::Status s = Validate(p); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(kWhat, ": ", s.message()));
  }
  return p;
}

absl::StatusOr<Placement> ReadPlacementFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open expert placement file ", path));
  std::ostringstream text;
  text << in.rdbuf();
  absl::StatusOr<Placement> p = PlacementFromJson(text.str());
  if (!p.ok()) {
    return absl::Status(p.status().code(), absl::StrCat(path, ": ", p.status().message()));
  }
  return p;
}

}  // namespace gemma::eplb
