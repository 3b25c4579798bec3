#include "tests/testing/compare.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace gemma::testing {

std::string Comparison::ToString() const {
  if (size_mismatch) {
    return absl::StrFormat("SIZE MISMATCH: %d values against %d in the reference", ours_size,
                           ref_size);
  }
  return absl::StrFormat("max |err| %.3g at %d (max |ref| %.4g, relative %.3g)%s", max_abs_err,
                         worst_index, max_ref, Relative(), nan_mismatch ? ", NaN MISMATCH" : "");
}

Comparison Compare(const float* ours, const float* ref, int64_t n) {
  Comparison c;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(ours[i]) != std::isnan(ref[i]) || std::isinf(ours[i]) != std::isinf(ref[i])) {
      c.nan_mismatch = true;
      c.worst_index = i;
      continue;
    }
    if (std::isnan(ref[i])) continue;
    double err = std::abs(static_cast<double>(ours[i]) - ref[i]);
    c.max_ref = std::max(c.max_ref, std::abs(static_cast<double>(ref[i])));
    if (err > c.max_abs_err) {
      c.max_abs_err = err;
      c.worst_index = i;
    }
  }
  return c;
}

Comparison Compare(const std::vector<float>& ours, const std::vector<float>& ref) {
  Comparison c = Compare(ours.data(), ref.data(),
                         static_cast<int64_t>(std::min(ours.size(), ref.size())));
  c.ours_size = static_cast<int64_t>(ours.size());
  c.ref_size = static_cast<int64_t>(ref.size());
  c.size_mismatch = ours.size() != ref.size();
  return c;
}

std::vector<int64_t> RowArgmax(const std::vector<float>& x, int64_t cols) {
  std::vector<int64_t> out;
  for (size_t r = 0; r * cols < x.size(); ++r) {
    const float* row = x.data() + r * cols;
    out.push_back(std::max_element(row, row + cols) - row);
  }
  return out;
}

std::vector<double> RowTop1Margin(const std::vector<float>& x, int64_t cols) {
  std::vector<double> out;
  for (size_t r = 0; r * cols < x.size(); ++r) {
    std::vector<float> row(x.begin() + r * cols, x.begin() + (r + 1) * cols);
    std::partial_sort(row.begin(), row.begin() + 2, row.end(), std::greater<float>());
    out.push_back(static_cast<double>(row[0]) - row[1]);
  }
  return out;
}

std::string GoldenPath(const std::string& relative) {
  return absl::StrCat(GEMMA_SOURCE_DIR, "/tests/golden/data/", relative);
}

}  // namespace gemma::testing
