// Expert-load balancing across a replica's ranks: fits a new placement (eplb::BalancedPlacement,
// copies for the hottest experts within the replica's spare slots) to the load of its latest
// windows, offers it through the heartbeats (registry.h), and judges it afterwards on the
// windows counted under it. On request (gemmactl rebalance) and, with a threshold, on its own
// when a replica's balancedness stays low. Knows no engine; the replicas do the switching.
#pragma once

#include <chrono>
#include <string>

#include "coordinator/registry.h"
#include "gemma/v1/cluster.pb.h"

namespace gemma::coordinator {

struct RebalanceOptions {
  // Automatic switches when a replica's rank balancedness over the latest `window` windows is
  // below this (0: only on request).
  double threshold = 0.85;
  // Windows (about one heartbeat each) the load is fitted to and judged on.
  int window = 10;
  // At least this long between two automatic offers to one replica.
  std::chrono::seconds min_interval{60};
  // The predicted balancedness must rise by at least this much for an automatic switch (the
  // switch costs each rank the weights of its changed slots, loaded beside the steps, and
  // their memory until the old ones are freed).
  double min_gain = 0.05;
};

class Rebalancer {
 public:
  Rebalancer(Registry* registry, RebalanceOptions options)
      : registry_(registry), options_(options) {}

  // gemma.v1.Cluster.Rebalance: plans (and unless dry_run offers) a placement for the replica
  // named, or every replica whose experts are spread. A replica with nothing to gain or no
  // load yet is reported with the reason.
  gemma::v1::RebalanceResponse Rebalance(const gemma::v1::RebalanceRequest& request);
  // The automatic policy, and the balancedness measured after each switch (logged with its
  // prediction). Call about once a heartbeat.
  void Tick();

  const RebalanceOptions& options() const { return options_; }

 private:
  // A plan for `group` (reason "requested" or "automatic"); `skipped` says why not.
  gemma::v1::ReplicaRebalance Plan(const BalanceGroup& group, const std::string& reason) const;

  Registry* registry_;
  const RebalanceOptions options_;
};

}  // namespace gemma::coordinator
