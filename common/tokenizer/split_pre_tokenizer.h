// The `Split` pre-tokenizer of Hugging Face `tokenizers` for literal (String) patterns: the text
// is cut at every non-overlapping occurrence of the pattern, left to right, into alternating
// stretches of matches and non-matches; `invert` swaps which stretches count as matches; the
// behaviour then decides what happens to the matches (dropped, kept alone, glued to the stretch
// before or after, or runs of equal kind joined), and empty pieces are dropped. transformers 5
// writes Split(" ", MergedWithPrevious) into every GemmaTokenizer's tokenizer.json.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace gemma::tokenizer {

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct SplitRule {
  std::string pattern;  // literal; empty: the text stays whole
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
};

// A behaviour as tokenizers names it in tokenizer.json ("MergedWithPrevious"); nullopt if
// unknown.
std::optional<SplitBehavior> ParseSplitBehavior(std::string_view name);

// Appends the pieces of `text` under `rule` to `pieces`, in order, as views into `text`.
void ApplySplit(const SplitRule& rule, std::string_view text,
                std::vector<std::string_view>* pieces);

}  // namespace gemma::tokenizer
