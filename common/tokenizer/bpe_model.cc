// BPE encoding with a merge-priority heap, matching the Hugging Face `tokenizers` BPE model.
#include "common/tokenizer/bpe_model.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/tokenizer/unicode.h"

namespace gemma::tokenizer {
namespace {

absl::Status Invalid(std::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: ", AsAbsl(what)));
}

// Reads an optional string field; null and absent both mean "not set".
bool HasNonEmptyString(const nlohmann::json& obj, const char* key) {
  auto it = obj.find(key);
  return it != obj.end() && it->is_string() && !it->get<std::string>().empty();
}

bool BoolField(const nlohmann::json& obj, const char* key, bool fallback) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return fallback;
  return it->is_boolean() ? it->get<bool>() : fallback;
}

}  // namespace

absl::StatusOr<BpeModel> BpeModel::FromJson(const nlohmann::json& model) {
  if (!model.is_object()) return Invalid("\"model\" is missing or not an object");
  auto type = model.find("type");
  if (type == model.end() || !type->is_string()) {
    return Invalid("\"model\" has no \"type\"");
  }
  if (*type != "BPE") {
    return absl::UnimplementedError(
        absl::StrCat("tokenizer.json: model type ", type->get<std::string>(),
                     " is not supported (only BPE)"));
  }
  auto dropout = model.find("dropout");
  if (dropout != model.end() && !dropout->is_null()) {
    return absl::UnimplementedError("tokenizer.json: BPE dropout is not supported");
  }
  if (HasNonEmptyString(model, "continuing_subword_prefix")) {
    return absl::UnimplementedError(
        "tokenizer.json: BPE continuing_subword_prefix is not supported");
  }
  if (HasNonEmptyString(model, "end_of_word_suffix")) {
    return absl::UnimplementedError("tokenizer.json: BPE end_of_word_suffix is not supported");
  }

  BpeModel bpe;
  bpe.fuse_unk_ = BoolField(model, "fuse_unk", false);
  bpe.byte_fallback_ = BoolField(model, "byte_fallback", false);
  bpe.ignore_merges_ = BoolField(model, "ignore_merges", false);

  auto vocab = model.find("vocab");
  if (vocab == model.end() || !vocab->is_object()) {
    return Invalid("BPE model has no \"vocab\" object");
  }
  int64_t max_id = -1;
  for (auto it = vocab->begin(); it != vocab->end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
        it.value().get<int64_t>() > kMaxTokenId) {
      return Invalid(absl::StrCat("vocab entry \"", it.key(),
                                  "\" has no valid id (an integer in [0, ", kMaxTokenId, "])"));
    }
    max_id = std::max<int64_t>(max_id, it.value().get<int64_t>());
  }
  bpe.id_to_token_.resize(max_id + 1);
  bpe.has_id_.assign(max_id + 1, false);
  bpe.vocab_.reserve(vocab->size());
  for (auto it = vocab->begin(); it != vocab->end(); ++it) {
    const auto id = static_cast<int32_t>(it.value().get<int64_t>());
    if (bpe.has_id_[id]) {
      return Invalid(absl::StrCat("duplicate id ", id, " in vocab (\"", bpe.id_to_token_[id],
                                  "\" and \"", it.key(), "\")"));
    }
    bpe.has_id_[id] = true;
    bpe.id_to_token_[id] = it.key();
    bpe.vocab_.emplace(it.key(), id);
  }

  bpe.char_ids_.assign(kDirectChars, -1);
  for (const auto& [token, id] : bpe.vocab_) {
    const size_t len = WellFormedSequenceLength(token, 0);
    if (!token.empty() && len == token.size()) {
      const uint32_t cp = DecodeSequence(token, 0, len);
      if (cp < kDirectChars) bpe.char_ids_[cp] = id;
    }
  }
  bpe.all_bytes_present_ = true;
  for (int b = 0; b < 256; ++b) {
    bpe.byte_ids_[b] = bpe.TokenToId(absl::StrFormat("<0x%02X>", b));
    if (bpe.byte_ids_[b] < 0) bpe.all_bytes_present_ = false;
  }

  auto unk = model.find("unk_token");
  if (unk != model.end() && unk->is_string()) {
    bpe.unk_id_ = bpe.TokenToId(unk->get<std::string>());
    if (bpe.unk_id_ < 0) {
      return Invalid(absl::StrCat("unk_token \"", unk->get<std::string>(),
                                  "\" is not in the vocab"));
    }
  }

  auto merges = model.find("merges");
  if (merges == model.end() || !merges->is_array()) {
    return Invalid("BPE model has no \"merges\" array");
  }
  bpe.merges_.reserve(merges->size());
  int32_t rank = 0;
  for (const auto& merge : *merges) {
    std::string left, right;
    if (merge.is_string()) {
      const std::string& s = merge.get_ref<const std::string&>();
      const size_t space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
        return Invalid(absl::StrCat("merge ", rank, " \"", s, "\" is not \"LEFT RIGHT\""));
      }
      left = s.substr(0, space);
      right = s.substr(space + 1);
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
               merge[1].is_string()) {
      left = merge[0].get<std::string>();
      right = merge[1].get<std::string>();
    } else {
      return Invalid(absl::StrCat("merge ", rank, " is neither a string nor a pair"));
    }
    const int32_t left_id = bpe.TokenToId(left);
    const int32_t right_id = bpe.TokenToId(right);
    const int32_t new_id = bpe.TokenToId(left + right);
    if (left_id < 0 || right_id < 0 || new_id < 0) {
      return Invalid(absl::StrCat("merge ", rank, " (\"", left, "\", \"", right,
                                  "\") names a token that is not in the vocab"));
    }
    bpe.merges_.try_emplace(PairKey(left_id, right_id), Merge{rank, new_id});
    ++rank;
  }
  return bpe;
}

