#include "common/tokenizer/split_pre_tokenizer.h"

#include <cstddef>

namespace gemma::tokenizer {
namespace {

struct Span {
  size_t start, end;
  bool match;
};

}  // namespace

std::optional<SplitBehavior> ParseSplitBehavior(std::string_view name) {
  if (name == "Removed") return SplitBehavior::kRemoved;
  if (name == "Isolated") return SplitBehavior::kIsolated;
  if (name == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (name == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (name == "Contiguous") return SplitBehavior::kContiguous;
  return std::nullopt;
}

void ApplySplit(const SplitRule& rule, std::string_view text,
                std::vector<std::string_view>* pieces) {
  if (text.empty()) return;
  // Every occurrence is a span of its own; the stretches between them are non-matches.
  std::vector<Span> spans;
  if (rule.pattern.empty()) {
    spans.push_back({0, text.size(), false});
  } else {
    size_t prev = 0;
    for (size_t at = text.find(rule.pattern); at != std::string_view::npos;
         at = text.find(rule.pattern, prev)) {
      if (prev < at) spans.push_back({prev, at, false});
      prev = at + rule.pattern.size();
      spans.push_back({at, prev, true});
    }
    if (prev < text.size()) spans.push_back({prev, text.size(), false});
  }
  if (rule.invert) {
    for (Span& s : spans) s.match = !s.match;
  }

  // The pieces, each (start, end, removed).
  std::vector<Span> out;
  bool previous_match = false;
  switch (rule.behavior) {
    case SplitBehavior::kRemoved:
    case SplitBehavior::kIsolated:
      out = spans;
      if (rule.behavior == SplitBehavior::kIsolated) {
        for (Span& s : out) s.match = false;
      }
      break;
    case SplitBehavior::kMergedWithPrevious:
      // A match joins the piece before it, unless that piece ended in a match.
      for (const Span& s : spans) {
        if (s.match && !previous_match && !out.empty()) {
          out.back().end = s.end;
        } else {
          out.push_back({s.start, s.end, false});
        }
        previous_match = s.match;
      }
      break;
    case SplitBehavior::kMergedWithNext:
      // The mirror image: walking from the end, a match joins the piece after it.
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->match && !previous_match && !out.empty()) {
          out.back().start = it->start;
        } else {
          out.push_back({it->start, it->end, false});
        }
        previous_match = it->match;
      }
      for (size_t i = 0, j = out.size(); i + 1 < j; ++i, --j) std::swap(out[i], out[j - 1]);
      break;
    case SplitBehavior::kContiguous:
      // Runs of spans of one kind become one piece.
      for (const Span& s : spans) {
        if (s.match == previous_match && !out.empty()) {
          out.back().end = s.end;
        } else {
          out.push_back({s.start, s.end, false});
        }
        previous_match = s.match;
      }
      break;
  }
  for (const Span& s : out) {
    if (s.match || s.start == s.end) continue;  // `match` marks what Removed drops
    pieces->push_back(text.substr(s.start, s.end - s.start));
  }
}

}  // namespace gemma::tokenizer
