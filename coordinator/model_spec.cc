#include "coordinator/model_spec.h"

#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/json_util.h"
#include "nlohmann/json.hpp"
#include "yaml-cpp/yaml.h"

namespace gemma::coordinator {
namespace {

using json = nlohmann::json;

absl::Status Bad(const std::string& where, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("--models: ", where, ": ", what));
}

absl::Status OnlyKeys(const json& object, const std::string& where,
                      const std::set<std::string>& allowed) {
  if (!object.is_object()) return Bad(where, "expected an object");
  for (const auto& [key, value] : object.items()) {
    if (!allowed.count(key)) {
      std::string names;
      for (const std::string& a : allowed) absl::StrAppend(&names, names.empty() ? "" : ", ", a);
      return Bad(absl::StrCat(where, ".", key), absl::StrCat("unknown field (known: ", names, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status ReadInt(const json& object, const std::string& where, const char* key, int low,
                     int high, int* out) {
  if (!object.contains(key)) return absl::OkStatus();
  const json& v = object[key];
  if (!v.is_number_integer() || v.get<int64_t>() < low || v.get<int64_t>() > high) {
    return Bad(absl::StrCat(where, ".", key),
               absl::StrCat("expected an integer in [", low, ", ", high, "], got ", v.dump()));
  }
  *out = v.get<int>();
  return absl::OkStatus();
}

absl::Status ReadString(const json& object, const std::string& where, const char* key,
                        bool required, std::string* out) {
  if (!object.contains(key)) {
    return required ? Bad(absl::StrCat(where, ".", key), "required") : absl::OkStatus();
  }
  const json& v = object[key];
  if (!v.is_string() || v.get<std::string>().empty()) {
    return Bad(absl::StrCat(where, ".", key),
               absl::StrCat("expected a non-empty string, got ", v.dump()));
  }
  *out = v.get<std::string>();
  return absl::OkStatus();
}


// A YAML node as JSON: maps, sequences, and scalars typed as YAML 1.2's core schema reads
// plain scalars (integers, floats, true/false, null); quoted scalars stay strings.
absl::StatusOr<json> YamlToJson(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Null:
    case YAML::NodeType::Undefined:
      return json(nullptr);
    case YAML::NodeType::Sequence: {
      json out = json::array();
      for (const YAML::Node& item : node) {
        absl::StatusOr<json> v = YamlToJson(item);
        if (!v.ok()) return v.status();
        out.push_back(*std::move(v));
      }
      return out;
    }
    case YAML::NodeType::Map: {
      json out = json::object();
      for (const auto& entry : node) {
        if (!entry.first.IsScalar()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "--models: line ", entry.first.Mark().line + 1, ": a key must be a plain name"));
        }
        absl::StatusOr<json> v = YamlToJson(entry.second);
        if (!v.ok()) return v.status();
        out[entry.first.Scalar()] = *std::move(v);
      }
      return out;
    }
    case YAML::NodeType::Scalar: {
      const std::string& text = node.Scalar();
      if (node.Tag() == "!") return json(text);  // quoted
      int64_t integer = 0;
      if (!text.empty() && text.find_first_not_of("+-0123456789") == std::string::npos &&
          YAML::convert<int64_t>::decode(node, integer)) {
        return json(integer);
      }
      if (text == "true" || text == "True" || text == "TRUE") return json(true);
      if (text == "false" || text == "False" || text == "FALSE") return json(false);
      if (text == "~" || text == "null" || text == "Null" || text == "NULL") return json(nullptr);
      double number = 0;
      if (text.find_first_not_of("+-0123456789.eE") == std::string::npos &&
          YAML::convert<double>::decode(node, number)) {
        return json(number);
      }
      return json(text);
    }
  }
  return json(nullptr);
}

absl::StatusOr<std::vector<ModelSpec>> SpecsFromJson(json root);

}  // namespace

absl::StatusOr<std::vector<ModelSpec>> ParseModelSpecs(absl::string_view text) {
  absl::StatusOr<json> parsed = ParseJson(text, "--models: the file");
  if (!parsed.ok()) return parsed.status();
  return SpecsFromJson(*std::move(parsed));
}

absl::StatusOr<std::vector<ModelSpec>> ParseModelSpecsYaml(absl::string_view text) {
  YAML::Node root;
  try {
    root = YAML::Load(std::string(text));
  } catch (const YAML::Exception& error) {
    return absl::InvalidArgumentError(absl::StrCat("--models: the file is not YAML: line ",
                                                   error.mark.line + 1, ", column ",
                                                   error.mark.column + 1, ": ", error.msg));
  }
  if (root.IsNull() || !root.IsDefined()) {
    return absl::InvalidArgumentError("--models: the file is empty; it needs a \"models\" list");
  }
  absl::StatusOr<json> converted = YamlToJson(root);
  if (!converted.ok()) return converted.status();
  return SpecsFromJson(*std::move(converted));
}

namespace {

absl::StatusOr<std::vector<ModelSpec>> SpecsFromJson(json root) {
  if (absl::Status s = OnlyKeys(root, "(top)", {"models"}); !s.ok()) return s;
  if (!root.contains("models") || !root["models"].is_array() || root["models"].empty()) {
    return Bad("models", "expected a non-empty list of models");
  }
  std::vector<ModelSpec> specs;
  std::set<std::string> names;
  for (size_t i = 0; i < root["models"].size(); ++i) {
    const json& m = root["models"][i];
    const std::string where = absl::StrCat("models[", i, "]");
    if (absl::Status s = OnlyKeys(m, where, {"name", "path", "layout", "replicas"}); !s.ok()) {
      return s;
    }
    ModelSpec spec;
    if (absl::Status s = ReadString(m, where, "name", true, &spec.name); !s.ok()) return s;
    if (spec.name.find_first_of(" \t/") != std::string::npos) {
      return Bad(where + ".name", absl::StrCat("\"", spec.name, "\" must not contain spaces or '/'"));
    }
    if (!names.insert(spec.name).second) {
      return Bad(where + ".name", absl::StrCat("\"", spec.name, "\" is named twice"));
    }
    if (absl::Status s = ReadString(m, where, "path", true, &spec.path); !s.ok()) return s;
    if (m.contains("layout")) {
      const json& l = m["layout"];
      const std::string lw = where + ".layout";
      if (absl::Status s = OnlyKeys(l, lw, {"mode", "ranks", "nodes", "tp", "redundant_experts"});
          !s.ok()) {
        return s;
      }
      if (absl::Status s = ReadString(l, lw, "mode", false, &spec.layout.mode); !s.ok()) return s;
      if (spec.layout.mode != "tp" && spec.layout.mode != "dp-ep") {
        return Bad(lw + ".mode", absl::StrCat("\"", spec.layout.mode, "\" is not tp or dp-ep"));
      }
      if (absl::Status s = ReadInt(l, lw, "ranks", 1, 4096, &spec.layout.ranks); !s.ok()) return s;
      if (absl::Status s = ReadInt(l, lw, "nodes", 1, 1024, &spec.layout.nodes); !s.ok()) return s;
      if (absl::Status s = ReadInt(l, lw, "tp", 0, 4096, &spec.layout.tp); !s.ok()) return s;
      if (absl::Status s = ReadInt(l, lw, "redundant_experts", 0, 1 << 20,
                                   &spec.layout.redundant_experts);
          !s.ok()) {
        return s;
      }
      const int world = spec.layout.ranks * spec.layout.nodes;
      if (spec.layout.mode == "dp-ep" && spec.layout.tp > 0 && world % spec.layout.tp != 0) {
        return Bad(lw + ".tp", absl::StrCat(spec.layout.tp, " does not divide the replica's ",
                                            world, " ranks (ranks x nodes)"));
      }
      if (spec.layout.mode == "tp" && spec.layout.tp > 0 && spec.layout.tp != world) {
        return Bad(lw + ".tp", "in tp mode tp is the replica's ranks; leave it out");
      }
    }
    if (m.contains("replicas")) {
      const json& r = m["replicas"];
      const std::string rw = where + ".replicas";
      if (absl::Status s = OnlyKeys(r, rw, {"min", "max"}); !s.ok()) return s;
      if (absl::Status s = ReadInt(r, rw, "min", 0, 100000, &spec.min_replicas); !s.ok()) return s;
      spec.max_replicas = std::max(1, spec.min_replicas);
      if (absl::Status s = ReadInt(r, rw, "max", 0, 100000, &spec.max_replicas); !s.ok()) return s;
      if (spec.max_replicas < spec.min_replicas) {
        return Bad(rw, absl::StrCat("max ", spec.max_replicas, " is below min ",
                                    spec.min_replicas));
      }
    }
    specs.push_back(std::move(spec));
  }
  return specs;
}

}  // namespace

absl::StatusOr<std::vector<ModelSpec>> ReadModelSpecs(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("--models ", path, ": cannot read the file"));
  std::stringstream text;
  text << in.rdbuf();
  const bool yaml = absl::EndsWith(path, ".yaml") || absl::EndsWith(path, ".yml");
  absl::StatusOr<std::vector<ModelSpec>> specs =
      yaml ? ParseModelSpecsYaml(text.str()) : ParseModelSpecs(text.str());
  if (!specs.ok()) {
    return absl::Status(specs.status().code(),
                        absl::StrCat(path, ": ", specs.status().message()));
  }
  return specs;
}

std::string DescribeLayout(const ModelLayout& l) {
  std::string out = absl::StrCat(l.mode, " ranks=", l.ranks);
  if (l.nodes > 1) absl::StrAppend(&out, " nodes=", l.nodes);
  if (l.mode == "dp-ep") absl::StrAppend(&out, " tp=", l.tp > 0 ? l.tp : l.ranks * l.nodes);
  if (l.redundant_experts > 0) absl::StrAppend(&out, " redundant=", l.redundant_experts);
  return out;
}

}  // namespace gemma::coordinator
