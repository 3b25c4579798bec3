// The OpenAI Files and Batches endpoints on the coordinator's HTTP port, over the same store
// and runner as gemma.v1.Batches: POST /v1/files (multipart, purpose "batch"),
// GET /v1/files/{id}, GET /v1/files/{id}/content, POST /v1/batches, GET /v1/batches,
// GET /v1/batches/{id}, POST /v1/batches/{id}/cancel. A batch's output and error files
// ("<batch id>-output", "<batch id>-errors") are written from its results when read.
#pragma once

#include <cstddef>
#include <string>

#include "coordinator/batches.h"
#include "httplib.h"
#include "nlohmann/json.hpp"

namespace gemma::coordinator {

struct OpenAiBatchOptions {
  size_t max_file_bytes = size_t{256} << 20;
};

// Every route acts for the caller its bearer token names (auth): uploaded files and batches
// belong to their creator, and only it or an admin token may see, read or cancel them.
void AddOpenAiBatchRoutes(httplib::Server& http, BatchRunner* runner,
                          const OpenAiOptions* openai, const OpenAiBatchOptions& options,
                          const Authenticator* auth);

}  // namespace gemma::coordinator
