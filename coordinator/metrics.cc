#include "coordinator/metrics.h"

#include <algorithm>
#include <set>
#include <span>
#include <utility>
#include <vector>

#include "coordinator/openai_format.h"
#include "eplb/placement.h"
#include "prometheus/text_serializer.h"
#include "proto/placement_convert.h"

namespace gemma::coordinator {
namespace {

using prometheus::Histogram;

// vLLM's buckets for the same histograms.
const Histogram::BucketBoundaries kTtftBuckets = {
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0};
const Histogram::BucketBoundaries kItlBuckets = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                                                 0.4,  0.5,   0.75, 1.0,   2.5, 5.0,  7.5, 10.0,
                                                 20.0, 40.0,  80.0};
const Histogram::BucketBoundaries kE2eBuckets = {0.3,  0.5,  0.8,  1.0,   1.5,   2.0,  2.5,
                                                 5.0,  10.0, 15.0, 20.0,  30.0,  40.0, 50.0,
                                                 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};

}  // namespace

Metrics::Metrics(const Registry* registry, bool per_expert)
    : registry_(registry),
      per_expert_(per_expert),
      running_(prometheus::BuildGauge()
                   .Name("gemma:num_requests_running")
                   .Help("Sequences in the replicas' running sets (last heartbeats).")
                   .Register(*prom_)),
      waiting_(prometheus::BuildGauge()
                   .Name("gemma:num_requests_waiting")
                   .Help("Sequences waiting in the replicas' queues (last heartbeats).")
                   .Register(*prom_)),
      queued_(prometheus::BuildGauge()
                   .Name("gemma:num_requests_queued")
                   .Help("Requests in the coordinator's admission queue, waiting for a replica "
                         "with room (all models); a replica's own queue is "
                         "num_requests_waiting.")
                   .Register(*prom_)),
      kv_usage_(prometheus::BuildGauge()
                    .Name("gemma:kv_cache_usage_perc")
                    .Help("KV-cache usage of the full-attention pool, 1 = full, per replica.")
                    .Register(*prom_)),
      replicas_(prometheus::BuildGauge()
                    .Name("gemma:replicas")
                    .Help("Registered replicas by health.")
                    .Register(*prom_)),
      preemptions_(prometheus::BuildCounter()
                       .Name("gemma:num_preemptions_total")
                       .Help("KV-cache preemptions the replicas reported.")
                       .Register(*prom_)),
      prompt_tokens_(prometheus::BuildCounter()
                         .Name("gemma:prompt_tokens_total")
                         .Help("Prompt tokens of the requests that finished.")
                         .Register(*prom_)),
      generation_tokens_(prometheus::BuildCounter()
                             .Name("gemma:generation_tokens_total")
                             .Help("Generated tokens of the requests that finished.")
                             .Register(*prom_)),
      success_(prometheus::BuildCounter()
                   .Name("gemma:request_success_total")
                   .Help("Requests that finished, by finish reason as vLLM names them: stop "
                         "(an end or stop token, a stop string), length (max_tokens or the "
                         "context), abort (cancelled by the client, or cut after tokens went "
                         "out).")
                   .Register(*prom_)),
      failures_(prometheus::BuildCounter()
                    .Name("gemma:request_failure_total")
                    .Help("Requests that ended with an error before any token, by reason (the "
                          "gRPC status code: invalid_argument, resource_exhausted, "
                          "deadline_exceeded, unavailable, not_found, ...).")
                    .Register(*prom_)),
      ttft_(prometheus::BuildHistogram()
                .Name("gemma:time_to_first_token_seconds")
                .Help("Seconds from a request's arrival to its first token.")
                .Register(*prom_)),
      itl_(prometheus::BuildHistogram()
               .Name("gemma:inter_token_latency_seconds")
               .Help("Seconds between a stream's consecutive token messages.")
               .Register(*prom_)),
      e2e_(prometheus::BuildHistogram()
               .Name("gemma:e2e_request_latency_seconds")
               .Help("Seconds from a request's arrival to its final message.")
               .Register(*prom_)),
      expert_layer_tokens_(prometheus::BuildCounter()
                               .Name("gemma:expert_routed_tokens_total")
                               .Help("Tokens routed to experts (top-k choices), per layer and "
                                     "replica.")
                               .Register(*prom_)),
      balancedness_(prometheus::BuildGauge()
                        .Name("gemma:expert_balancedness")
                        .Help("Mean over max tokens per expert of a layer, over everything "
                              "a model's replicas routed so far: 1 is even.")
                        .Register(*prom_)),
      balancedness_overall_(prometheus::BuildGauge()
                                .Name("gemma:expert_balancedness_overall")
                                .Help("Mean over layers of mean tokens per expert, over the mean "
                                      "over layers of the busiest expert's tokens, per model.")
                                .Register(*prom_)),
      hottest_share_(prometheus::BuildGauge()
                         .Name("gemma:expert_hottest_share")
                         .Help("The busiest expert's share of a layer's routed tokens, per "
                               "model.")
                         .Register(*prom_)),
      rank_tokens_(prometheus::BuildCounter()
                       .Name("gemma:expert_rank_tokens_total")
                       .Help("Tokens routed to the experts a rank holds, per replica, layer "
                             "and rank (replicas whose experts are spread over ranks).")
                       .Register(*prom_)),
      rank_balancedness_(prometheus::BuildGauge()
                             .Name("gemma:expert_rank_balancedness")
                             .Help("Mean over max tokens per rank of a layer, per replica, over "
                                   "everything routed so far: 1 is even.")
                             .Register(*prom_)),
      rank_balancedness_overall_(prometheus::BuildGauge()
                                     .Name("gemma:expert_rank_balancedness_overall")
                                     .Help("Mean over layers of a replica's rank balancedness.")
                                     .Register(*prom_)),
      recomputed_tokens_(prometheus::BuildCounter()
                             .Name("gemma:expert_recomputed_tokens_total")
                             .Help("Tokens fed again after a preemption (their routing is in "
                                   "the routed counts too), per replica.")
                             .Register(*prom_)),
      placement_epoch_(prometheus::BuildGauge()
                           .Name("gemma:expert_placement_epoch")
                           .Help("The expert placement a replica runs with (0: the one it "
                                 "started with; +1 per switch).")
                           .Register(*prom_)),
      redundant_slots_(prometheus::BuildGauge()
                           .Name("gemma:expert_redundant_slots")
                           .Help("Spare expert slots of a replica (ranks x slots per rank - "
                                 "experts), which hold copies of hot experts.")
                           .Register(*prom_)),
      expert_copies_max_(prometheus::BuildGauge()
                             .Name("gemma:expert_copies_max")
                             .Help("The most copies any expert of a layer has in a replica's "
                                   "placement.")
                             .Register(*prom_)),
      rebalances_(prometheus::BuildGauge()
                      .Name("gemma:expert_rebalances")
                      .Help("Placement switches of a replica the coordinator remembers, by "
                            "state (offered, active, abandoned).")
                      .Register(*prom_)),
      rebalance_balancedness_(prometheus::BuildGauge()
                                  .Name("gemma:expert_rebalance_balancedness")
                                  .Help("Rank balancedness around a replica's last placement "
                                        "switch: stage before, predicted, measured.")
                                  .Register(*prom_)) {
  if (per_expert_) {
    expert_tokens_ = &prometheus::BuildCounter()
                          .Name("gemma:expert_tokens_total")
                          .Help("Tokens routed to each expert of each layer, over each "
                                "model's replicas.")
                          .Register(*prom_);
  }
}

