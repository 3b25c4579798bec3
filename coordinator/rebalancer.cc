#include "coordinator/rebalancer.h"

#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "eplb/placement.h"
#include "glog/logging.h"
#include "proto/placement_convert.h"

namespace gemma::coordinator {

gemma::v1::ReplicaRebalance Rebalancer::Plan(const BalanceGroup& group,
                                             const std::string& reason) const {
  gemma::v1::ReplicaRebalance out;
  out.set_replica_id(group.replica_ids.front());
  absl::StatusOr<eplb::Placement> current = PlacementFromProto(group.placement);
  if (!current.ok()) {
    out.set_skipped(absl::StrCat("its placement is unusable: ", current.status().message()));
    return out;
  }
  const int64_t tokens = std::accumulate(group.load.begin(), group.load.end(), int64_t{0});
  if (group.windows == 0 || tokens == 0) {
    out.set_skipped("no expert load counted under its current placement yet");
    return out;
  }
  const int per_node = group.placement.ranks_per_node() > 0 ? group.placement.ranks_per_node()
                                                              : current->num_ranks;
  absl::StatusOr<eplb::Placement> next =
      eplb::BalancedPlacement(group.load, current->num_layers, current->num_experts,
                              {current->num_ranks, per_node}, current->redundant());
  if (!next.ok()) {
    out.set_skipped(absl::StrCat("no placement fits: ", next.status().message()));
    return out;
  }
  const uint64_t last_epoch = group.last ? group.last->epoch() : 0;
  next->epoch = std::max(current->epoch, last_epoch) + 1;
  gemma::v1::RebalanceRecord* plan = out.mutable_plan();
  plan->set_epoch(next->epoch);
  plan->set_reason(reason);
  plan->set_state("offered");
  plan->set_balancedness_before(eplb::Balancedness(*current, group.load));
  plan->set_balancedness_predicted(eplb::Balancedness(*next, group.load));
  plan->set_balancedness_measured(-1);
  int64_t moved = 0;
  for (size_t i = 0; i < next->slots.size(); ++i) moved += next->slots[i] != current->slots[i];
  plan->set_slots_moved(moved);
  plan->set_offered_unix_ms(absl::ToUnixMillis(absl::Now()));
  if (next->SameSlots(*current)) {
    out.clear_plan();
    out.set_skipped("its placement is already the balanced one for this load");
    return out;
  }
  *out.mutable_placement() = PlacementToProto(*next, group.placement.ranks_per_node());
  return out;
}

gemma::v1::RebalanceResponse Rebalancer::Rebalance(const gemma::v1::RebalanceRequest& request) {
  gemma::v1::RebalanceResponse response;
  for (const BalanceGroup& group : registry_->BalanceGroups(options_.window)) {
    if (!request.replica_id().empty() &&
        std::find(group.replica_ids.begin(), group.replica_ids.end(), request.replica_id()) ==
            group.replica_ids.end()) {
      continue;
    }
    gemma::v1::ReplicaRebalance r = Plan(group, "requested");
    if (r.has_plan() && !request.dry_run()) {
      registry_->OfferPlacement(group.key, r.placement(), r.plan());
      LOG(INFO) << "replica " << r.replica_id() << ": expert placement epoch " << r.plan().epoch()
                << " offered on request: rank balancedness "
                << absl::StrFormat("%.3f", r.plan().balancedness_before()) << " -> "
                << absl::StrFormat("%.3f", r.plan().balancedness_predicted())
                << " predicted over " << group.windows << " windows, " << r.plan().slots_moved()
                << " slots to load";
    }
    *response.add_replicas() = std::move(r);
  }
  return response;
}

void Rebalancer::Tick() {
  const auto now = std::chrono::steady_clock::now();
  for (const BalanceGroup& group : registry_->BalanceGroups(options_.window)) {
    // What the last switch measured, once windows under it have come in.
    if (group.last && group.last->state() == "active" &&
        group.last->balancedness_measured() < 0 &&
        group.placement.epoch() == group.last->epoch() &&
        group.windows >= std::min(options_.window, 3)) {
      absl::StatusOr<eplb::Placement> placed = PlacementFromProto(group.placement);
      if (placed.ok() && std::accumulate(group.load.begin(), group.load.end(), int64_t{0}) > 0) {
        const double measured = eplb::Balancedness(*placed, group.load);
        registry_->SetMeasured(group.key, group.last->epoch(), measured);
        LOG(INFO) << "replica " << group.replica_ids.front() << ": expert placement epoch "
                  << group.last->epoch() << " (" << group.last->reason()
                  << "): rank balancedness "
                  << absl::StrFormat("%.3f before, %.3f predicted, %.3f measured over %d windows",
                                     group.last->balancedness_before(),
                                     group.last->balancedness_predicted(), measured,
                                     group.windows);
      }
    }
    if (options_.threshold <= 0 || group.offer_pending || group.windows < options_.window) {
      continue;
    }
    if (group.last_offer != std::chrono::steady_clock::time_point{} &&
        now - group.last_offer < options_.min_interval) {
      continue;
    }
    gemma::v1::ReplicaRebalance r = Plan(group, "automatic");
    if (!r.has_plan() || r.plan().balancedness_before() >= options_.threshold ||
        r.plan().balancedness_predicted() - r.plan().balancedness_before() < options_.min_gain) {
      continue;
    }
    registry_->OfferPlacement(group.key, r.placement(), r.plan());
    LOG(INFO) << "replica " << r.replica_id() << ": rank balancedness "
              << absl::StrFormat("%.3f", r.plan().balancedness_before()) << " under "
              << options_.threshold << " over " << group.windows
              << " windows; expert placement epoch " << r.plan().epoch() << " offered ("
              << absl::StrFormat("%.3f", r.plan().balancedness_predicted()) << " predicted, "
              << r.plan().slots_moved() << " slots to load)";
  }
}

}  // namespace gemma::coordinator
