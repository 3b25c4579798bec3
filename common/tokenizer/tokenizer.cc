// tokenizer.json loading, added-token splitting, normalization, encoding and decoding.
#include "common/tokenizer/tokenizer.h"

#include <fstream>
#include <optional>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/tokenizer/unicode.h"

namespace gemma::tokenizer {
namespace {

using nlohmann::json;

absl::Status Invalid(std::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: ", AsAbsl(what)));
}

absl::Status Unsupported(std::string_view component, std::string_view type) {
  return absl::UnimplementedError(absl::StrCat("tokenizer.json: ", AsAbsl(component), " \"", AsAbsl(type),
                                               "\" is not supported"));
}

std::string TypeOf(const json& obj) {
  auto it = obj.find("type");
  return it != obj.end() && it->is_string() ? it->get<std::string>() : std::string("?");
}

// The steps of a normalizer, pre-tokenizer or decoder: the list of a Sequence, else the node.
absl::StatusOr<std::vector<json>> StepsOf(const json& node, const char* list_key,
                                          std::string_view component) {
  if (TypeOf(node) != "Sequence") return std::vector<json>{node};
  auto list = node.find(list_key);
  if (list == node.end() || !list->is_array()) {
    return Invalid(absl::StrCat(AsAbsl(component), " Sequence has no \"", list_key,
                                "\" array"));
  }
  return std::vector<json>(list->begin(), list->end());
}

bool BoolField(const json& obj, const char* key, bool fallback) {
  auto it = obj.find(key);
  return it != obj.end() && it->is_boolean() ? it->get<bool>() : fallback;
}

// Reads a Replace component ({"pattern": {"String": s}, "content": c}) of `component`.
absl::StatusOr<std::pair<std::string, std::string>> ParseReplace(const json& obj,
                                                                 std::string_view component) {
  auto pattern = obj.find("pattern");
  auto content = obj.find("content");
  if (pattern == obj.end() || !pattern->is_object() || content == obj.end() ||
      !content->is_string()) {
    return Invalid(absl::StrCat(AsAbsl(component), " Replace needs \"pattern\" and \"content\""));
  }
  auto literal = pattern->find("String");
  if (literal == pattern->end() || !literal->is_string()) {
    return absl::UnimplementedError(absl::StrCat(
        "tokenizer.json: ", AsAbsl(component), " Replace with a Regex pattern is not supported"));
  }
  if (literal->get<std::string>().empty()) {
    return Invalid(absl::StrCat(AsAbsl(component), " Replace has an empty pattern"));
  }
  return std::make_pair(literal->get<std::string>(), content->get<std::string>());
}

// Replaces every occurrence of `from` (non-overlapping, left to right) with `to`.
std::string ReplaceAll(std::string_view text, std::string_view from, std::string_view to) {
  std::string out;
  out.reserve(text.size() + text.size() / 4);
  if (from.size() == 1) {
    const char c = from[0];
    for (char ch : text) {
      if (ch == c) {
        out.append(to);
      } else {
        out.push_back(ch);
      }
    }
    return out;
  }
  size_t pos = 0;
  while (true) {
    const size_t hit = text.find(from, pos);
    if (hit == std::string_view::npos) break;
    out.append(text.substr(pos, hit - pos));
    out.append(to);
    pos = hit + from.size();
  }
  out.append(text.substr(pos));
  return out;
}

// Parses "<0xAB>" the way the library's ByteFallback decoder does; -1 if not a byte token.
int ParseByteToken(std::string_view token) {
  if (token.size() != 6 || token.substr(0, 3) != "<0x" || token[5] != '>') return -1;
  int value = 0;
  size_t i = 3;
  if (token[3] == '+') ++i;  // Rust's from_str_radix accepts a leading '+'.
  if (i == 5) return -1;
  for (; i < 5; ++i) {
    const char c = token[i];
    int digit;
    if (c >= '0' && c <= '9') {
      digit = c - '0';
    } else if (c >= 'a' && c <= 'f') {
      digit = c - 'a' + 10;
    } else if (c >= 'A' && c <= 'F') {
      digit = c - 'A' + 10;
    } else {
      return -1;
    }
    value = value * 16 + digit;
  }
  return value;
}

// Length of the run of White_Space characters at the start of `text`.
size_t WhiteSpacePrefix(std::string_view text) {
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t len = WellFormedSequenceLength(text, pos);
    if (len == 0 || !IsUnicodeWhiteSpace(DecodeSequence(text, pos, len))) break;
    pos += len;
  }
  return pos;
}

// Start of the run of White_Space characters at the end of `text`.
size_t WhiteSpaceSuffixStart(std::string_view text) {
  size_t end = text.size();
  while (end > 0) {
    size_t start = end - 1;
    while (start > 0 && (static_cast<uint8_t>(text[start]) & 0xC0) == 0x80) --start;
    const size_t len = WellFormedSequenceLength(text, start);
    if (len != end - start || !IsUnicodeWhiteSpace(DecodeSequence(text, start, len))) break;
    end = start;
  }
  return end;
}

}  // namespace

