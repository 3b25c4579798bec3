// Status propagation helpers: RETURN_IF_ERROR and ASSIGN_OR_RETURN over absl::Status(Or).
// Debian's Abseil ships neither, so they live here. No dependency beyond Abseil.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define GEMMA_STATUS_CONCAT_INNER(a, b) a##b
#define GEMMA_STATUS_CONCAT(a, b) GEMMA_STATUS_CONCAT_INNER(a, b)

// Evaluates `expr` (an absl::Status); returns it from the enclosing function if not OK.
#define RETURN_IF_ERROR(expr)                      \
  do {                                             \
    ::absl::Status gemma_status_ = (expr);         \
    if (!gemma_status_.ok()) return gemma_status_; \
  } while (0)

// `ASSIGN_OR_RETURN(auto x, MakeX());` declares x from a StatusOr or returns its error.
#define ASSIGN_OR_RETURN(lhs, rexpr) \
  GEMMA_ASSIGN_OR_RETURN_IMPL(GEMMA_STATUS_CONCAT(gemma_statusor_, __LINE__), lhs, rexpr)

#define GEMMA_ASSIGN_OR_RETURN_IMPL(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                \
  if (!statusor.ok()) return statusor.status();           \
  lhs = std::move(statusor).value()
