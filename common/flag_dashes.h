// Flags are documented with dashes ("--max-tokens") and defined with underscores (Abseil's
// FLAGS_max_tokens): every main() rewrites its arguments before parsing them.
#pragma once

namespace gemma {

// Rewrites "--some-flag[=value]" as "--some_flag[=value]" in place; the value keeps its
// dashes, and nothing after a bare "--" is touched.
void NormalizeFlagDashes(int argc, char** argv);

}  // namespace gemma
