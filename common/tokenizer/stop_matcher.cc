// Stop-string matching with a held-back tail for partial matches.
#include "common/tokenizer/stop_matcher.h"

#include <algorithm>
#include <utility>

namespace gemma::tokenizer {

StopStringMatcher::StopStringMatcher(std::vector<std::string> stop_strings) {
  for (std::string& stop : stop_strings) {
    max_stop_length_ = std::max(max_stop_length_, stop.size());
    stop_strings_.push_back(std::move(stop));
  }
}

StopStringMatcher::Result StopStringMatcher::Push(std::string_view text) {
  Result result;
  if (stopped_) return result;
  held_.append(text);

  // The earliest complete occurrence of any stop string wins; ties go to the longer one.
  size_t best_pos = std::string::npos;
  int best_index = -1;
  for (size_t i = 0; i < stop_strings_.size(); ++i) {
    const std::string& stop = stop_strings_[i];
    if (stop.empty()) continue;
    const size_t pos = held_.find(stop);
    if (pos == std::string::npos) continue;
    if (pos < best_pos ||
        (pos == best_pos && stop.size() > stop_strings_[best_index].size())) {
      best_pos = pos;
      best_index = static_cast<int>(i);
    }
  }
  if (best_index >= 0) {
    result.release = held_.substr(0, best_pos);
    result.stopped = true;
    result.stop_index = best_index;
    held_.clear();
    stopped_ = true;
    return result;
  }

  // Withhold the longest suffix that is a proper prefix of some stop string.
  size_t keep = 0;
  const size_t limit = std::min(held_.size(), max_stop_length_ == 0 ? 0 : max_stop_length_ - 1);
  for (size_t len = limit; len > 0 && keep == 0; --len) {
    const std::string_view tail = std::string_view(held_).substr(held_.size() - len);
    for (const std::string& stop : stop_strings_) {
      if (stop.size() > len && std::string_view(stop).substr(0, len) == tail) {
        keep = len;
        break;
      }
    }
  }
  result.release = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  result.held_bytes = keep;
  return result;
}

std::string StopStringMatcher::Flush() {
  std::string out = std::move(held_);
  held_.clear();
  return out;
}

}  // namespace gemma::tokenizer
