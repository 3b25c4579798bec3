// A Hugging Face tokenizer.json reader and encoder/decoder for Gemma-style pipelines: the BPE
// model with byte fallback, the Replace normalizer, added and special tokens, an optional
// TemplateProcessing post-processor, and the Replace/ByteFallback/Fuse decoder chain. Output
// is identical to the `tokenizers` library's. Knows nothing about chat formats or models.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/tokenizer/bpe_model.h"
#include "common/tokenizer/split_pre_tokenizer.h"

namespace gemma::tokenizer {

// A token matched in the text before BPE runs ("added_tokens" in tokenizer.json).
struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool special = false;     // Skipped by Decode(skip_special_tokens); see split_special_tokens.
  bool lstrip = false;      // Also swallows the whitespace on its left.
  bool rstrip = false;      // Also swallows the whitespace on its right.
  bool normalized = false;  // Matched against the normalized text rather than the raw text.
};

struct EncodeOptions {
  // Apply the post-processor (Gemma: prepend <bos>). The `tokenizers` library's encode()
  // defaults to true; chat prompts already contain <bos> and must use false.
  bool add_special_tokens = false;
  // Treat special added tokens in the text as plain text (the library's
  // `encode_special_tokens`). Use it for untrusted user text.
  bool split_special_tokens = false;
  // Byte ranges [begin, end) of the text, sorted and disjoint, in which no special added token
  // is read: a chat prompt's message contents, so that a user cannot open or close turns by
  // typing "<|turn>". Elsewhere special tokens are read as usual. The text must be valid
  // UTF-8 (offsets would move in the repair).
  std::vector<std::pair<size_t, size_t>> plain_ranges = {};
};

struct DecodeOptions {
  bool skip_special_tokens = false;
};

class Tokenizer {
 public:
  // Parses tokenizer.json text. Errors name the offending component or entry: a pipeline
  // component we do not implement is refused (UNIMPLEMENTED), malformed content is
  // INVALID_ARGUMENT.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(std::string_view json_text);
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromFile(const std::string& path);

  // Encodes text. Invalid UTF-8 is first repaired as Python's decode(errors="replace")
  // does (each maximal ill-formed subpart becomes U+FFFD). Thread-safe (const); linear in
  // the number of added-token candidates plus O(n log n) BPE.
  std::vector<int32_t> Encode(std::string_view text, const EncodeOptions& options = {}) const;
  // A text prompt for a Gemma model, which expects <bos> first: Encode with the post-processor's
  // template when that template starts with <bos>; else (transformers 5 saves Gemma tokenizers
  // with a template that adds nothing and adds <bos> itself, add_bos_token) <bos> is put in
  // front, so both forms of a file give the same ids (a text that itself begins with "<bos>"
  // gets two, as with HF). Without a <bos> token in the vocabulary, Encode with the template.
  std::vector<int32_t> EncodePrompt(std::string_view text) const;

  // Decodes ids to text. Unknown ids are skipped, as in the library. The result is valid
  // UTF-8: a run of byte-fallback tokens that is not valid UTF-8 as a whole decodes to one
  // U+FFFD per byte.
  std::string Decode(absl::Span<const int32_t> ids, const DecodeOptions& options = {}) const;

  // Token string for `id` (added tokens first, then the model), or nullptr.
  const std::string* IdToToken(int32_t id) const;
  // -1 if absent.
  int32_t TokenToId(std::string_view token) const;
  bool IsSpecial(int32_t id) const;
  // One past the largest id of the model or the added tokens.
  int32_t vocab_size() const { return vocab_size_; }
  const std::vector<AddedToken>& added_tokens() const { return added_tokens_; }

  // Decoder view of one id, used by Decode and StreamDecoder: either a raw byte (from a
  // byte-fallback token) or text. `known` is false for ids outside the vocabulary.
  struct Piece {
    bool known = false;
    bool special = false;
    int16_t byte = -1;  // 0..255 for a byte-fallback token, else -1.
    std::string text;   // The token after the decoder's per-token steps.
  };
  const Piece& DecoderPiece(int32_t id) const;

 private:
  Tokenizer() = default;
  absl::Status Init(std::string_view json_text);

  // A byte trie over added-token contents; finds the longest token starting at a position.
  class Matcher {
   public:
    void Add(std::string_view content, int32_t token_index);
    bool empty() const { return nodes_.size() <= 1; }
    // Index into added_tokens_ of the longest token starting at text[pos], and its length.
    bool LongestAt(std::string_view text, size_t pos, int32_t* token_index,
                   size_t* length) const;
    bool MayStartWith(uint8_t byte) const { return first_bytes_[byte]; }

   private:
    struct Node {
      std::vector<std::pair<uint8_t, int32_t>> children;
      int32_t token_index = -1;
    };
    std::vector<Node> nodes_{1};
    bool first_bytes_[256] = {};
  };

  // Appends the ids of `text` (between added tokens of the raw pass) to `ids`.
  void EncodeRawSegment(std::string_view text, const EncodeOptions& options,
                        std::vector<int32_t>* ids) const;
  void EncodeNormalizedSegment(std::string_view normalized, const EncodeOptions& options,
                               std::vector<int32_t>* ids) const;
  // Splits `text` at added tokens of `matcher`, calling on_text for the spans in between.
  template <typename OnText>
  void SplitOnAddedTokens(std::string_view text, const Matcher& matcher,
                          const EncodeOptions& options, std::vector<int32_t>* ids,
                          OnText on_text) const;
  std::string Normalize(std::string_view text) const;

  BpeModel model_;
  std::vector<AddedToken> added_tokens_;
  absl::flat_hash_map<std::string, int32_t> added_by_content_;
  absl::flat_hash_map<int32_t, int32_t> added_by_id_;  // id -> index into added_tokens_
  Matcher raw_matcher_;
  Matcher normalized_matcher_;
  // Normalizer: a sequence of literal replacements applied in order (empty: none).
  std::vector<std::pair<std::string, std::string>> replacements_;
  // Pre-tokenizer: Split rules applied in order to each normalized stretch (empty: none).
  std::vector<SplitRule> split_rules_;
  // Post-processor template for single sequences: ids before and after the text.
  std::vector<int32_t> prefix_ids_;
  std::vector<int32_t> suffix_ids_;
  // Decoder: per-token literal replacements before ByteFallback; whether ByteFallback runs.
  std::vector<std::pair<std::string, std::string>> decoder_replacements_;
  bool decoder_byte_fallback_ = false;
  std::vector<Piece> pieces_;
  Piece unknown_piece_;
  int32_t vocab_size_ = 0;
};

}  // namespace gemma::tokenizer
