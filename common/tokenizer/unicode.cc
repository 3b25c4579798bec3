// UTF-8 decoding and repair with Python's replacement policy; Unicode whitespace classes.
#include "common/tokenizer/unicode.h"

namespace gemma::tokenizer {
namespace {

// Number of bytes a sequence starting with `lead` has (0 if `lead` cannot start one), and
// the allowed range of the second byte (Unicode Table 3-7).
struct LeadInfo {
  int length;
  uint8_t second_lo;
  uint8_t second_hi;
};

LeadInfo ClassifyLead(uint8_t lead) {
  if (lead < 0x80) return {1, 0, 0};
  if (lead >= 0xC2 && lead <= 0xDF) return {2, 0x80, 0xBF};
  if (lead == 0xE0) return {3, 0xA0, 0xBF};
  if (lead == 0xED) return {3, 0x80, 0x9F};
  if (lead >= 0xE1 && lead <= 0xEF) return {3, 0x80, 0xBF};
  if (lead == 0xF0) return {4, 0x90, 0xBF};
  if (lead >= 0xF1 && lead <= 0xF3) return {4, 0x80, 0xBF};
  if (lead == 0xF4) return {4, 0x80, 0x8F};
  return {0, 0, 0};
}

// Length of the longest prefix at `pos` that is either a full sequence (returned with
// *complete = true) or a maximal ill-formed subpart (at least one byte).
size_t ScanSequence(std::string_view text, size_t pos, bool* complete) {
  const auto lead = static_cast<uint8_t>(text[pos]);
  const LeadInfo info = ClassifyLead(lead);
  *complete = false;
  if (info.length == 0) return 1;
  if (info.length == 1) {
    *complete = true;
    return 1;
  }
  size_t len = 1;
  for (int i = 1; i < info.length; ++i) {
    if (pos + i >= text.size()) return len;
    const auto b = static_cast<uint8_t>(text[pos + i]);
    const uint8_t lo = i == 1 ? info.second_lo : 0x80;
    const uint8_t hi = i == 1 ? info.second_hi : 0xBF;
    if (b < lo || b > hi) return len;
    ++len;
  }
  *complete = true;
  return len;
}

}  // namespace

size_t WellFormedSequenceLength(std::string_view text, size_t pos) {
  bool complete = false;
  const size_t len = ScanSequence(text, pos, &complete);
  return complete ? len : 0;
}

uint32_t DecodeSequence(std::string_view text, size_t pos, size_t len) {
  const auto b0 = static_cast<uint8_t>(text[pos]);
  if (len == 1) return b0;
  uint32_t cp = b0 & (0xFF >> (len + 1));
  for (size_t i = 1; i < len; ++i) {
    cp = (cp << 6) | (static_cast<uint8_t>(text[pos + i]) & 0x3F);
  }
  return cp;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

bool IsValidUtf8(std::string_view text) {
  size_t pos = 0;
  while (pos < text.size()) {
    if (static_cast<uint8_t>(text[pos]) < 0x80) {
      ++pos;
      continue;
    }
    const size_t len = WellFormedSequenceLength(text, pos);
    if (len == 0) return false;
    pos += len;
  }
  return true;
}

bool IsUtf8Prefix(std::string_view text) {
  size_t pos = 0;
  while (pos < text.size()) {
    bool complete = false;
    const size_t len = ScanSequence(text, pos, &complete);
    if (!complete) {
      // Cut short by the end of the text (not by a bad byte) after a lead that starts one.
      return pos + len == text.size() && ClassifyLead(static_cast<uint8_t>(text[pos])).length > 1;
    }
    pos += len;
  }
  return true;
}

std::string RepairUtf8(std::string_view text) {
  std::string out;
  out.reserve(text.size() + 8);
  size_t pos = 0;
  while (pos < text.size()) {
    bool complete = false;
    const size_t len = ScanSequence(text, pos, &complete);
    if (complete) {
      out.append(text.substr(pos, len));
    } else {
      out.append(kReplacementChar);
    }
    pos += len;
  }
  return out;
}

bool IsUnicodeWhiteSpace(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 ||
         cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
         cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

bool IsPythonSpace(uint32_t cp) {
  return IsUnicodeWhiteSpace(cp) || (cp >= 0x1C && cp <= 0x1F);
}

std::string_view StripPythonSpace(std::string_view text) {
  size_t begin = 0;
  while (begin < text.size()) {
    const size_t len = WellFormedSequenceLength(text, begin);
    if (len == 0 || !IsPythonSpace(DecodeSequence(text, begin, len))) break;
    begin += len;
  }
  size_t end = text.size();
  while (end > begin) {
    size_t start = end - 1;
    while (start > begin && (static_cast<uint8_t>(text[start]) & 0xC0) == 0x80) --start;
    const size_t len = WellFormedSequenceLength(text, start);
    if (len != end - start || !IsPythonSpace(DecodeSequence(text, start, len))) break;
    end = start;
  }
  return text.substr(begin, end - begin);
}

}  // namespace gemma::tokenizer
