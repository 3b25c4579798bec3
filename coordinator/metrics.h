// The coordinator's Prometheus metrics, in the text format, for its HTTP port's /metrics.
// Where vLLM has a metric, the same name and type under the gemma: prefix (so a vLLM dashboard
// ports by one substitution): requests running and waiting, KV-cache usage, prompt and
// generation token counters, preemptions, request success by finish reason, and the
// time-to-first-token, inter-token latency and end-to-end latency histograms. Plus the
// replicas by health and the expert load: tokens routed per layer and replica, balancedness
// (mean / max tokens per expert) per layer and overall, and the busiest expert's share per
// layer; per replica whose experts are spread over ranks, the tokens per layer and rank and the
// rank balancedness (mean / max tokens per rank, as vLLM and SGLang define it) per layer and
// overall; recomputed tokens per replica; per-expert series only when asked (layers x experts
// of them).
//
// Request events come from the proxy as streams progress (thread-safe); the replica gauges and
// the expert series are refreshed from the registry at each scrape.
#pragma once

#include <functional>
#include <map>
#include <set>
#include <memory>
#include <string>
#include <tuple>

#include "absl/synchronization/mutex.h"
#include "coordinator/registry.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace gemma::coordinator {

class Metrics {
 public:
  // `registry` is not owned and must outlive this. `per_expert` adds
  // gemma:expert_tokens_total{layer, expert} (num_layers x num_experts series).
  Metrics(const Registry* registry, bool per_expert);

  // A stream's first token came `seconds` after the request arrived; a later token `seconds`
  // after the one before; the stream finished normally.
  // A model's request series (each labelled model_name, as vLLM labels them), looked up once
  // per request rather than per token. The reference stays valid as long as this object.
  struct ModelSeries {
    std::string model;
    prometheus::Histogram* ttft = nullptr;
    prometheus::Histogram* itl = nullptr;
    prometheus::Histogram* e2e = nullptr;
    prometheus::Counter* prompt_tokens = nullptr;
    prometheus::Counter* generation_tokens = nullptr;
  };
  const ModelSeries& Series(const std::string& model);
  void FirstToken(const ModelSeries& series, double seconds);
  void InterToken(const ModelSeries& series, double seconds);
  void Finished(const ModelSeries& series, const std::string& finish_reason,
                int64_t prompt_tokens, int64_t generated_tokens, double seconds);
  // A request ended with an error before its final message and before any token went out
  // (refused at admission, timed out in the admission queue, no replica could run it, ...):
  // gemma:request_failure_total{model_name, reason}, the reason being the gRPC status code in
  // lower case ("invalid_argument", "resource_exhausted", "deadline_exceeded", ...). `model`
  // is empty for a model not served here (a client's name must not add series).
  void Failed(const std::string& model, const std::string& reason);

  // Every metric in the Prometheus text exposition format (version 0.0.4).
  std::string Scrape();

 private:
  void RefreshLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  // Adds to a counter the growth of a cumulative value reported from elsewhere (a replica
  // restarting from 0 adds its new value).
  static void AddGrowth(prometheus::Counter& counter, int64_t value, int64_t* last);
  // family.Add(labels), remembered as one of `replica`'s series, removed with the replica.
  template <typename T>
  T& Owned(prometheus::Family<T>& family, const std::string& replica,
           const prometheus::Labels& labels) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);

  const Registry* const registry_;
  const bool per_expert_;
  std::shared_ptr<prometheus::Registry> prom_ = std::make_shared<prometheus::Registry>();
  prometheus::Family<prometheus::Gauge>& running_;
  prometheus::Family<prometheus::Gauge>& waiting_;
  prometheus::Family<prometheus::Gauge>& queued_;
  prometheus::Family<prometheus::Gauge>& kv_usage_;
  prometheus::Family<prometheus::Gauge>& replicas_;
  prometheus::Family<prometheus::Counter>& preemptions_;
  prometheus::Family<prometheus::Counter>& prompt_tokens_;
  prometheus::Family<prometheus::Counter>& generation_tokens_;
  prometheus::Family<prometheus::Counter>& success_;
  prometheus::Family<prometheus::Counter>& failures_;
  prometheus::Family<prometheus::Histogram>& ttft_;
  prometheus::Family<prometheus::Histogram>& itl_;
  prometheus::Family<prometheus::Histogram>& e2e_;
  prometheus::Family<prometheus::Counter>& expert_layer_tokens_;
  prometheus::Family<prometheus::Gauge>& balancedness_;
  prometheus::Family<prometheus::Gauge>& balancedness_overall_;
  prometheus::Family<prometheus::Gauge>& hottest_share_;
  prometheus::Family<prometheus::Counter>& rank_tokens_;
  prometheus::Family<prometheus::Gauge>& rank_balancedness_;
  prometheus::Family<prometheus::Gauge>& rank_balancedness_overall_;
  prometheus::Family<prometheus::Counter>& recomputed_tokens_;
  prometheus::Family<prometheus::Gauge>& placement_epoch_;
  prometheus::Family<prometheus::Gauge>& redundant_slots_;
  prometheus::Family<prometheus::Gauge>& expert_copies_max_;
  prometheus::Family<prometheus::Gauge>& rebalances_;
  prometheus::Family<prometheus::Gauge>& rebalance_balancedness_;
  prometheus::Family<prometheus::Counter>* expert_tokens_ = nullptr;
  // The models whose replica gauges were set at the last scrape (set to 0 when they have no
  // replica left).
  std::set<std::string> gauge_models_ ABSL_GUARDED_BY(mutex_);

  absl::Mutex series_mutex_;
  std::map<std::string, ModelSeries> series_ ABSL_GUARDED_BY(series_mutex_);
  absl::Mutex mutex_;
  std::map<std::string, prometheus::Gauge*> kv_usage_by_replica_ ABSL_GUARDED_BY(mutex_);
  std::map<std::string, int64_t> last_preemptions_ ABSL_GUARDED_BY(mutex_);
  std::map<std::tuple<std::string, int>, int64_t> last_layer_tokens_ ABSL_GUARDED_BY(mutex_);
  std::map<std::tuple<std::string, int, int>, int64_t> last_expert_tokens_ ABSL_GUARDED_BY(mutex_);
  std::map<std::tuple<std::string, int, int>, int64_t> last_rank_tokens_ ABSL_GUARDED_BY(mutex_);
  std::map<std::string, int64_t> last_recomputed_ ABSL_GUARDED_BY(mutex_);
  // Per replica, its expert series and how to remove each.
  std::map<std::string, std::map<const void*, std::function<void()>>> replica_series_
      ABSL_GUARDED_BY(mutex_);
};

}  // namespace gemma::coordinator
