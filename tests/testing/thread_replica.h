// A replica of W ranks as threads of the test process: tp mode (one tensor-parallel group of W)
// or dp-ep mode (groups of `tp` ranks, experts spread over all W), each rank with its own
// backend, model and paged cache, and in-process communicators. The backend is the caller's
// choice (CPU, or CUDA ranks sharing one GPU), as is a wrapper around each communicator.
// Also the cases, prompts and sampling options the replica tests share.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "worker/backend/backend.h"
#include "worker/engine/generate.h"
#include "worker/model/gemma4/kv_cache.h"
#include "worker/model/gemma4/model.h"
#include "worker/parallel/communicator.h"
#include "worker/parallel/in_process_communicator.h"

namespace gemma::testing {

struct ReplicaRank {
  std::unique_ptr<Backend> backend;
  // Whatever the backend factory keeps for the rank (a device memory space, say); destroyed
  // after the model and communicators, before the backend.
  std::shared_ptr<void> state;
  // What the model uses (wrapped when a wrapper was given); null where the mode has none.
  std::unique_ptr<parallel::Communicator> tp_comm, ep_comm;
  std::unique_ptr<gemma4::Model> model;
  std::unique_ptr<KvCache> cache;
};

struct ReplicaOptions {
  std::string model;  // fixture under tests/golden/data
  int world = 1;
  int tp = 1;  // dp-ep: ranks per group (tp mode: world)
  bool dp_ep = false;
  // The expert placement every rank starts with (none: the static one), and ranks per node.
  std::optional<eplb::Placement> placement;
  int ranks_per_node = 0;
  // Compare each layer's routing across the tp group (a host round trip a layer).
  bool check_routing = true;
  int64_t page_size = 4;
  int64_t cache_tokens = 512;
  // Rank r's backend; may set rank.state.
  std::function<absl::StatusOr<std::unique_ptr<Backend>>(int r, ReplicaRank& rank)> make_backend;
  // Optional: wraps each communicator of rank r before the model gets it.
  std::function<std::unique_ptr<parallel::Communicator>(
      int r, std::unique_ptr<parallel::Communicator> comm, ReplicaRank& rank)>
      wrap;
};

class ThreadReplica {
 public:
  // Builds every rank on its own thread; a rank's failure is a test failure naming the rank.
  explicit ThreadReplica(ReplicaOptions options);

  // Runs fn(rank) on one thread per rank and waits.
  void RunAll(const std::function<void(int)>& fn);
  ReplicaRank& rank(int r) { return ranks_[r]; }
  int world() const { return options_.world; }
  int tp() const { return options_.tp; }
  // The data-parallel group of rank r (0 in tp mode).
  int group(int r) const { return options_.dp_ep ? r / options_.tp : 0; }
  int groups() const { return options_.dp_ep ? options_.world / options_.tp : 1; }

 private:
  ReplicaOptions options_;
  std::vector<std::unique_ptr<parallel::InProcessGroup>> tp_groups_;
  std::unique_ptr<parallel::InProcessGroup> ep_group_;
  std::vector<ReplicaRank> ranks_;
};

// A replica test case and its gtest name ("tiny_moe_tp2", "tiny_moe_dpep_w4_t2").
struct ReplicaCase {
  std::string model;
  int world;
  int tp;
  bool dp_ep;
};
std::string ReplicaCaseName(const ::testing::TestParamInfo<ReplicaCase>& info);

// BOS then `length - 1` seeded ids in [5, 505).
std::vector<int32_t> RandomPrompt(int length, uint32_t seed);
// Seeded temperature / top-k / top-p sampling of 16 tokens, and the same over the full
// vocabulary (no top-k, top-p 1, another temperature).
GenerateOptions SampledOptions();
GenerateOptions FullVocabSampledOptions();

}  // namespace gemma::testing
