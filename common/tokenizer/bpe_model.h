// The BPE model of a Hugging Face tokenizer.json ("model": {"type": "BPE", ...}): vocabulary,
// ranked merges, byte fallback and unknown-token fusing. Turns one normalized piece of text
// into ids; knows nothing of added tokens, normalizers or decoders.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace gemma::tokenizer {

// The largest token id a tokenizer.json may use (Gemma 4's vocabulary is 262,144): tables are
// indexed by id, so one huge id in a hostile file would otherwise size them to gigabytes.
inline constexpr int64_t kMaxTokenId = (int64_t{1} << 24) - 1;

class BpeModel {
 public:
  // Parses the "model" object. Refuses options we do not implement (dropout, subword
  // prefixes/suffixes) and malformed content: duplicate ids, merges naming unknown tokens.
  static absl::StatusOr<BpeModel> FromJson(const nlohmann::json& model);

  // Appends the ids of `piece` (valid UTF-8, already normalized) to `ids`. Merges are applied
  // lowest rank first, leftmost first among equals, with a binary heap: O(n log n) in the
  // length of the piece. Thread-safe (const).
  void Tokenize(std::string_view piece, std::vector<int32_t>* ids) const;

  // -1 if absent.
  int32_t TokenToId(std::string_view token) const;
  // nullptr if `id` is not in the vocabulary.
  const std::string* IdToToken(int32_t id) const;
  // One past the largest id.
  int32_t id_limit() const { return static_cast<int32_t>(id_to_token_.size()); }
  int32_t unk_id() const { return unk_id_; }

 private:
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };
  static uint64_t PairKey(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }
  int32_t CharToId(uint32_t cp, std::string_view text) const;

  absl::flat_hash_map<std::string, int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> has_id_;
  absl::flat_hash_map<uint64_t, Merge> merges_;
  // Ids of single-character tokens for code points below kDirectChars; -1 when absent.
  static constexpr uint32_t kDirectChars = 0x10000;
  std::vector<int32_t> char_ids_;
  int32_t byte_ids_[256];
  bool all_bytes_present_ = false;
  int32_t unk_id_ = -1;
  bool fuse_unk_ = false;
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
};

}  // namespace gemma::tokenizer
