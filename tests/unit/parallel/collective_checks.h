// Shared by the parallel tests and the Gloo rank helper: runs every collective of a Communicator
// on seeded random per-rank data and checks results and traffic counters against a serial
// reference that every rank can compute on its own (each rank's data is a function of seed, rank).
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "worker/parallel/communicator.h"

namespace gemma::parallel::testing {

// Relative tolerance for F32 sums whose order differs from the reference (Gloo's ring).
inline constexpr float kReorderedSumRelTol = 1e-5f;

// Runs AllReduce (F32, I32, I64), AllGather, ReduceScatter (F32, I64), AllToAllV with uneven and
// zero counts, Broadcast from the last rank and Barrier; checks every output and the exact byte
// counters. `exact_f32`: F32 sums must be bit-identical to a rank-order serial sum. Returns the
// first mismatch as INTERNAL, or the communicator's error.
absl::Status RunAllCollectiveChecks(Communicator& comm, uint64_t seed, bool exact_f32);

}  // namespace gemma::parallel::testing