int32_t BpeModel::TokenToId(std::string_view token) const {
  auto it = vocab_.find(AsAbsl(token));
  return it == vocab_.end() ? -1 : it->second;
}

const std::string* BpeModel::IdToToken(int32_t id) const {
  if (id < 0 || id >= id_limit() || !has_id_[id]) return nullptr;
  return &id_to_token_[id];
}

int32_t BpeModel::CharToId(uint32_t cp, std::string_view text) const {
  if (cp < kDirectChars) return char_ids_[cp];
  return TokenToId(text);
}

void BpeModel::Tokenize(std::string_view piece, std::vector<int32_t>* ids) const {
  if (piece.empty()) return;
  if (ignore_merges_) {
    const int32_t whole = TokenToId(piece);
    if (whole >= 0) {
      ids->push_back(whole);
      return;
    }
  }

  // Initial symbols: one per character, or its byte tokens, or (fused) <unk>.
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool alive;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(piece.size());
  auto add = [&](int32_t id) {
    const auto index = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, index - 1, index + 1, true});
  };
  bool pending_unk = false;
  size_t pos = 0;
  while (pos < piece.size()) {
    size_t len = WellFormedSequenceLength(piece, pos);
    if (len == 0) len = 1;  // Callers pass valid UTF-8; be safe on stray bytes.
    const uint32_t cp = DecodeSequence(piece, pos, len);
    const int32_t id = CharToId(cp, piece.substr(pos, len));
    if (id >= 0) {
      if (pending_unk) {
        add(unk_id_);
        pending_unk = false;
      }
      add(id);
    } else {
      bool bytes_ok = byte_fallback_ && all_bytes_present_;
      if (byte_fallback_ && !all_bytes_present_) {
        bytes_ok = true;
        for (size_t i = 0; i < len; ++i) {
          if (byte_ids_[static_cast<uint8_t>(piece[pos + i])] < 0) bytes_ok = false;
        }
      }
      if (bytes_ok) {
        // As in the reference, a pending <unk> is not flushed before byte tokens.
        for (size_t i = 0; i < len; ++i) add(byte_ids_[static_cast<uint8_t>(piece[pos + i])]);
      } else if (unk_id_ >= 0) {
        if (pending_unk && !fuse_unk_) add(unk_id_);
        pending_unk = true;
      }
    }
    pos += len;
  }
  if (pending_unk) add(unk_id_);
  if (symbols.empty()) return;
  symbols.back().next = -1;

  // Candidate merges ordered by (rank, position); stale entries are skipped when popped.
  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t new_id;
  };
  auto later = [](const Candidate& a, const Candidate& b) {
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
  };
  std::vector<Candidate> heap;
  heap.reserve(symbols.size());
  auto consider = [&](int32_t left) {
    const int32_t right = symbols[left].next;
    if (right < 0) return;
    auto it = merges_.find(PairKey(symbols[left].id, symbols[right].id));
    if (it == merges_.end()) return;
    heap.push_back({it->second.rank, left, it->second.new_id});
    std::push_heap(heap.begin(), heap.end(), later);
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(symbols.size()); ++i) {
    auto it = merges_.find(PairKey(symbols[i].id, symbols[i + 1].id));
    if (it != merges_.end()) heap.push_back({it->second.rank, i, it->second.new_id});
  }
  std::make_heap(heap.begin(), heap.end(), later);

  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later);
    const Candidate top = heap.back();
    heap.pop_back();
    Symbol& left = symbols[top.pos];
    if (!left.alive || left.next < 0) continue;
    Symbol& right = symbols[left.next];
    auto it = merges_.find(PairKey(left.id, right.id));
    if (it == merges_.end() || it->second.new_id != top.new_id) continue;
    left.id = top.new_id;
    right.alive = false;
    left.next = right.next;
    if (left.next >= 0) symbols[left.next].prev = top.pos;
    if (left.prev >= 0) consider(left.prev);
    consider(top.pos);
  }
  for (int32_t i = 0; i >= 0; i = symbols[i].next) ids->push_back(symbols[i].id);
}

}  // namespace gemma::tokenizer
