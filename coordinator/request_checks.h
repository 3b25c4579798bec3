// What the coordinator checks and fixes in a gemma.v1.GenerateRequest before it reaches a
// replica: refusals that need no model (INVALID_ARGUMENT with a message naming the problem),
// refusals against the model's limits as the replicas registered them (vocabulary size, context
// length; unknown limits are not checked), a deadline already past, and the fields it resolves
// so that a request resumed on another replica after a failure is the same request.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "common/request_defaults.h"
#include "coordinator/registry.h"
#include "gemma/v1/inference.pb.h"

namespace gemma::coordinator {

using gemma::kDefaultMaxTokens;  // max_tokens 0 means this many (common/request_defaults.h)

// The most a request may carry; each refusal names its limit.
inline constexpr int kMaxStopStrings = 16;
inline constexpr size_t kMaxStopStringBytes = 256;
inline constexpr int kMaxStopTokenIds = 64;
inline constexpr int kMaxChatMessages = 1024;
inline constexpr size_t kMaxInputBytes = size_t{1} << 20;  // text, or a chat's contents together
inline constexpr int32_t kMinPriority = -100;  // priorities are in [kMinPriority, 0]

// INVALID_ARGUMENT with a message for a request no replica could serve. Token ids must be below
// `limits.vocab_size` and stop ids in [0, vocab_size); an input of token ids plus max_tokens
// must fit `limits.max_context` (text and chat inputs are tokenized, and their length checked,
// on the replica).
absl::Status ValidateGenerateRequest(const gemma::v1::GenerateRequest& request,
                                     const ModelLimits& limits = ModelLimits());

// DEADLINE_EXCEEDED, saying so, when `deadline` is not after `now` on arrival.
absl::Status CheckDeadline(std::chrono::system_clock::time_point deadline,
                           std::chrono::system_clock::time_point now);

// Resolves what a replica would pick by itself, so every replica that serves the request picks
// the same: max_tokens 0 becomes kDefaultMaxTokens, and a sampled request (temperature > 0)
// without a seed gets `random_seed`.
void PrepareForReplicas(gemma::v1::GenerateRequest* request, uint64_t random_seed);

}  // namespace gemma::coordinator
