// Bearer tokens on client calls to the coordinator (see coordinator/auth.h): gemmactl sends
// --token or $GEMMA_TOKEN, a worker --join-token or $GEMMA_JOIN_TOKEN.
#pragma once

#include <cstdlib>
#include <string>

#include "grpcpp/client_context.h"

namespace gemma {

inline constexpr char kTokenEnv[] = "GEMMA_TOKEN";
inline constexpr char kJoinTokenEnv[] = "GEMMA_JOIN_TOKEN";

// Adds "authorization: Bearer `token`" to a client call (nothing for an empty token).
inline void AddBearer(grpc::ClientContext& context, const std::string& token) {
  if (!token.empty()) context.AddMetadata("authorization", "Bearer " + token);
}

// The environment variable `name`, or "".
inline std::string EnvToken(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr ? std::string(value) : std::string();
}

}  // namespace gemma
