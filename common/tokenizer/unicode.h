// UTF-8 helpers for the tokenizer: decoding, repairing invalid input the way Python's
// `bytes.decode("utf-8", "replace")` does, and the whitespace classes that Rust's regex `\s`
// and Python's `str.strip()` use. Knows nothing about vocabularies.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/strings/string_view.h"

namespace gemma::tokenizer {

// Debian's Abseil has its own string_view type; this bridges std::string_view to it.
inline absl::string_view AsAbsl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

inline constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// Length in bytes of the well-formed UTF-8 sequence starting at text[pos], or 0 if the bytes
// there are not a complete, well-formed sequence (overlongs and surrogates are ill-formed).
size_t WellFormedSequenceLength(std::string_view text, size_t pos);

// Decodes the well-formed sequence of `len` bytes at `text[pos]`.
uint32_t DecodeSequence(std::string_view text, size_t pos, size_t len);

// Appends the UTF-8 encoding of `cp` to `out`.
void AppendUtf8(uint32_t cp, std::string* out);

bool IsValidUtf8(std::string_view text);

// True when some bytes appended to `text` could make it valid UTF-8: it is valid, or valid but
// for a last sequence cut short whose bytes so far are well-formed.
bool IsUtf8Prefix(std::string_view text);

// Replaces each maximal ill-formed subpart with U+FFFD, exactly as Python 3's
// `bytes.decode("utf-8", errors="replace")`. Returns `text` unchanged if it is valid.
std::string RepairUtf8(std::string_view text);

// The Unicode White_Space property (Rust regex `\s`).
bool IsUnicodeWhiteSpace(uint32_t cp);

// Python's `str.isspace()` for one code point (used by `str.strip()` and Jinja's `trim`).
bool IsPythonSpace(uint32_t cp);

// `text.strip()` in Python, for valid UTF-8 `text`.
std::string_view StripPythonSpace(std::string_view text);

}  // namespace gemma::tokenizer
