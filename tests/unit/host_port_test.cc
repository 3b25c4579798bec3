// HOST:PORT splitting and port checks shared by gemmactl, the workers and the servers.
#include "common/host_port.h"

#include "gtest/gtest.h"

namespace gemma {
namespace {

TEST(HostPortTest, SplitsAtTheLastColonOutsideBrackets) {
  std::string host, port;
  ASSERT_TRUE(SplitHostPort("127.0.0.1:50051", &host, &port));
  EXPECT_EQ(host, "127.0.0.1");
  EXPECT_EQ(port, "50051");
  ASSERT_TRUE(SplitHostPort("[::1]:8000", &host, &port));
  EXPECT_EQ(host, "::1");
  EXPECT_EQ(port, "8000");
  EXPECT_FALSE(SplitHostPort("localhost", &host, &port));
  EXPECT_FALSE(SplitHostPort("[::1]", &host, &port));
}

TEST(HostPortTest, PortsOutsideTheRangeOrNotNumbersAreRefused) {
  EXPECT_EQ(PortOf("127.0.0.1:0"), 0);
  EXPECT_EQ(PortOf("127.0.0.1:0", /*lo=*/1), -1);
  EXPECT_EQ(PortOf("h:65535"), 65535);
  EXPECT_EQ(PortOf("h:65536"), -1);
  EXPECT_EQ(PortOf("h:99999"), -1);
  EXPECT_EQ(PortOf("h:80x"), -1);
  EXPECT_EQ(PortOf("h:-1"), -1);
  EXPECT_EQ(PortOf("nohostport"), -1);
}

}  // namespace
}  // namespace gemma
