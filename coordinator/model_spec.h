// The models a coordinator serves (--models FILE, JSON or YAML): per model its served name, the
// checkpoint path as the workers see it, the layout of one replica on one worker, and how many
// replicas it wants. Knows no registry; the registry routes by these names and assigns free
// workers from them.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace gemma::coordinator {

struct ModelLayout {
  std::string mode = "tp";    // "tp" or "dp-ep"
  int ranks = 1;              // rank processes on each worker of a replica (--cpu-ranks/--gpus)
  int nodes = 1;              // workers that together form one replica (ranks x nodes ranks)
  int tp = 0;                 // dp-ep: ranks per data-parallel group (0: all of them)
  int redundant_experts = 0;  // spare expert slots (MoE)
};

struct ModelSpec {
  std::string name;  // what requests name ("gemma-4-26b-a4b")
  std::string path;  // the checkpoint directory on the workers
  ModelLayout layout;
  int min_replicas = 0;  // free workers go to models below this first
  int max_replicas = 1;  // never more replicas assigned than this
};

// {"models": [{"name": "...", "path": "...", "layout": {"mode": "tp", "ranks": 2, "nodes": 1,
// "tp": 0, "redundant_experts": 0}, "replicas": {"min": 1, "max": 2}}, ...]}. INVALID_ARGUMENT naming the
// field ("models[1].layout.ranks: ...") for a missing, mistyped or unknown field, a duplicate
// name, or counts out of range.
absl::StatusOr<std::vector<ModelSpec>> ParseModelSpecs(absl::string_view json_text);
// The same spec in YAML (a file ending in .yaml or .yml); a YAML syntax error names its line
// and column.
absl::StatusOr<std::vector<ModelSpec>> ParseModelSpecsYaml(absl::string_view yaml_text);
// NOT_FOUND naming the path when it cannot be read; the parse errors prefixed with the path.
// YAML when the path ends in .yaml or .yml, JSON otherwise.
absl::StatusOr<std::vector<ModelSpec>> ReadModelSpecs(const std::string& path);
// "tp ranks=2", "dp-ep ranks=4 tp=1 redundant=4", "tp ranks=8 nodes=2".
std::string DescribeLayout(const ModelLayout& layout);

}  // namespace gemma::coordinator
