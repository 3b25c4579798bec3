// Stop-string detection over streamed text. Independent of tokens: feed it the pieces a
// StreamDecoder emits and it says which text is safe to show, which must be withheld because
// it may be the start of a stop string, and when a stop string has been completed.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace gemma::tokenizer {

// One per generated sequence; not thread-safe. Matching is on bytes, so a stop string may
// span any number of tokens and begin or end inside a multi-byte character's tokens.
class StopStringMatcher {
 public:
  struct Result {
    std::string release;   // Text that can be emitted now.
    bool stopped = false;  // A stop string was found; `release` ends right before it.
    int stop_index = -1;   // Which stop string (index into the constructor's list).
    size_t held_bytes = 0; // Text withheld after `release` (a possible stop-string prefix).
  };

  // Empty strings in `stop_strings` are ignored.
  explicit StopStringMatcher(std::vector<std::string> stop_strings);

  // Appends `text` to the stream. Once stopped, further calls release nothing. Cost is
  // O(|text| + held) per stop string.
  Result Push(std::string_view text);

  // End of stream without a stop: releases everything still held.
  std::string Flush();

  bool stopped() const { return stopped_; }
  const std::string& held() const { return held_; }

 private:
  std::vector<std::string> stop_strings_;
  size_t max_stop_length_ = 0;
  std::string held_;
  bool stopped_ = false;
};

}  // namespace gemma::tokenizer
