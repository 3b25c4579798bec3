// Numeric comparison helpers for tests: max absolute error, max magnitude, NaN agreement, and
// argmax per row. Host vectors only.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace gemma::testing {

struct Comparison {
  double max_abs_err = 0.0;
  double max_ref = 0.0;
  int64_t worst_index = -1;
  bool nan_mismatch = false;
  // The two sides have different lengths: Relative() is then infinite, so every tolerance
  // check fails (a short result must not pass on its common prefix).
  bool size_mismatch = false;
  int64_t ours_size = 0, ref_size = 0;
  double Relative() const {
    if (size_mismatch) return INFINITY;
    return max_ref > 0 ? max_abs_err / max_ref : max_abs_err;
  }
  // "max |err| 1.2e-6 at 37 (max |ref| 10.7, relative 1.1e-7)"
  std::string ToString() const;
};

Comparison Compare(const float* ours, const float* ref, int64_t n);
// Element-wise over both vectors; sizes must match (size_mismatch otherwise).
Comparison Compare(const std::vector<float>& ours, const std::vector<float>& ref);

// Index of the largest value of each row (lowest index on ties).
std::vector<int64_t> RowArgmax(const std::vector<float>& x, int64_t cols);
// Per row, largest minus second largest.
std::vector<double> RowTop1Margin(const std::vector<float>& x, int64_t cols);

// Path of a golden fixture under tests/golden/data.
std::string GoldenPath(const std::string& relative);

}  // namespace gemma::testing
