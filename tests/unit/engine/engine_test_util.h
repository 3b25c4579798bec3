// Helpers shared by the engine-loop tests: collecting a request's events, and a step executor
// that plays scripted tokens so stop conditions are tested on exactly known text.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "worker/engine/engine.h"

namespace gemma::engine::testing {

// Everything one request received.
struct Collected {
  std::vector<int32_t> tokens;
  std::string text;
  std::vector<std::string> event_texts;  // the text of each event, in order
  int num_events = 0;
  int num_final_events = 0;
  bool finished = false;
  FinishReason reason = FinishReason::kNone;
  absl::Status status;
  uint64_t first_step = 0;  // engine step (as counted by the test) of the first token
  uint64_t last_step = 0;   // and of the latest
};

// Events keyed by request id; use from the stepping thread.
class Collector {
 public:
  OutputCallback For(const std::string& name) {
    return [this, name](const RequestOutput& output) {
      Collected& c = by_name_[name];
      c.tokens.insert(c.tokens.end(), output.token_ids.begin(), output.token_ids.end());
      c.text += output.text;
      c.event_texts.push_back(output.text);
      ++c.num_events;
      if (!output.token_ids.empty()) {
        if (c.first_step == 0) c.first_step = current_step_;
        c.last_step = current_step_;
      }
      if (output.finished) {
        ++c.num_final_events;
        c.finished = true;
        c.reason = output.finish_reason;
        c.status = output.status;
      }
    };
  }
  Collected& operator[](const std::string& name) { return by_name_[name]; }
  void set_current_step(uint64_t step) { current_step_ = step; }

 private:
  std::map<std::string, Collected> by_name_;
  uint64_t current_step_ = 0;
};

// Emits script[request_key][i] as the i-th generated token of a request, where i is the
// sampled position minus `prompt_length`. Writes nothing to the cache; advances kv->length.
class ScriptedExecutor : public StepExecutor {
 public:
  ScriptedExecutor(int64_t prompt_length,
                   absl::flat_hash_map<uint64_t, std::vector<int32_t>> scripts)
      : prompt_length_(prompt_length), scripts_(std::move(scripts)) {}

  absl::StatusOr<std::vector<int32_t>> Execute(const StepBatch& batch, KvCache&) override {
    std::vector<int32_t> out;
    for (const StepEntry& entry : batch.entries) {
      entry.kv->length += static_cast<int64_t>(entry.tokens.size());
      if (!entry.sample) continue;
      const std::vector<int32_t>& script = scripts_.at(entry.sampling.request_key);
      const int64_t i = entry.sampling.position - prompt_length_;
      if (i < 0 || i >= static_cast<int64_t>(script.size())) {
        return absl::OutOfRangeError("script exhausted");
      }
      out.push_back(script[i]);
    }
    return out;
  }

 private:
  int64_t prompt_length_;
  absl::flat_hash_map<uint64_t, std::vector<int32_t>> scripts_;
};

}  // namespace gemma::engine::testing