void Tokenizer::Matcher::Add(std::string_view content, int32_t token_index) {
  int32_t node = 0;
  for (char ch : content) {
    const auto byte = static_cast<uint8_t>(ch);
    int32_t next = -1;
    for (const auto& [b, child] : nodes_[node].children) {
      if (b == byte) next = child;
    }
    if (next < 0) {
      next = static_cast<int32_t>(nodes_.size());
      nodes_[node].children.emplace_back(byte, next);
      nodes_.emplace_back();
    }
    node = next;
  }
  // The first token with a given content wins, as with the library's trie.
  if (nodes_[node].token_index < 0) nodes_[node].token_index = token_index;
  first_bytes_[static_cast<uint8_t>(content[0])] = true;
}

bool Tokenizer::Matcher::LongestAt(std::string_view text, size_t pos, int32_t* token_index,
                                   size_t* length) const {
  int32_t node = 0;
  bool found = false;
  for (size_t i = pos; i < text.size(); ++i) {
    const auto byte = static_cast<uint8_t>(text[i]);
    int32_t next = -1;
    for (const auto& [b, child] : nodes_[node].children) {
      if (b == byte) {
        next = child;
        break;
      }
    }
    if (next < 0) break;
    node = next;
    if (nodes_[node].token_index >= 0) {
      *token_index = nodes_[node].token_index;
      *length = i + 1 - pos;
      found = true;
    }
  }
  return found;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open tokenizer file ", path));
  std::stringstream buffer;
  buffer << in.rdbuf();
  auto tokenizer = FromJson(buffer.str());
  if (!tokenizer.ok()) {
    return absl::Status(tokenizer.status().code(),
                        absl::StrCat(path, ": ", tokenizer.status().message()));
  }
  return tokenizer;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(std::string_view json_text) {
  std::unique_ptr<Tokenizer> tokenizer(new Tokenizer());
  RETURN_IF_ERROR(tokenizer->Init(json_text));
  return tokenizer;
}

absl::Status Tokenizer::Init(std::string_view json_text) {
  const json doc = json::parse(json_text.begin(), json_text.end(), nullptr,
                               /*allow_exceptions=*/false);
  if (doc.is_discarded()) return Invalid("not valid JSON");
  if (!doc.is_object()) return Invalid("top level is not an object");

  auto model = doc.find("model");
  if (model == doc.end() || model->is_null()) return Invalid("\"model\" is missing");
  ASSIGN_OR_RETURN(model_, BpeModel::FromJson(*model));

  // Normalizer: null, Replace, or a Sequence of Replace.
  auto normalizer = doc.find("normalizer");
  if (normalizer != doc.end() && !normalizer->is_null()) {
    ASSIGN_OR_RETURN(const std::vector<json> steps,
                     StepsOf(*normalizer, "normalizers", "normalizer"));
    for (const json& step : steps) {
      if (TypeOf(step) != "Replace") return Unsupported("normalizer", TypeOf(step));
      ASSIGN_OR_RETURN(auto replace, ParseReplace(step, "normalizer"));
      replacements_.push_back(std::move(replace));
    }
  }

  // Pre-tokenizer: null, Split with a String pattern, or a Sequence of those.
  auto pre_tokenizer = doc.find("pre_tokenizer");
  if (pre_tokenizer != doc.end() && !pre_tokenizer->is_null()) {
    ASSIGN_OR_RETURN(const std::vector<json> steps,
                     StepsOf(*pre_tokenizer, "pretokenizers", "pre_tokenizer"));
    for (const json& step : steps) {
      if (TypeOf(step) != "Split") return Unsupported("pre_tokenizer", TypeOf(step));
      auto pattern = step.find("pattern");
      if (pattern == step.end() || !pattern->is_object()) {
        return Invalid("pre_tokenizer Split has no \"pattern\" object");
      }
      if (pattern->contains("Regex")) {
        return absl::UnimplementedError(
            "tokenizer.json: pre_tokenizer Split with a Regex pattern is not supported (only "
            "String patterns, as Gemma tokenizers use)");
      }
      auto literal = pattern->find("String");
      if (literal == pattern->end() || !literal->is_string()) {
        return Invalid("pre_tokenizer Split pattern is neither String nor Regex");
      }
      auto behavior = step.find("behavior");
      if (behavior == step.end() || !behavior->is_string()) {
        return Invalid("pre_tokenizer Split has no \"behavior\"");
      }
      std::optional<SplitBehavior> parsed = ParseSplitBehavior(behavior->get<std::string>());
      if (!parsed) {
        return Invalid(absl::StrCat("pre_tokenizer Split behavior \"",
                                    AsAbsl(behavior->get<std::string>()),
                                    "\" is not one of Removed, Isolated, MergedWithPrevious, "
                                    "MergedWithNext, Contiguous"));
      }
      split_rules_.push_back({literal->get<std::string>(), *parsed, BoolField(step, "invert", false)});
    }
  }

  // Added tokens.
  vocab_size_ = model_.id_limit();
  auto added = doc.find("added_tokens");
  if (added != doc.end() && !added->is_null()) {
    if (!added->is_array()) return Invalid("\"added_tokens\" is not an array");
    for (const json& entry : *added) {
      auto id = entry.find("id");
      auto content = entry.find("content");
      if (!entry.is_object() || id == entry.end() || !id->is_number_integer() ||
          content == entry.end() || !content->is_string() || id->get<int64_t>() < 0 ||
          id->get<int64_t>() > kMaxTokenId) {
        return Invalid(absl::StrCat("an added token lacks a valid \"id\" (an integer in [0, ",
                                    kMaxTokenId, "]) or \"content\""));
      }
      AddedToken token;
      token.id = static_cast<int32_t>(id->get<int64_t>());
      token.content = content->get<std::string>();
      token.special = BoolField(entry, "special", false);
      token.lstrip = BoolField(entry, "lstrip", false);
      token.rstrip = BoolField(entry, "rstrip", false);
      token.normalized = BoolField(entry, "normalized", !token.special);
      if (BoolField(entry, "single_word", false)) {
        return absl::UnimplementedError(absl::StrCat(
            "tokenizer.json: added token \"", token.content, "\" uses single_word, which is "
            "not supported"));
      }
      if (token.content.empty()) return Invalid("an added token has empty content");
      if (added_by_id_.contains(token.id)) {
        return Invalid(absl::StrCat("duplicate added token id ", token.id));
      }
      const int32_t model_id = model_.TokenToId(token.content);
      if (model_id >= 0 && model_id != token.id) {
        return Invalid(absl::StrCat("added token \"", token.content, "\" has id ", token.id,
                                    " but the vocab gives it ", model_id));
      }
      const std::string* model_token = model_.IdToToken(token.id);
      if (model_token != nullptr && *model_token != token.content) {
        return Invalid(absl::StrCat("added token \"", token.content, "\" reuses id ",
                                    token.id, " of vocab token \"", *model_token, "\""));
      }
      const auto index = static_cast<int32_t>(added_tokens_.size());
      added_by_id_[token.id] = index;
      added_by_content_.try_emplace(token.content, token.id);
      vocab_size_ = std::max(vocab_size_, token.id + 1);
      added_tokens_.push_back(std::move(token));
    }
  }
  // The library matches special tokens first, then the others, each in file order.
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t i = 0; i < added_tokens_.size(); ++i) {
      const AddedToken& token = added_tokens_[i];
      if (token.special != (pass == 0)) continue;
      if (token.normalized) {
        normalized_matcher_.Add(Normalize(token.content), static_cast<int32_t>(i));
      } else {
        raw_matcher_.Add(token.content, static_cast<int32_t>(i));
      }
    }
  }

  // Post-processor: null or TemplateProcessing.
  auto post = doc.find("post_processor");
  if (post != doc.end() && !post->is_null()) {
    if (TypeOf(*post) != "TemplateProcessing") {
      return Unsupported("post_processor", TypeOf(*post));
    }
    auto single = post->find("single");
    auto specials = post->find("special_tokens");
    if (single == post->end() || !single->is_array()) {
      return Invalid("TemplateProcessing has no \"single\" template");
    }
    bool seen_sequence = false;
    for (const json& item : *single) {
      if (item.contains("Sequence")) {
        if (seen_sequence) return Invalid("TemplateProcessing names the sequence twice");
        seen_sequence = true;
        continue;
      }
      auto special = item.find("SpecialToken");
      if (special == item.end() || !special->contains("id")) {
        return Invalid("TemplateProcessing item is neither SpecialToken nor Sequence");
      }
      if (!(*special)["id"].is_string()) {
        return Invalid("TemplateProcessing SpecialToken \"id\" is not a string");
      }
      const std::string name = (*special)["id"].get<std::string>();
      if (specials == post->end() || !specials->contains(name) ||
          !(*specials)[name].contains("ids") || !(*specials)[name]["ids"].is_array()) {
        return Invalid(absl::StrCat("TemplateProcessing special token \"", name,
                                    "\" has no ids"));
      }
      for (const json& tid : (*specials)[name]["ids"]) {
        if (!tid.is_number_integer()) return Invalid("TemplateProcessing id is not a number");
        if (tid.get<int64_t>() < 0 || tid.get<int64_t>() >= vocab_size_) {
          return Invalid(absl::StrCat("TemplateProcessing special token \"", name, "\" has id ",
                                      tid.dump(), ", outside the vocabulary of ", vocab_size_));
        }
        (seen_sequence ? suffix_ids_ : prefix_ids_).push_back(tid.get<int32_t>());
      }
    }
    if (!seen_sequence) return Invalid("TemplateProcessing \"single\" lacks the sequence");
  }

  // Decoder: Replace steps, then ByteFallback, then Fuse (all optional, in that order).
  auto decoder = doc.find("decoder");
  if (decoder != doc.end() && !decoder->is_null()) {
    ASSIGN_OR_RETURN(const std::vector<json> steps, StepsOf(*decoder, "decoders", "decoder"));
    bool fused = false;
    for (const json& step : steps) {
      const std::string type = TypeOf(step);
      if (fused) return Unsupported("decoder after Fuse", type);
      if (type == "Replace") {
        if (decoder_byte_fallback_) return Unsupported("decoder after ByteFallback", type);
        ASSIGN_OR_RETURN(auto replace, ParseReplace(step, "decoder"));
        decoder_replacements_.push_back(std::move(replace));
      } else if (type == "ByteFallback") {
        decoder_byte_fallback_ = true;
      } else if (type == "Fuse") {
        fused = true;
      } else {
        return Unsupported("decoder", type);
      }
    }
  }

  // Precompute each id's decoder piece.
  pieces_.resize(vocab_size_);
  for (int32_t id = 0; id < vocab_size_; ++id) {
    const std::string* token = IdToToken(id);
    if (token == nullptr) continue;
    Piece& piece = pieces_[id];
    piece.known = true;
    piece.special = IsSpecial(id);
    std::string text = *token;
    for (const auto& [from, to] : decoder_replacements_) text = ReplaceAll(text, from, to);
    if (decoder_byte_fallback_) piece.byte = static_cast<int16_t>(ParseByteToken(text));
    piece.text = std::move(text);
  }
  return absl::OkStatus();
}

