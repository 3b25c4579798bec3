#include "proto/placement_convert.h"

namespace gemma {

gemma::v1::ExpertPlacement PlacementToProto(const eplb::Placement& p, int ranks_per_node) {
  gemma::v1::ExpertPlacement out;
  out.set_epoch(p.epoch);
  out.set_num_layers(p.num_layers);
  out.set_num_experts(p.num_experts);
  out.set_num_ranks(p.num_ranks);
  out.set_slots_per_rank(p.slots_per_rank);
  out.set_ranks_per_node(ranks_per_node);
  out.mutable_slots()->Assign(p.slots.begin(), p.slots.end());
  return out;
}

absl::StatusOr<eplb::Placement> PlacementFromProto(const gemma::v1::ExpertPlacement& proto) {
  eplb::Placement p;
  p.epoch = proto.epoch();
  p.num_layers = proto.num_layers();
  p.num_experts = proto.num_experts();
  p.num_ranks = proto.num_ranks();
  p.slots_per_rank = proto.slots_per_rank();
  p.slots.assign(proto.slots().begin(), proto.slots().end());
  if (p.num_ranks < 1 || p.slots_per_rank < 1 || p.num_experts < 1 || p.num_ranks > 65536 ||
      p.num_experts > 65536 || p.slots_per_rank > p.num_experts) {
    return absl::InvalidArgumentError("expert placement has sizes out of range");
  }
  if (absl::Status s = eplb::Validate(p); !s.ok()) return s;
  return p;
}

}  // namespace gemma
