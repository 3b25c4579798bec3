// The CUDA backend's arena allocator (host bookkeeping only: runs without a GPU).
#include "worker/backend/cuda/device_arena.h"

#include "gtest/gtest.h"

namespace gemma {
namespace {

TEST(DeviceArenaTest, AlignsBlocksAndReportsExhaustion) {
  DeviceArena arena(4096);
  auto a = arena.Allocate(1);
  auto b = arena.Allocate(300);
  ASSERT_TRUE(a.has_value() && b.has_value());
  EXPECT_EQ(*a % DeviceArena::kAlignment, 0u);
  EXPECT_EQ(*b % DeviceArena::kAlignment, 0u);
  EXPECT_EQ(arena.bytes_in_use(), 256u + 512u);
  EXPECT_FALSE(arena.Allocate(4096).has_value());
  auto zero = arena.Allocate(0);
  ASSERT_TRUE(zero.has_value());
  EXPECT_NE(*zero, *a);
}

TEST(DeviceArenaTest, FreeCoalescesNeighboursBackIntoOneBlock) {
  DeviceArena arena(4096);
  auto a = arena.Allocate(1024), b = arena.Allocate(1024), c = arena.Allocate(1024);
  ASSERT_TRUE(a && b && c);
  arena.Free(*a);
  arena.Free(*c);
  EXPECT_EQ(arena.largest_free_block(), 2048u);  // c merged with the tail
  arena.Free(*b);
  EXPECT_EQ(arena.largest_free_block(), 4096u);
  EXPECT_EQ(arena.bytes_in_use(), 0u);
  auto all = arena.Allocate(4096);
  ASSERT_TRUE(all.has_value());
  EXPECT_EQ(*all, 0u);
}

TEST(DeviceArenaTest, ReusesAFreedHoleFirstFit) {
  DeviceArena arena(8192);
  auto a = arena.Allocate(512), b = arena.Allocate(512);
  ASSERT_TRUE(a && b);
  arena.Free(*a);
  auto c = arena.Allocate(256);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(*c, *a);
}

}  // namespace
}  // namespace gemma
