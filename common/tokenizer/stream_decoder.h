// Incremental detokenization for streaming generation: turns ids into text one at a time,
// emitting only valid UTF-8 and never text that a later token could change. Concatenating
// everything Push() and Finish() return equals Tokenizer::Decode() of the whole sequence.
#pragma once

#include <cstdint>
#include <string>

#include "common/tokenizer/tokenizer.h"

namespace gemma::tokenizer {

// One per generated sequence; not thread-safe. The tokenizer must outlive it.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer* tokenizer, DecodeOptions options = {});

  // Returns the text that `id` completes (possibly empty). A run of byte-fallback tokens is
  // held back until the next non-byte token or Finish(): the decoder turns a run into text
  // as a whole, and one invalid byte anywhere in it turns every byte of it into U+FFFD. So a
  // run is held only while it can still become valid UTF-8: once no later byte can mend it,
  // its bytes so far and every further byte of it come out at once as U+FFFD each (a model
  // repeating a stray continuation byte streams instead of stalling to the end).
  std::string Push(int32_t id);

  // Returns whatever is still held; the decoder is then ready for a new sequence.
  std::string Finish();

  // Bytes currently held back.
  size_t held_bytes() const { return pending_bytes_.size(); }

 private:
  void FlushBytes(std::string* out);

  const Tokenizer* tokenizer_;
  DecodeOptions options_;
  std::string pending_bytes_;
  bool run_broken_ = false;  // the current byte run can no longer be valid UTF-8
};

}  // namespace gemma::tokenizer
