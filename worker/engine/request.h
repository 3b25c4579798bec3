// What a client hands the engine loop (a request: prompt ids, sampling, stop conditions) and
// what it gets back (token events and a finish reason). Plain data: knows nothing of the
// scheduler, the KV cache or the model.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/request_defaults.h"
#include "common/sampling_params.h"

namespace gemma::engine {

struct Request {
  std::vector<int32_t> prompt;  // token ids, BOS included; not empty
  SamplingParams sampling;  // position unused; an unset seed is drawn at submission
  int64_t max_tokens = kDefaultMaxTokens;  // generated tokens at most; >= 1
  // Submit lowers max_tokens to the positions the prompt leaves in the model's context instead
  // of refusing the request (a prompt that leaves none is still refused).
  bool max_tokens_up_to_context = false;
  // Leave special tokens out of the text (and out of what stop strings match); ids keep them.
  bool skip_special_tokens = false;
  std::vector<int32_t> stop_token_ids;    // generation ends after emitting one of these
  std::vector<std::string> stop_strings;  // needs an engine with a tokenizer
  bool ignore_end_ids = false;            // do not stop at the model's end ids (benchmarks)
  int32_t priority = 0;                   // higher is scheduled first; ties by arrival
  std::string client_id;                  // shown in log lines beside the engine's id
  // A request resumed after another replica failed: the last `num_resumed` ids of `prompt` were
  // generated (and streamed) there. They count toward max_tokens and the stop strings, and
  // their text is not delivered again.
  int64_t num_resumed = 0;
};

enum class FinishReason : uint8_t {
  kNone,        // still running
  kEndId,       // the model emitted one of its end ids (<eos>, <turn|>)
  kStopToken,   // one of the request's stop_token_ids
  kStopString,  // one of the request's stop_strings completed in the text
  kMaxTokens,   // max_tokens generated
  kCancelled,   // Engine::Cancel
  kError,       // the step failed; see RequestOutput::status
};

const char* FinishReasonName(FinishReason reason);

// One delivery to a request's callback. A request gets one event per generated token and
// exactly one event with finished = true (which may carry the last token, or none).
struct RequestOutput {
  uint64_t request_id = 0;
  std::vector<int32_t> token_ids;  // new ids since the previous event (a stop id included)
  std::string text;                // new text when the engine has a tokenizer; the stop
                                   // string and end/stop ids are never part of it
  bool finished = false;
  FinishReason finish_reason = FinishReason::kNone;
  int64_t num_generated = 0;  // generated tokens so far, this event's included
  absl::Status status;        // not OK only with kError
};

// Called on the thread that runs Engine::Step(), outside the engine's lock: it may Submit or
// Cancel, and must not block for long.
using OutputCallback = std::function<void(const RequestOutput&)>;

}  // namespace gemma::engine
