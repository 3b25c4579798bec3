// One model over W ranks as separate processes (gemma-forward / gemma-generate with
// --world-size --rank --rendezvous, Gloo over loopback) gives the one-rank result; start-up
// errors are refused with clear messages; a rank killed mid-run makes the others fail within
// the timeout; a rank loads only its share of the weights.
#include <signal.h>
#include <sys/wait.h>

#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/npy.h"
#include "gtest/gtest.h"
#include "tests/testing/child_process.h"
#include "tests/testing/compare.h"
#include "tests/testing/tolerances.h"

namespace gemma {
namespace {

using testing::ChildProcess;
using Clock = std::chrono::steady_clock;

std::string Tool(const std::string& name) { return absl::StrCat(GEMMA_BINARY_DIR, "/bin/", name); }
// Files of this test process (ctest runs the cases as concurrent processes).
std::string Temp(const std::string& name) {
  static const std::string dir = [] {
    std::string d = absl::StrCat(::testing::TempDir(), "/gemma_multiprocess_", getpid());
    std::filesystem::create_directories(d);
    return d;
  }();
  return absl::StrCat(dir, "/", name);
}

const char kPrompt[] = "2,17,301,42,7,256,106,107,105,88,107,33,44,55,66,77,88,99,111";

// Runs `tool` as W processes with `args` plus the rank flags; returns rank 0's output and
// checks every rank exits 0.
std::string RunRanks(const std::string& tool, int world, const std::vector<std::string>& args) {
  const int port = testing::FreeLocalPort();
  std::vector<std::unique_ptr<ChildProcess>> ranks;
  for (int r = 0; r < world; ++r) {
    std::vector<std::string> argv = {Tool(tool)};
    argv.insert(argv.end(), args.begin(), args.end());
    for (const std::string& a :
         {absl::StrCat("--world-size=", world), absl::StrCat("--rank=", r),
          absl::StrCat("--rendezvous=127.0.0.1:", port), std::string("--threads=1"),
          std::string("--comm-timeout-s=30")}) {
      argv.push_back(a);
    }
    ranks.push_back(std::make_unique<ChildProcess>(argv, Temp(absl::StrCat(tool, r, ".log"))));
  }
  for (int r = 0; r < world; ++r) {
    EXPECT_EQ(ranks[r]->WaitForExitCode(std::chrono::seconds(120)), 0)
        << "rank " << r << ": " << testing::ReadFileToString(Temp(absl::StrCat(tool, r, ".log")));
  }
  return testing::ReadFileToString(Temp(absl::StrCat(tool, "0.log")));
}

std::vector<float> ForwardLogits(const std::string& model, int world,
                                 const std::vector<std::string>& extra) {
  const std::string out = Temp(absl::StrCat("logits_", world, ".npy"));
  std::vector<std::string> args = {"--model=" + testing::GoldenPath(model),
                                   absl::StrCat("--tokens=", kPrompt), "--logits-out=" + out};
  args.insert(args.end(), extra.begin(), extra.end());
  if (world == 1) {
    std::vector<std::string> argv = {Tool("gemma-forward")};
    argv.insert(argv.end(), args.begin(), args.end());
    ChildProcess p(argv, Temp("forward1.log"));
    EXPECT_EQ(p.WaitForExitCode(std::chrono::seconds(60)), 0)
        << testing::ReadFileToString(Temp("forward1.log"));
  } else {
    RunRanks("gemma-forward", world, args);
  }
  auto npy = ReadNpy(out);
  EXPECT_TRUE(npy.ok()) << npy.status();
  return npy.ok() ? npy->AsFloat() : std::vector<float>{};
}

struct Case {
  std::string model;
  int world;
  std::vector<std::string> mode_flags;
};

class MultiProcessTest : public ::testing::TestWithParam<Case> {};

TEST_P(MultiProcessTest, ForwardAndGenerateEqualOneRank) {
  const Case& c = GetParam();
  std::vector<float> one = ForwardLogits(c.model, 1, {});
  std::vector<float> many = ForwardLogits(c.model, c.world, c.mode_flags);
  ASSERT_EQ(one.size(), many.size());
  auto cmp = testing::Compare(many, one);
  EXPECT_LE(cmp.Relative(), testing::kSelfRelTol) << cmp.ToString();

  for (const std::string& sampling :
       {std::string("--temperature=0"), std::string("--temperature=0.8 --top-k=30 --seed=9")}) {
    std::vector<std::string> args = {"--model=" + testing::GoldenPath(c.model),
                                     absl::StrCat("--tokens=", kPrompt), "--max-new-tokens=12"};
    for (absl::string_view s : absl::StrSplit(sampling, ' ')) args.emplace_back(s);
    std::vector<std::string> argv = {Tool("gemma-generate")};
    argv.insert(argv.end(), args.begin(), args.end());
    ChildProcess single(argv, Temp("generate1.log"));
    ASSERT_EQ(single.WaitForExitCode(std::chrono::seconds(60)), 0);
    std::string want(absl::StripAsciiWhitespace(testing::ReadFileToString(Temp("generate1.log"))));
    args.insert(args.end(), c.mode_flags.begin(), c.mode_flags.end());
    std::string got = RunRanks("gemma-generate", c.world, args);
    // Rank 0's log holds the ids line; other lines (if any) are diagnostics on stderr.
    EXPECT_NE(got.find(want), std::string::npos) << "want: " << want << "\ngot: " << got;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Ranks, MultiProcessTest,
    ::testing::Values(Case{"tiny-dense", 2, {}}, Case{"tiny-moe", 2, {}},
                      Case{"tiny-moe", 4, {"--check-routing"}},
                      Case{"tiny-moe", 2, {"--mode=dp-ep"}},
                      Case{"tiny-moe", 4, {"--mode=dp-ep", "--tp=2"}}));

// Runs one tool invocation and returns (exit code, output).
std::pair<int, std::string> RunOnce(const std::vector<std::string>& argv,
                                    std::chrono::seconds timeout = std::chrono::seconds(60)) {
  ChildProcess p(argv, Temp("once.log"));
  int code = p.WaitForExitCode(timeout);
  return {code, testing::ReadFileToString(Temp("once.log"))};
}

TEST(MultiProcessErrorsTest, BadLayoutsAreRefusedAtStartUp) {
  const std::string model = "--model=" + testing::GoldenPath("tiny-moe");
  const std::string tokens = absl::StrCat("--tokens=", kPrompt);
  struct BadCase {
    std::vector<std::string> flags;
    std::string expected;
  };
  const std::vector<BadCase> cases = {
      {{"--tp=3"}, "num_attention_heads"},
      {{"--mode=dp-ep", "--ep=32"}, "num_experts"},
      {{"--mode=dp-ep", "--ep=4", "--tp=3"}, "tp"},
      {{"--mode=sideways"}, "sideways"},
      {{"--tp=2", "--ep=4"}, "--ep"},
      {{"--world-size=2", "--rank=2", "--rendezvous=127.0.0.1:1"}, "--rank 2"},
      {{"--world-size=2", "--rank=0"}, "--rendezvous"},
      {{"--world-size=2", "--rank=0", "--rendezvous=nocolon"}, "HOST:PORT"},
  };
  for (const BadCase& c : cases) {
    std::vector<std::string> argv = {Tool("gemma-generate"), model, tokens};
    argv.insert(argv.end(), c.flags.begin(), c.flags.end());
    auto [code, output] = RunOnce(argv);
    EXPECT_NE(code, 0) << absl::StrJoin(c.flags, " ");
    EXPECT_NE(output.find(c.expected), std::string::npos)
        << absl::StrJoin(c.flags, " ") << "\nprinted: " << output;
  }
}

TEST(MultiProcessErrorsTest, UnreachableRendezvousFailsAfterItsTimeout) {
  const int port = testing::FreeLocalPort();  // nobody serves it
  auto start = Clock::now();
  auto [code, output] = RunOnce({Tool("gemma-generate"), "--model=" + testing::GoldenPath("tiny-moe"),
                                 "--world-size=2", "--rank=1",
                                 absl::StrCat("--rendezvous=127.0.0.1:", port),
                                 "--comm-timeout-s=2"});
  double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  EXPECT_NE(code, 0);
  EXPECT_NE(output.find("unreachable"), std::string::npos) << output;
  EXPECT_LT(seconds, 20.0);
}

TEST(MultiProcessErrorsTest, KilledRankMakesTheOthersFailWithinTheTimeout) {
  const int port = testing::FreeLocalPort();
  std::vector<std::unique_ptr<ChildProcess>> ranks;
  for (int r = 0; r < 2; ++r) {
    ranks.push_back(std::make_unique<ChildProcess>(
        std::vector<std::string>{Tool("gemma-generate"),
                                 "--model=" + testing::GoldenPath("tiny-moe"),
                                 absl::StrCat("--tokens=", kPrompt), "--max-new-tokens=4000",
                                 "--cache-tokens=4096", "--world-size=2",
                                 absl::StrCat("--rank=", r),
                                 absl::StrCat("--rendezvous=127.0.0.1:", port), "--threads=1",
                                 "--comm-timeout-s=5"},
        Temp(absl::StrCat("killed", r, ".log"))));
  }
  // Let the ranks join and start generating (rank 0 prints nothing before the end, so wait
  // until both are past the rendezvous: the store logs it), then kill rank 1.
  auto joined_deadline = Clock::now() + std::chrono::seconds(30);
  while (testing::ReadFileToString(Temp("killed0.log")).find("listening") == std::string::npos &&
         Clock::now() < joined_deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  ASSERT_FALSE(ranks[0]->WaitUntil(Clock::now()).has_value()) << "rank 0 finished too early";
  const auto killed_at = Clock::now();
  ranks[1]->Kill();
  auto status = ranks[0]->WaitUntil(killed_at + std::chrono::seconds(15));
  ASSERT_TRUE(status.has_value()) << "rank 0 hangs after its peer died";
  double seconds = std::chrono::duration<double>(Clock::now() - killed_at).count();
  EXPECT_LT(seconds, 10.0);
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) != 0);
  std::string output = testing::ReadFileToString(Temp("killed0.log"));
  EXPECT_NE(output.find("rank 0:"), std::string::npos) << output;
}

}  // namespace
}  // namespace gemma
