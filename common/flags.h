// Command-line flags as every binary reads them. Flags are documented with dashes
// ("--max-tokens") and defined with underscores (Abseil's FLAGS_max_tokens); --help (also -h,
// --helpfull, --helpshort) prints the usage and exits 0, as users of other tools expect
// (Abseil's own handling exits 1).
#pragma once

#include <vector>

namespace gemma {

// Rewrites "--some-flag[=value]" as "--some_flag[=value]" in place; the value keeps its
// dashes, and nothing after a bare "--" is touched.
void NormalizeFlagDashes(int argc, char** argv);

// Normalizes the dashes, answers the help flags (printing absl::ProgramUsageMessage() and the
// flags, then exiting 0), and parses the rest with absl::ParseCommandLine (an unknown flag or a
// bad value prints the error and exits 1). Returns the positional arguments, argv[0] first.
std::vector<char*> ParseFlags(int argc, char** argv);

}  // namespace gemma
