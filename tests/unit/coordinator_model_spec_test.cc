// The models spec (coordinator/model_spec.h) in JSON and YAML: the same spec gives the same
// models either way, and a bad one is refused naming the field, or the YAML line.
#include "coordinator/model_spec.h"

#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "gtest/gtest.h"

namespace gemma::coordinator {
namespace {

std::string Describe(const std::vector<ModelSpec>& specs) {
  std::string out;
  for (const ModelSpec& s : specs) {
    out += s.name + " " + s.path + " " + DescribeLayout(s.layout) + " " +
           std::to_string(s.min_replicas) + ".." + std::to_string(s.max_replicas) + "\n";
  }
  return out;
}

TEST(ModelSpecTest, YamlAndJsonGiveTheSameModels) {
  const std::string json = R"({"models": [
    {"name": "gemma-4-31b", "path": "/models/31b", "layout": {"mode": "tp", "ranks": 8, "nodes": 2},
     "replicas": {"min": 1, "max": 2}},
    {"name": "gemma-4-26b-a4b", "path": "/models/26b",
     "layout": {"mode": "dp-ep", "ranks": 8, "tp": 1, "redundant_experts": 32},
     "replicas": {"min": 0, "max": 4}}]})";
  const std::string yaml = R"(# the two models of the cluster
models:
  - name: gemma-4-31b
    path: /models/31b
    layout: {mode: tp, ranks: 8, nodes: 2}
    replicas: {min: 1, max: 2}
  - name: gemma-4-26b-a4b
    path: "/models/26b"
    layout:
      mode: dp-ep
      ranks: 8
      tp: 1
      redundant_experts: 32
    replicas:
      min: 0
      max: 4
)";
  absl::StatusOr<std::vector<ModelSpec>> from_json = ParseModelSpecs(json);
  absl::StatusOr<std::vector<ModelSpec>> from_yaml = ParseModelSpecsYaml(yaml);
  ASSERT_TRUE(from_json.ok()) << from_json.status();
  ASSERT_TRUE(from_yaml.ok()) << from_yaml.status();
  EXPECT_EQ(Describe(*from_yaml), Describe(*from_json));
  EXPECT_EQ(Describe(*from_yaml),
            "gemma-4-31b /models/31b tp ranks=8 nodes=2 1..2\n"
            "gemma-4-26b-a4b /models/26b dp-ep ranks=8 tp=1 redundant=32 0..4\n");
}

TEST(ModelSpecTest, YamlErrorsNameTheFieldOrTheLine) {
  struct Case {
    std::string yaml;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"models:\n  - name: a\n    path: /x\n    layout: {mode: tp, rank: 2}\n",
       "models[0].layout.rank: unknown field"},
      // A quoted number is a string, not a count.
      {"models:\n  - name: a\n    path: /x\n    layout: {ranks: \"2\"}\n",
       "models[0].layout.ranks: expected an integer in [1, 4096], got \"2\""},
      {"models:\n  - name: a\n    path: /x\n    replicas: {min: 3, max: 1}\n",
       "models[0].replicas: max 1 is below min 3"},
      {"models:\n  - name: a\n  path: /x\n", "the file is not YAML: line 3"},
      {"models: [\n", "the file is not YAML: line"},
      {"", "the file is empty; it needs a \"models\" list"},
      {"models: []\n", "models: expected a non-empty list of models"},
      {"models:\n  - name: a\n", "models[0].path: required"},
      {"models:\n  - name: a\n    path: /x\n    layout: {mode: dp-ep, ranks: 2, nodes: 2, tp: 3}\n",
       "models[0].layout.tp: 3 does not divide the replica's 4 ranks (ranks x nodes)"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<std::vector<ModelSpec>> specs = ParseModelSpecsYaml(c.yaml);
    ASSERT_FALSE(specs.ok()) << c.yaml;
    EXPECT_EQ(specs.status().code(), absl::StatusCode::kInvalidArgument) << c.yaml;
    EXPECT_TRUE(absl::StrContains(specs.status().message(), c.message))
        << c.yaml << "\n" << specs.status();
  }
}

}  // namespace
}  // namespace gemma::coordinator
