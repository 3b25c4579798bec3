#include "worker/cli/cli_common.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace gemma::cli {

absl::StatusOr<std::vector<int32_t>> ParseTokenList(absl::string_view text) {
  std::vector<int32_t> ids;
  if (absl::StripAsciiWhitespace(text).empty()) {
    return absl::InvalidArgumentError("--tokens is empty; give comma-separated ids, e.g. 2,17,301");
  }
  int index = 0;
  for (absl::string_view item : absl::StrSplit(text, ',')) {
    item = absl::StripAsciiWhitespace(item);
    int32_t id = 0;
    if (!absl::SimpleAtoi(item, &id) || id < 0) {
      return absl::InvalidArgumentError(absl::StrCat("--tokens item ", index, " (\"", item,
                                                     "\") is not a non-negative integer id"));
    }
    ids.push_back(id);
    ++index;
  }
  return ids;
}

}  // namespace gemma::cli