const std::string* Tokenizer::IdToToken(int32_t id) const {
  auto it = added_by_id_.find(id);
  if (it != added_by_id_.end()) return &added_tokens_[it->second].content;
  return model_.IdToToken(id);
}

int32_t Tokenizer::TokenToId(std::string_view token) const {
  auto it = added_by_content_.find(AsAbsl(token));
  if (it != added_by_content_.end()) return it->second;
  return model_.TokenToId(token);
}

bool Tokenizer::IsSpecial(int32_t id) const {
  auto it = added_by_id_.find(id);
  if (it == added_by_id_.end()) return false;
  // Specialness follows the content, as in the library's special-token set.
  for (const AddedToken& token : added_tokens_) {
    if (token.special && token.content == added_tokens_[it->second].content) return true;
  }
  return false;
}

const Tokenizer::Piece& Tokenizer::DecoderPiece(int32_t id) const {
  if (id < 0 || id >= static_cast<int32_t>(pieces_.size())) return unknown_piece_;
  return pieces_[id];
}

std::string Tokenizer::Normalize(std::string_view text) const {
  std::string out(text);
  for (const auto& [from, to] : replacements_) out = ReplaceAll(out, from, to);
  return out;
}

template <typename OnText>
void Tokenizer::SplitOnAddedTokens(std::string_view text, const Matcher& matcher,
                                   const EncodeOptions& options, std::vector<int32_t>* ids,
                                   OnText on_text) const {
  if (matcher.empty()) {
    on_text(text);
    return;
  }
  size_t start_offset = 0;
  size_t pos = 0;
  // Plain ranges apply to the raw pass, over the text Encode was given.
  const bool raw = &matcher == &raw_matcher_;
  size_t next_range = 0;
  while (pos < text.size()) {
    if (raw && next_range < options.plain_ranges.size()) {
      const auto& [begin, end] = options.plain_ranges[next_range];
      if (pos >= end) {
        ++next_range;
        continue;
      }
      if (pos >= begin) {  // inside: no token starts here; the stretch goes on
        pos = end;
        continue;
      }
    }
    int32_t index;
    size_t length;
    if (!matcher.MayStartWith(static_cast<uint8_t>(text[pos])) ||
        !matcher.LongestAt(text, pos, &index, &length)) {
      ++pos;
      continue;
    }
    size_t start = pos;
    size_t stop = pos + length;
    pos = stop;
    const AddedToken& token = added_tokens_[index];
    if (options.split_special_tokens && token.special) continue;
    if (token.lstrip) {
      start = std::max(WhiteSpaceSuffixStart(text.substr(0, start)), start_offset);
    }
    if (token.rstrip) stop += WhiteSpacePrefix(text.substr(stop));
    if (start_offset < start) on_text(text.substr(start_offset, start - start_offset));
    ids->push_back(token.id);
    start_offset = std::max(start_offset, stop);
  }
  if (start_offset < text.size()) on_text(text.substr(start_offset));
}

