// Streaming detokenization that holds back byte-fallback runs until they end.
#include "common/tokenizer/stream_decoder.h"

#include "glog/logging.h"
#include "common/tokenizer/unicode.h"

namespace gemma::tokenizer {

StreamDecoder::StreamDecoder(const Tokenizer* tokenizer, DecodeOptions options)
    : tokenizer_(tokenizer), options_(options) {
  CHECK(tokenizer_ != nullptr) << "StreamDecoder needs a tokenizer";
}

void StreamDecoder::FlushBytes(std::string* out) {
  if (pending_bytes_.empty()) return;
  if (IsValidUtf8(pending_bytes_)) {
    out->append(pending_bytes_);
  } else {
    for (size_t i = 0; i < pending_bytes_.size(); ++i) out->append(kReplacementChar);
  }
  pending_bytes_.clear();
}

std::string StreamDecoder::Push(int32_t id) {
  const Tokenizer::Piece& piece = tokenizer_->DecoderPiece(id);
  std::string out;
  if (!piece.known || (options_.skip_special_tokens && piece.special)) return out;
  if (piece.byte >= 0) {
    if (run_broken_) return std::string(kReplacementChar);
    pending_bytes_.push_back(static_cast<char>(piece.byte));
    if (!IsUtf8Prefix(pending_bytes_)) {
      // Decode() will give one U+FFFD per byte of this run, whatever follows in it.
      for (size_t i = 0; i < pending_bytes_.size(); ++i) out.append(kReplacementChar);
      pending_bytes_.clear();
      run_broken_ = true;
    }
    return out;
  }
  run_broken_ = false;
  FlushBytes(&out);
  out.append(piece.text);
  return out;
}

std::string StreamDecoder::Finish() {
  run_broken_ = false;
  std::string out;
  FlushBytes(&out);
  return out;
}

}  // namespace gemma::tokenizer
