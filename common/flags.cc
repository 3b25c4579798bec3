#include "common/flags.h"

#include <cstdlib>
#include <cstring>
#include <iostream>

#include "absl/flags/internal/program_name.h"
#include "absl/flags/internal/usage.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"

namespace gemma {

void NormalizeFlagDashes(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    char* arg = argv[i];
    if (arg[0] != '-' || arg[1] != '-') continue;
    if (arg[2] == '\0') break;  // "--": the rest are positional
    for (char* p = arg + 2; *p != '\0' && *p != '='; ++p) {
      if (*p == '-') *p = '_';
    }
  }
}

std::vector<char*> ParseFlags(int argc, char** argv) {
  NormalizeFlagDashes(argc, argv);
  using absl::flags_internal::HelpMode;
  HelpMode help = HelpMode::kNone;
  for (int i = 1; i < argc; ++i) {
    const char* arg = argv[i];
    if (std::strcmp(arg, "--") == 0) break;
    if (std::strcmp(arg, "-h") == 0 || std::strcmp(arg, "--help") == 0 ||
        std::strcmp(arg, "-help") == 0) {
      help = HelpMode::kImportant;
    } else if (std::strcmp(arg, "--helpshort") == 0) {
      help = HelpMode::kShort;
    } else if (std::strcmp(arg, "--helpfull") == 0) {
      help = HelpMode::kFull;
    }
  }
  if (help != HelpMode::kNone) {
    absl::flags_internal::SetProgramInvocationName(argv[0]);
    // --help and --helpshort list this project's flags (Abseil's default keeps only those of a
    // file named like the program, which ours are not); --helpfull adds Abseil's own.
    absl::FlagsUsageConfig config;
    auto ours = [](absl::string_view file) {
      return !absl::StartsWith(file, "absl/") && !absl::StrContains(file, "/absl/");
    };
    config.contains_helpshort_flags = ours;
    config.contains_help_flags = ours;
    absl::SetFlagsUsageConfig(config);
    absl::flags_internal::SetFlagsHelpMode(help);
    absl::flags_internal::HandleUsageFlags(std::cout, absl::ProgramUsageMessage());
    std::cout << std::flush;
    std::exit(0);
  }
  return absl::ParseCommandLine(argc, argv);
}

}  // namespace gemma