void Tokenizer::EncodeNormalizedSegment(std::string_view normalized,
                                        const EncodeOptions& options,
                                        std::vector<int32_t>* ids) const {
  SplitOnAddedTokens(normalized, normalized_matcher_, options, ids, [&](std::string_view piece) {
    if (split_rules_.empty()) {
      model_.Tokenize(piece, ids);
      return;
    }
    // The pre-tokenizer's rules in order, each cutting every piece the one before left.
    std::vector<std::string_view> pieces{piece}, next;
    for (const SplitRule& rule : split_rules_) {
      next.clear();
      for (std::string_view p : pieces) ApplySplit(rule, p, &next);
      pieces.swap(next);
    }
    for (std::string_view p : pieces) model_.Tokenize(p, ids);
  });
}

void Tokenizer::EncodeRawSegment(std::string_view text, const EncodeOptions& options,
                                 std::vector<int32_t>* ids) const {
  if (replacements_.empty()) {
    EncodeNormalizedSegment(text, options, ids);
    return;
  }
  EncodeNormalizedSegment(Normalize(text), options, ids);
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text,
                                       const EncodeOptions& options) const {
  std::string repaired;
  if (!IsValidUtf8(text)) {
    repaired = RepairUtf8(text);
    text = repaired;
  }
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  if (options.add_special_tokens) ids.insert(ids.end(), prefix_ids_.begin(), prefix_ids_.end());
  SplitOnAddedTokens(text, raw_matcher_, options, &ids, [&](std::string_view segment) {
    EncodeRawSegment(segment, options, &ids);
  });
  if (options.add_special_tokens) ids.insert(ids.end(), suffix_ids_.begin(), suffix_ids_.end());
  return ids;
}

