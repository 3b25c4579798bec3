// One model over W ranks as separate processes (gemma-forward / gemma-generate with
// --world-size --rank --rendezvous, Gloo over loopback) gives the one-rank result; start-up
// errors are refused with clear messages; a rank killed mid-run makes the others fail within
// the timeout; a rank loads only its share of the weights; placements with copies of hot
// experts (--expert-placement, --redundant-experts) give the one-rank result too.
#include <signal.h>
#include <sys/wait.h>

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/model_config.h"
#include "common/npy.h"
#include "eplb/placement.h"
#include "eplb/placement_json.h"
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

// Runs `tool` as W processes with `args` plus the rank flags; returns each rank's exit code
// (-1 if it did not exit normally within `timeout`).
std::vector<int> RunRanksForCodes(const std::string& tool, int world,
                                  const std::vector<std::string>& args,
                                  std::chrono::seconds timeout = std::chrono::seconds(120)) {
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
  std::vector<int> codes;
  for (int r = 0; r < world; ++r) codes.push_back(ranks[r]->WaitForExitCode(timeout));
  return codes;
}

// As RunRanksForCodes; returns rank 0's output and checks every rank exits 0.
std::string RunRanks(const std::string& tool, int world, const std::vector<std::string>& args) {
  const std::vector<int> codes = RunRanksForCodes(tool, world, args);
  for (int r = 0; r < world; ++r) {
    EXPECT_EQ(codes[r], 0) << "rank " << r << ": "
                           << testing::ReadFileToString(Temp(absl::StrCat(tool, r, ".log")));
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

// tiny-moe's placement fitted to a random, steep load (as PlacementEquivalenceTest does): the
// hot experts get copies and ownership is not contiguous. Written as JSON; returns the path.
std::string WriteBalancedPlacement(int ranks, int redundant, uint64_t seed) {
  const ModelConfig config = *LoadModelConfig(testing::GoldenPath("tiny-moe"));
  const int layers = static_cast<int>(config.num_hidden_layers);
  const int experts = static_cast<int>(config.num_experts);
  std::mt19937_64 rng(seed);
  std::vector<int64_t> load(static_cast<size_t>(layers) * experts);
  for (int64_t& v : load) v = static_cast<int64_t>(std::exp2(rng() % 12));
  auto placement = eplb::BalancedPlacement(load, layers, experts, {ranks, ranks}, redundant);
  EXPECT_TRUE(placement.ok()) << placement.status();
  if (!placement.ok()) return "";
  EXPECT_FALSE(eplb::CopyTable(*placement).contiguous());
  const std::string path = Temp(absl::StrCat("placement_", ranks, "_", redundant, ".json"));
  std::ofstream(path) << eplb::PlacementToJson(*placement);
  return path;
}

TEST(MultiProcessPlacementTest, PlacementsWithCopiesEqualOneRank) {
  const std::string model = "--model=" + testing::GoldenPath("tiny-moe");
  const std::vector<float> one = ForwardLogits("tiny-moe", 1, {});
  const std::vector<std::string> generate = {model, absl::StrCat("--tokens=", kPrompt),
                                             "--max-new-tokens=12", "--temperature=0"};
  std::vector<std::string> argv = {Tool("gemma-generate")};
  argv.insert(argv.end(), generate.begin(), generate.end());
  ChildProcess single(argv, Temp("generate1.log"));
  ASSERT_EQ(single.WaitForExitCode(std::chrono::seconds(60)), 0);
  const std::string want(
      absl::StripAsciiWhitespace(testing::ReadFileToString(Temp("generate1.log"))));

  struct PlacementCase {
    int world;
    std::vector<std::string> flags;
    std::string logged;  // what rank 0 says of the placement it loads
  };
  const std::vector<PlacementCase> cases = {
      {2, {"--expert-placement=" + WriteBalancedPlacement(2, 4, 1)}, "4 copies over 2 ranks"},
      {4, {"--mode=dp-ep", "--expert-placement=" + WriteBalancedPlacement(4, 8, 2)},
       "8 copies over 4 ranks"},
      {4, {"--mode=dp-ep", "--tp=2", "--expert-placement=" + WriteBalancedPlacement(4, 4, 3)},
       "4 copies over 4 ranks"},
      {2, {"--mode=dp-ep", "--redundant-experts=6"}, "6 copies over 2 ranks"},
  };
  for (const PlacementCase& c : cases) {
    SCOPED_TRACE(absl::StrCat("world ", c.world, " ", absl::StrJoin(c.flags, " ")));
    const std::vector<float> many = ForwardLogits("tiny-moe", c.world, c.flags);
    EXPECT_NE(testing::ReadFileToString(Temp("gemma-forward0.log")).find(c.logged),
              std::string::npos)
        << testing::ReadFileToString(Temp("gemma-forward0.log"));
    ASSERT_EQ(one.size(), many.size());
    auto cmp = testing::Compare(many, one);
    EXPECT_LE(cmp.Relative(), testing::kSelfRelTol) << cmp.ToString();

    std::vector<std::string> args = generate;
    args.insert(args.end(), c.flags.begin(), c.flags.end());
    const std::string got = RunRanks("gemma-generate", c.world, args);
    EXPECT_NE(got.find(want), std::string::npos) << "want: " << want << "\ngot: " << got;
  }
}

TEST(MultiProcessPlacementTest, PlacementsThatDoNotFitAreRefused) {
  const std::string model = "--model=" + testing::GoldenPath("tiny-moe");
  const std::string tokens = absl::StrCat("--tokens=", kPrompt);
  // A placement over 4 ranks given to 2 rank processes: every rank fails, none hangs. Each
  // refuses it after joining its peers; one of them says why, and the other may instead see
  // it leave.
  const std::string four = WriteBalancedPlacement(4, 4, 5);
  const auto start = Clock::now();
  const std::vector<int> codes = RunRanksForCodes(
      "gemma-generate", 2, {model, tokens, "--expert-placement=" + four},
      std::chrono::seconds(40));
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - start).count(), 20.0);
  for (int r = 0; r < 2; ++r) {
    EXPECT_GT(codes[r], 0) << "rank " << r << ": "
                           << testing::ReadFileToString(Temp(absl::StrCat("gemma-generate", r,
                                                                          ".log")));
  }
  // Usually rank 0 says why; when rank 1 checks first and leaves while rank 0 is still
  // joining, rank 0 sees it leave and rank 1 has said why.
  const std::string log0 = testing::ReadFileToString(Temp("gemma-generate0.log"));
  const std::string log1 = testing::ReadFileToString(Temp("gemma-generate1.log"));
  const std::string why = ": --expert-placement " + four + ": the placement is for 4 ranks";
  EXPECT_TRUE(log0.find("rank 0" + why) != std::string::npos ||
              log1.find("rank 1" + why) != std::string::npos)
      << log0 << "\n" << log1;

  // The rest fail before any peer is needed: ranks as threads of one process.
  const std::string dense = "--model=" + testing::GoldenPath("tiny-dense");
  const std::string bad_json = Temp("bad_placement.json");
  std::ofstream(bad_json) << R"({"num_experts": 16, "num_ranks": 2, "slots_per_rank": 8,
    "layers": [[[0, 1, 2, 3, 4, 5, 6, "seven"]]]})";
  struct BadCase {
    std::vector<std::string> flags;
    std::string expected;
  };
  const std::vector<BadCase> cases = {
      {{model, "--tp=2", "--redundant-experts=3"}, "--redundant-experts 3 over 2"},
      {{model, "--tp=2", "--redundant-experts=-1"}, "must not be negative"},
      {{dense, "--tp=2", "--redundant-experts=2"}, "has no experts"},
      {{dense, "--expert-placement=" + four}, "has no experts"},
      {{model, "--tp=2", "--expert-placement=" + Temp("absent.json")}, "absent.json"},
      {{model, "--tp=2", "--expert-placement=" + bad_json}, "layers[0]"},
  };
  for (const BadCase& c : cases) {
    std::vector<std::string> argv = {Tool("gemma-generate"), tokens};
    argv.insert(argv.end(), c.flags.begin(), c.flags.end());
    auto [code, output] = RunOnce(argv);
    EXPECT_GT(code, 0) << absl::StrJoin(c.flags, " ");
    EXPECT_NE(output.find(c.expected), std::string::npos)
        << absl::StrJoin(c.flags, " ") << "\nprinted: " << output;
  }
}

}  // namespace
}  // namespace gemma