const Metrics::ModelSeries& Metrics::Series(const std::string& model) {
  absl::MutexLock lock(&series_mutex_);
  auto [it, added] = series_.try_emplace(model);
  if (added) {
    ModelSeries& s = it->second;
    const prometheus::Labels labels = {{"model_name", model}};
    s.model = model;
    s.ttft = &ttft_.Add(labels, kTtftBuckets);
    s.itl = &itl_.Add(labels, kItlBuckets);
    s.e2e = &e2e_.Add(labels, kE2eBuckets);
    s.prompt_tokens = &prompt_tokens_.Add(labels);
    s.generation_tokens = &generation_tokens_.Add(labels);
  }
  return it->second;
}

void Metrics::FirstToken(const ModelSeries& series, double seconds) {
  series.ttft->Observe(seconds);
}

void Metrics::InterToken(const ModelSeries& series, double seconds) {
  series.itl->Observe(seconds);
}

void Metrics::Finished(const ModelSeries& series, const std::string& finish_reason,
                       int64_t prompt_tokens, int64_t generated_tokens, double seconds) {
  // vLLM's label values (stop, length, abort), so that its dashboards' filters work here.
  std::string reason = OpenAiFinishReason(finish_reason);
  if (reason == "cancelled") reason = "abort";
  success_.Add({{"model_name", series.model}, {"finished_reason", reason}}).Increment();
  series.prompt_tokens->Increment(static_cast<double>(prompt_tokens));
  series.generation_tokens->Increment(static_cast<double>(generated_tokens));
  series.e2e->Observe(seconds);
}