std::vector<int32_t> Tokenizer::EncodePrompt(std::string_view text) const {
  std::vector<int32_t> ids = Encode(text, {.add_special_tokens = true});
  const int32_t bos = TokenToId("<bos>");
  if (bos < 0 || (!prefix_ids_.empty() && prefix_ids_.front() == bos)) return ids;
  ids.insert(ids.begin(), bos);
  return ids;
}

std::string Tokenizer::Decode(absl::Span<const int32_t> ids,
                              const DecodeOptions& options) const {
  std::string out;
  std::string pending_bytes;
  auto flush = [&]() {
    if (pending_bytes.empty()) return;
    if (IsValidUtf8(pending_bytes)) {
      out.append(pending_bytes);
    } else {
      for (size_t i = 0; i < pending_bytes.size(); ++i) out.append(kReplacementChar);
    }
    pending_bytes.clear();
  };
  for (int32_t id : ids) {
    const Piece& piece = DecoderPiece(id);
    if (!piece.known || (options.skip_special_tokens && piece.special)) continue;
    if (piece.byte >= 0) {
      pending_bytes.push_back(static_cast<char>(piece.byte));
      continue;
    }
    flush();
    out.append(piece.text);
  }
  flush();
  return out;
}

}  // namespace gemma::tokenizer
