// The command-line tools as users and outside checks call them: real processes, real files.
// gemma-forward's .npy equals the transformers logits; gemma-generate prints the greedy ids;
// bad flags and inputs exit non-zero with a message saying what was wrong.
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/npy.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/compare.h"
#include "tests/testing/tolerances.h"

namespace gemma {
namespace {

struct RunResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr
};

RunResult RunTool(const std::string& tool, const std::string& args) {
  std::string command = absl::StrCat(GEMMA_BINARY_DIR, "/bin/", tool, " ", args, " 2>&1");
  RunResult result;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return result;
  std::array<char, 4096> buffer;
  size_t n;
  while ((n = fread(buffer.data(), 1, buffer.size(), pipe)) > 0) result.output.append(buffer.data(), n);
  int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

nlohmann::json Manifest(const std::string& model) {
  std::ifstream in(testing::GoldenPath(absl::StrCat("reference/", model, "/manifest.json")));
  return nlohmann::json::parse(in);
}

// --help, -h and --helpfull print the usage and exit 0 on every binary, as users of other
// tools expect; an unknown flag still exits non-zero.
TEST(CliTest, HelpExitsZeroOnEveryBinary) {
  int checked = 0;
  for (const char* tool : {"gemma-forward", "gemma-generate", "gemma-tokenize", "gemma-bench",
                           "gemma-engine-bench", "gemma-coordinator", "gemma-worker",
                           "gemmactl"}) {
    if (access(absl::StrCat(GEMMA_BINARY_DIR, "/bin/", tool).c_str(), X_OK) != 0) continue;
    ++checked;
    for (const char* flag : {"--help", "-h", "--helpfull"}) {
      RunResult r = RunTool(tool, flag);
      EXPECT_EQ(r.exit_code, 0) << tool << " " << flag << ": " << r.output;
      EXPECT_TRUE(r.output.starts_with(tool)) << tool << " " << flag << ": " << r.output;
      // The tool's own flags are listed (not "No flags matched").
      EXPECT_EQ(r.output.find("No flags matched"), std::string::npos) << tool << " " << flag;
      EXPECT_NE(r.output.find("Flags from"), std::string::npos) << tool << " " << flag;
    }
    RunResult bad = RunTool(tool, "--no-such-flag=1");
    EXPECT_EQ(bad.exit_code, 1) << tool << ": " << bad.output;
    EXPECT_NE(bad.output.find("no_such_flag"), std::string::npos) << tool << ": " << bad.output;
  }
  EXPECT_GE(checked, 5);
}

TEST(CliTest, ForwardWritesTransformersLogitsAsNpy) {
  nlohmann::json manifest = Manifest("tiny-moe");
  const auto& prompt = manifest["prompts"][4];
  std::vector<int32_t> tokens = prompt["tokens"].get<std::vector<int32_t>>();
  std::string out = absl::StrCat(::testing::TempDir(), "/cli_logits_", getpid(), ".npy");
  RunResult r = RunTool("gemma-forward", absl::StrCat("--model ", testing::GoldenPath("tiny-moe"),
                                                  " --tokens ", absl::StrJoin(tokens, ","),
                                                  " --logits-out ", out, " --threads 2"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto ours = ReadNpy(out);
  ASSERT_TRUE(ours.ok()) << ours.status();
  auto ref = ReadNpy(testing::GoldenPath(
      absl::StrCat("reference/tiny-moe/", prompt["logits"].get<std::string>())));
  ASSERT_TRUE(ref.ok());
  EXPECT_EQ(ours->dtype, DType::kF32);
  EXPECT_EQ(ours->shape, ref->shape);
  auto cmp = testing::Compare(ours->AsFloat(), ref->AsFloat());
  EXPECT_LE(cmp.Relative(), testing::kLogitRelTol) << cmp.ToString();
}

// Also with the KV-cache dtype spelled out (on the CPU, auto and f32 are the same f32 cache)
// and with --enforce-eager (the CPU backend has no graphs: the same steps).
TEST(CliTest, GeneratePrintsGreedyIdsOnOneLine) {
  nlohmann::json manifest = Manifest("tiny-dense");
  const auto& g = manifest["greedy"][1];
  for (const std::string& flags : {std::string(), std::string(" --kv-dtype f32"),
                                   std::string(" --kv-dtype auto"),
                                   std::string(" --enforce-eager")}) {
    RunResult r = RunTool("gemma-generate",
                          absl::StrCat("--model ", testing::GoldenPath("tiny-dense"), " --tokens ",
                                       absl::StrJoin(g["prompt"].get<std::vector<int32_t>>(), ","),
                                       " --max-new-tokens ", g["max_new_tokens"].get<int>(),
                                       flags));
    ASSERT_EQ(r.exit_code, 0) << flags << ": " << r.output;
    EXPECT_EQ(absl::StripAsciiWhitespace(r.output),
              absl::StrJoin(g["output"].get<std::vector<int32_t>>(), " "))
        << flags;
  }
}

TEST(CliTest, RanksAsThreadsGiveTheSameIds) {
  nlohmann::json manifest = Manifest("tiny-moe");
  const auto& g = manifest["greedy"][0];
  const std::string want = absl::StrJoin(g["output"].get<std::vector<int32_t>>(), " ");
  for (const std::string& flags :
       {std::string("--tp 2"), std::string("--tp 4 --check-routing"),
        std::string("--mode dp-ep --ep 2"), std::string("--mode dp-ep --ep 4 --tp 2")}) {
    RunResult r = RunTool("gemma-generate",
                          absl::StrCat("--model ", testing::GoldenPath("tiny-moe"), " --tokens ",
                                       absl::StrJoin(g["prompt"].get<std::vector<int32_t>>(), ","),
                                       " --max-new-tokens ", g["max_new_tokens"].get<int>(), " ",
                                       flags));
    ASSERT_EQ(r.exit_code, 0) << flags << ": " << r.output;
    EXPECT_EQ(absl::StripAsciiWhitespace(r.output), want) << flags;
  }
}

TEST(CliTest, SeededSamplingIsReproducible) {
  std::string args = absl::StrCat("--model ", testing::GoldenPath("tiny-moe"),
                                  " --tokens 2,17,301,42 --max-new-tokens 12 --temperature 1.0 "
                                  "--top-k 50 --top-p 0.9 --seed 7");
  RunResult a = RunTool("gemma-generate", args);
  RunResult b = RunTool("gemma-generate", args);
  ASSERT_EQ(a.exit_code, 0) << a.output;
  EXPECT_EQ(a.output, b.output);
  std::vector<std::string> ids =
      absl::StrSplit(absl::StripAsciiWhitespace(a.output), ' ', absl::SkipEmpty());
  EXPECT_EQ(ids.size(), 12u);
}

struct BadCase {
  std::string tool;
  std::string args;
  std::string expected;  // substring of the error message
};

// gemma-tokenize takes its text (or ids) as arguments as well as on stdin, the same either way;
// --chat, which reads a file, refuses a stray argument (it was ignored: an empty encoding).
TEST(CliTest, TokenizeTakesTextAsArgumentsOrStdin) {
  const std::string tokenizer = testing::GoldenPath("tiny-moe/tokenizer.json");
  const std::string text = absl::StrCat(::testing::TempDir(), "/tokenize_in_", getpid(), ".txt");
  {
    std::ofstream out(text);
    out << "In the beginning";
  }
  RunResult piped = RunTool("gemma-tokenize", absl::StrCat("--tokenizer ", tokenizer,
                                                            " --encode < ", text));
  RunResult argued = RunTool("gemma-tokenize", absl::StrCat("--tokenizer ", tokenizer,
                                                             " --encode 'In the beginning'"));
  ASSERT_EQ(piped.exit_code, 0) << piped.output;
  ASSERT_EQ(argued.exit_code, 0) << argued.output;
  EXPECT_FALSE(absl::StripAsciiWhitespace(piped.output).empty());
  EXPECT_EQ(argued.output, piped.output);
  RunResult decoded = RunTool("gemma-tokenize", absl::StrCat("--tokenizer ", tokenizer,
                                                              " --decode ", piped.output));
  ASSERT_EQ(decoded.exit_code, 0) << decoded.output;
  EXPECT_EQ(decoded.output, "In the beginning");
  RunResult chat = RunTool("gemma-tokenize", absl::StrCat("--tokenizer ", tokenizer,
                                                           " --chat ", text, " stray"));
  EXPECT_EQ(chat.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(chat.output, "unexpected argument \"stray\"")) << chat.output;
}

TEST(CliTest, BadFlagsAndInputsFailWithAClearMessage) {
  const std::string model = testing::GoldenPath("tiny-dense");
  const std::string out = absl::StrCat(::testing::TempDir(), "/unused_", getpid(), ".npy");
  const std::vector<BadCase> cases = {
      {"gemma-forward", absl::StrCat("--tokens 2,3 --logits-out ", out), "--model"},
      {"gemma-forward", absl::StrCat("--model ", model, " --tokens 2,3"), "--logits-out"},
      {"gemma-forward", absl::StrCat("--model ", model, " --logits-out ", out), "--tokens"},
      {"gemma-forward", absl::StrCat("--model ", model, " --tokens 2,x,3 --logits-out ", out),
       "\"x\""},
      {"gemma-forward", absl::StrCat("--model ", model, " --tokens 2,999999 --logits-out ", out),
       "outside the vocabulary"},
      {"gemma-forward", absl::StrCat("--model /nonexistent --tokens 2 --logits-out ", out),
       "/nonexistent"},
      {"gemma-generate", absl::StrCat("--model ", model, " --tokens 2 --temperature -1"),
       "--temperature"},
      {"gemma-generate", absl::StrCat("--model ", model, " --tokens 2 --top-p 0"), "--top-p"},
      {"gemma-generate", absl::StrCat("--model ", model, " --tokens 2 --top-p 1.5"), "--top-p"},
      {"gemma-generate", absl::StrCat("--model ", model, " --tokens 2 --top-k -3"), "--top-k"},
      {"gemma-generate", absl::StrCat("--model ", model, " --tokens 2 --max-new-tokens -1"),
       "--max-new-tokens"},
      {"gemma-generate", absl::StrCat("--model ", model, " --tokens 2 --no-such-flag"),
       "no_such_flag"},
      {"gemma-generate", absl::StrCat("--model ", model, " --tokens 2 --data-plane mpi"),
       "--data-plane \"mpi\" is not one of auto, nccl, gloo"},
      {"gemma-generate",
       absl::StrCat("--model ", model,
                    " --tokens 2 --data-plane nccl --world-size 2 --rank 0 --rendezvous "
                    "127.0.0.1:1"),
       "--data-plane nccl needs --backend cuda"},
      {"gemma-generate",
       absl::StrCat("--model ", model, " --tokens 2 --backend cuda --data-plane nccl --tp 2"),
       "--data-plane nccl needs ranks as processes"},
      // The CPU backend is the fp32 reference: no bf16 cache there.
      {"gemma-generate", absl::StrCat("--model ", model, " --tokens 2 --kv-dtype bf16"),
       "--kv-dtype bf16 needs --backend cuda"},
      {"gemma-generate", absl::StrCat("--model ", model, " --tokens 2 --kv-dtype f16"),
       "--kv-dtype \"f16\" is not one of auto, f32, bf16"},
  };
  for (const BadCase& c : cases) {
    RunResult r = RunTool(c.tool, c.args);
    EXPECT_NE(r.exit_code, 0) << c.tool << " " << c.args;
    EXPECT_NE(r.output.find(c.expected), std::string::npos)
        << c.tool << " " << c.args << "\nprinted: " << r.output;
  }
}

}  // namespace
}  // namespace gemma