void Metrics::Failed(const std::string& model, const std::string& reason) {
  failures_.Add({{"model_name", model}, {"reason", reason}}).Increment();
}

void Metrics::AddGrowth(prometheus::Counter& counter, int64_t value, int64_t* last) {
  const int64_t growth = value >= *last ? value - *last : value;
  if (growth > 0) counter.Increment(static_cast<double>(growth));
  *last = value;
}

template <typename T>
T& Metrics::Owned(prometheus::Family<T>& family, const std::string& replica,
                  const prometheus::Labels& labels) {
  T& metric = family.Add(labels);
  auto& owned = replica_series_[replica];
  if (owned.find(&metric) == owned.end()) {
    owned.emplace(&metric, [&family, &metric] { family.Remove(&metric); });
  }
  return metric;
}

void Metrics::RefreshLocked() {
  const gemma::v1::GetStatusResponse status = registry_->Status();
  queued_.Add({}).Set(static_cast<double>(status.requests_queued()));
  struct ModelGauges {
    int64_t running = 0, waiting = 0, healthy = 0, unhealthy = 0;
  };
  std::map<std::string, ModelGauges> by_model;
  // Every model served has its series, replicas or not.
  for (const gemma::v1::ServedModel& m : status.models()) by_model[m.name()];
  std::set<std::string> seen;
  for (const gemma::v1::ReplicaStatus& r : status.replicas()) {
    seen.insert(r.id());
    ModelGauges& gauges = by_model[r.model()];
    (r.healthy() ? gauges.healthy : gauges.unhealthy) += 1;
    gauges.running += r.running();
    gauges.waiting += r.waiting();
    for (const gemma::v1::KvPoolUsage& pool : r.kv_pools()) {
      if (pool.name() != "full" || pool.pages_total() <= 0) continue;
      prometheus::Gauge*& gauge = kv_usage_by_replica_[r.id()];
      if (gauge == nullptr) {
        gauge = &kv_usage_.Add({{"replica", r.id()}, {"model_name", r.model()}});
      }
      gauge->Set(static_cast<double>(pool.pages_used()) / pool.pages_total());
    }
    AddGrowth(preemptions_.Add({{"model_name", r.model()}}), r.preemptions(),
              &last_preemptions_[r.id()]);
  }
  for (auto it = kv_usage_by_replica_.begin(); it != kv_usage_by_replica_.end();) {
    if (seen.count(it->first) > 0) {
      ++it;
      continue;
    }
    kv_usage_.Remove(it->second);
    it = kv_usage_by_replica_.erase(it);
  }
  for (const std::string& gone : gauge_models_) by_model[gone];  // to 0
  gauge_models_.clear();
  for (const auto& [model, gauges] : by_model) {
    gauge_models_.insert(model);
    // Every model's request series exist from its first scrape on, at zero.
    Series(model);
    preemptions_.Add({{"model_name", model}});
    // The usual failure reasons exist from the start at zero, so rate() and dashboards see them.
    for (const char* reason :
         {"invalid_argument", "resource_exhausted", "deadline_exceeded", "unavailable"}) {
      failures_.Add({{"model_name", model}, {"reason", reason}});
    }
    running_.Add({{"model_name", model}}).Set(static_cast<double>(gauges.running));
    waiting_.Add({{"model_name", model}}).Set(static_cast<double>(gauges.waiting));
    replicas_.Add({{"model_name", model}, {"state", "healthy"}})
        .Set(static_cast<double>(gauges.healthy));
    replicas_.Add({{"model_name", model}, {"state", "unhealthy"}})
        .Set(static_cast<double>(gauges.unhealthy));
  }

  // Expert series, each labelled with its model (as the request series are): per replica for
  // the replicas that route to experts (a dense replica reports no load and has no placement,
  // so it gets none), and per MoE model over all of its replicas.
  const gemma::v1::GetExpertLoadResponse load = registry_->ExpertLoad(false);
  std::set<std::string> listed;
  for (const gemma::v1::ReplicaExpertLoad& r : load.replicas()) {
    listed.insert(r.replica_id());
    const gemma::v1::ExpertLoad& t = r.totals();
    if (t.num_experts() == 0 && r.placement().num_ranks() <= 1) continue;
    const std::string& model = r.model();
    for (int l = 0; l < t.num_layers(); ++l) {
      int64_t tokens = 0;
      for (int e = 0; e < t.num_experts(); ++e) tokens += t.counts(l * t.num_experts() + e);
      AddGrowth(Owned(expert_layer_tokens_, r.replica_id(), {{"model_name", model}, {"replica", r.replica_id()},
                                          {"layer", std::to_string(l)}}),
                tokens, &last_layer_tokens_[{r.replica_id(), l}]);
    }
    AddGrowth(Owned(recomputed_tokens_, r.replica_id(), {{"model_name", model}, {"replica", r.replica_id()}}), t.recomputed_tokens(),
              &last_recomputed_[r.replica_id()]);
    // The placement: its epoch and copies, and the last switch's balancedness.
    const gemma::v1::ExpertPlacement& placement = r.placement();
    absl::StatusOr<eplb::Placement> placed = absl::NotFoundError("none");
    if (placement.num_ranks() > 1) {
      Owned(placement_epoch_, r.replica_id(), {{"model_name", model}, {"replica", r.replica_id()}}).Set(static_cast<double>(placement.epoch()));
      placed = PlacementFromProto(placement);
    }
    if (placed.ok()) {
      Owned(redundant_slots_, r.replica_id(), {{"model_name", model}, {"replica", r.replica_id()}}).Set(placed->redundant());
      for (int l = 0; l < placed->num_layers; ++l) {
        std::vector<int> copies(placed->num_experts, 0);
        for (int rank = 0; rank < placed->num_ranks; ++rank) {
          for (int32_t e : placed->RankSlots(l, rank)) ++copies[e];
        }
        Owned(expert_copies_max_, r.replica_id(), {{"model_name", model}, {"replica", r.replica_id()}, {"layer", std::to_string(l)}})
            .Set(*std::max_element(copies.begin(), copies.end()));
      }
    }
    std::map<std::string, int> states;
    for (const gemma::v1::RebalanceRecord& s : r.switches()) ++states[s.state()];
    for (const char* state : {"offered", "active", "abandoned"}) {
      Owned(rebalances_, r.replica_id(), {{"model_name", model}, {"replica", r.replica_id()}, {"state", state}}).Set(states[state]);
    }
    if (r.switches_size() > 0) {
      const gemma::v1::RebalanceRecord& last = r.switches(r.switches_size() - 1);
      Owned(rebalance_balancedness_, r.replica_id(), {{"model_name", model}, {"replica", r.replica_id()}, {"stage", "before"}})
          .Set(last.balancedness_before());
      Owned(rebalance_balancedness_, r.replica_id(), {{"model_name", model}, {"replica", r.replica_id()}, {"stage", "predicted"}})
          .Set(last.balancedness_predicted());
      if (last.balancedness_measured() >= 0) {
        Owned(rebalance_balancedness_, r.replica_id(), {{"model_name", model}, {"replica", r.replica_id()}, {"stage", "measured"}})
            .Set(last.balancedness_measured());
      }
    }
    // Per rank: the tokens of the experts it holds, each expert's split over its copies under
    // the placement in use (contiguous blocks without one).
    const int ranks = placed.ok() ? placed->num_ranks : t.expert_ranks();
    if (ranks <= 1 || (!placed.ok() && t.num_experts() % ranks != 0)) continue;
    if (placed.ok() && (placed->num_layers != t.num_layers() ||
                        placed->num_experts != t.num_experts())) {
      continue;
    }
    std::vector<int64_t> counts(t.counts().begin(), t.counts().end());
    if (counts.size() != static_cast<size_t>(t.num_layers()) * t.num_experts()) continue;
    double balance_sum = 0;
    for (int l = 0; l < t.num_layers(); ++l) {
      std::vector<double> per_rank(ranks, 0.0);
      if (placed.ok()) {
        per_rank = eplb::RankLoads(
            *placed, l, std::span<const int64_t>(counts).subspan(l * t.num_experts(), t.num_experts()));
      } else {
        const int per = t.num_experts() / ranks;
        for (int e = 0; e < t.num_experts(); ++e) per_rank[e / per] += counts[l * t.num_experts() + e];
      }
      double total = 0, max = 0;
      for (int rank = 0; rank < ranks; ++rank) {
        AddGrowth(Owned(rank_tokens_, r.replica_id(), {{"model_name", model}, {"replica", r.replica_id()},
                                    {"layer", std::to_string(l)},
                                    {"rank", std::to_string(rank)}}),
                  static_cast<int64_t>(per_rank[rank]), &last_rank_tokens_[{r.replica_id(), l, rank}]);
        total += per_rank[rank];
        max = std::max(max, per_rank[rank]);
      }
      const double balance = max > 0 ? total / ranks / max : 1.0;
      Owned(rank_balancedness_, r.replica_id(), {{"model_name", model}, {"replica", r.replica_id()}, {"layer", std::to_string(l)}})
          .Set(balance);
      balance_sum += balance;
    }
    if (t.num_layers() > 0) {
      Owned(rank_balancedness_overall_, r.replica_id(), {{"model_name", model}, {"replica", r.replica_id()}})
          .Set(balance_sum / t.num_layers());
    }
  }
  // A replica the registry no longer lists (gone past --forget-after) takes its series along;
  // each re-registration is a new id, so they would pile up with every worker restart.
  for (auto it = replica_series_.begin(); it != replica_series_.end();) {
    if (listed.count(it->first) > 0) {
      ++it;
      continue;
    }
    for (auto& [metric, remove] : it->second) remove();
    const std::string gone = it->first;
    std::erase_if(last_layer_tokens_, [&](const auto& e) { return std::get<0>(e.first) == gone; });
    std::erase_if(last_rank_tokens_, [&](const auto& e) { return std::get<0>(e.first) == gone; });
    last_recomputed_.erase(gone);
    it = replica_series_.erase(it);
  }
  for (const auto& [model, gauges] : by_model) {
    absl::StatusOr<gemma::v1::GetExpertLoadResponse> model_load = registry_->ExpertLoad(false, model);
    if (!model_load.ok()) continue;
    const gemma::v1::ExpertLoad& t = model_load->totals();
    if (t.num_layers() == 0 || t.num_experts() == 0) continue;
    double sum_mean = 0, sum_max = 0;
    for (int l = 0; l < t.num_layers(); ++l) {
      int64_t total = 0, max = 0;
      for (int e = 0; e < t.num_experts(); ++e) {
        const int64_t c = t.counts(l * t.num_experts() + e);
        total += c;
        max = std::max(max, c);
        if (expert_tokens_ != nullptr) {
          AddGrowth(expert_tokens_->Add({{"model_name", model},
                                         {"layer", std::to_string(l)},
                                         {"expert", std::to_string(e)}}),
                    c, &last_expert_tokens_[{model, l, e}]);
        }
      }
      const double mean = static_cast<double>(total) / t.num_experts();
      const std::string layer = std::to_string(l);
      balancedness_.Add({{"model_name", model}, {"layer", layer}}).Set(max > 0 ? mean / max : 1.0);
      hottest_share_.Add({{"model_name", model}, {"layer", layer}})
          .Set(total > 0 ? static_cast<double>(max) / total : 0.0);
      sum_mean += mean;
      sum_max += static_cast<double>(max);
    }
    balancedness_overall_.Add({{"model_name", model}})
        .Set(sum_max > 0 ? sum_mean / sum_max : 1.0);
  }
}

std::string Metrics::Scrape() {
  absl::MutexLock lock(&mutex_);
  RefreshLocked();
  return prometheus::TextSerializer().Serialize(prom_->Collect());
}

}  // namespace gemma::coordinator
