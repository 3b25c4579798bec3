// Choosing the data plane of a replica from the GPUs its ranks publish.
#include "worker/parallel/data_plane.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace gemma::parallel {
namespace {

using ::testing::HasSubstr;

TEST(DataPlaneTest, AutoTakesNcclOnlyWhenEveryRankHasAGpuOfItsOwn) {
  std::string why;
  auto plane = DecideDataPlane(DataPlane::kAuto, {"GPU-a", "GPU-b", "GPU-c"}, true, &why);
  ASSERT_TRUE(plane.ok()) << plane.status();
  EXPECT_EQ(*plane, DataPlane::kNccl);
  EXPECT_EQ(why, "");

  plane = DecideDataPlane(DataPlane::kAuto, {"GPU-a", "GPU-b", "GPU-a"}, true, &why);
  ASSERT_TRUE(plane.ok()) << plane.status();
  EXPECT_EQ(*plane, DataPlane::kGloo);
  EXPECT_THAT(why, HasSubstr("ranks 0 and 2 share GPU GPU-a"));

  plane = DecideDataPlane(DataPlane::kAuto, {"GPU-a", ""}, true, &why);
  ASSERT_TRUE(plane.ok()) << plane.status();
  EXPECT_EQ(*plane, DataPlane::kGloo);
  EXPECT_THAT(why, HasSubstr("rank 1 has no CUDA device"));

  plane = DecideDataPlane(DataPlane::kAuto, {"GPU-a", "GPU-b"}, false, &why);
  ASSERT_TRUE(plane.ok()) << plane.status();
  EXPECT_EQ(*plane, DataPlane::kGloo);
  EXPECT_THAT(why, HasSubstr("no NCCL"));
}

TEST(DataPlaneTest, AskingForNcclWhereItCannotServeSaysWhyAndWhatToDo) {
  std::string why;
  auto plane = DecideDataPlane(DataPlane::kNccl, {"GPU-a", "GPU-a"}, true, &why);
  ASSERT_FALSE(plane.ok());
  EXPECT_EQ(plane.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(plane.status().message(), HasSubstr("share GPU"));
  EXPECT_THAT(plane.status().message(), HasSubstr("--data-plane gloo"));

  plane = DecideDataPlane(DataPlane::kNccl, {"GPU-a", "GPU-b"}, true, &why);
  ASSERT_TRUE(plane.ok()) << plane.status();
  EXPECT_EQ(*plane, DataPlane::kNccl);
}

TEST(DataPlaneTest, GlooIsTakenAsAskedAndNamesParseBothWays) {
  std::string why;
  auto plane = DecideDataPlane(DataPlane::kGloo, {"GPU-a", "GPU-b"}, true, &why);
  ASSERT_TRUE(plane.ok());
  EXPECT_EQ(*plane, DataPlane::kGloo);
  for (DataPlane p : {DataPlane::kGloo, DataPlane::kNccl, DataPlane::kAuto}) {
    auto parsed = ParseDataPlane(DataPlaneName(p));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, p);
  }
  auto bad = ParseDataPlane("mpi");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr("--data-plane \"mpi\" is not one of"));
}

}  // namespace
}  // namespace gemma::parallel
