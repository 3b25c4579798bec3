// The comparison helper every golden, equivalence and gpu test relies on: it must fail a
// result of the wrong length, misplaced NaNs, and errors over a tolerance.
#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "tests/testing/compare.h"

namespace gemma::testing {
namespace {

TEST(CompareTest, AShortOrLongResultNeverPasses) {
  const std::vector<float> ref{1.0f, 2.0f, 3.0f};
  const Comparison short_result = Compare(std::vector<float>{1.0f, 2.0f}, ref);
  EXPECT_TRUE(short_result.size_mismatch);
  EXPECT_FALSE(short_result.Relative() <= 1.0);
  EXPECT_EQ(short_result.ToString(), "SIZE MISMATCH: 2 values against 3 in the reference");
  EXPECT_FALSE(Compare(std::vector<float>{1.0f, 2.0f, 3.0f, 4.0f}, ref).Relative() <= 1.0);
  EXPECT_FALSE(Compare(std::vector<float>{}, ref).Relative() <= 1.0);
  EXPECT_EQ(Compare(std::vector<float>{}, std::vector<float>{}).Relative(), 0.0);
}

TEST(CompareTest, ErrorsAndNaNsAreReportedWhereTheyAre) {
  const std::vector<float> ref{1.0f, -4.0f, 2.0f};
  const Comparison c = Compare(std::vector<float>{1.0f, -4.5f, 2.0f}, ref);
  EXPECT_FALSE(c.size_mismatch);
  EXPECT_EQ(c.worst_index, 1);
  EXPECT_DOUBLE_EQ(c.Relative(), 0.5 / 4.0);
  const Comparison nan = Compare(std::vector<float>{1.0f, NAN, 2.0f}, ref);
  EXPECT_TRUE(nan.nan_mismatch);
  EXPECT_EQ(Compare(ref, ref).Relative(), 0.0);
}

}  // namespace
}  // namespace gemma::testing
