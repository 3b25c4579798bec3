#include "common/npy.h"

#include <cctype>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "common/status_macros.h"

namespace gemma {
namespace {

constexpr absl::string_view kMagic("\x93NUMPY", 6);

std::optional<absl::string_view> Descr(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "<f4";
    case DType::kF16:
      return "<f2";
    case DType::kI32:
      return "<i4";
    case DType::kI64:
      return "<i8";
    case DType::kBF16:
      return std::nullopt;
  }
  return std::nullopt;
}

std::optional<DType> DTypeFromDescr(absl::string_view descr) {
  if (descr == "<f4") return DType::kF32;
  if (descr == "<f2") return DType::kF16;
  if (descr == "<i4") return DType::kI32;
  if (descr == "<i8") return DType::kI64;
  return std::nullopt;
}

// The header is a Python dict literal, e.g. {'descr': '<f4', 'fortran_order': False,
// 'shape': (2, 3), }. This reads exactly that grammar: string keys; values that are strings,
// True/False, or tuples of integers.
class HeaderParser {
 public:
  explicit HeaderParser(absl::string_view text) : text_(text) {}

  struct Header {
    std::optional<std::string> descr;
    std::optional<bool> fortran_order;
    std::optional<std::vector<int64_t>> shape;
  };

  absl::StatusOr<Header> Parse() {
    Header header;
    if (!Consume('{')) return Error("expected '{'");
    while (true) {
      if (Consume('}')) break;
      ASSIGN_OR_RETURN(std::string key, String());
      if (!Consume(':')) return Error("expected ':'");
      if (key == "descr") {
        ASSIGN_OR_RETURN(header.descr, String());
      } else if (key == "fortran_order") {
        if (ConsumeWord("True")) {
          header.fortran_order = true;
        } else if (ConsumeWord("False")) {
          header.fortran_order = false;
        } else {
          return Error("fortran_order must be True or False");
        }
      } else if (key == "shape") {
        ASSIGN_OR_RETURN(header.shape, Tuple());
      } else {
        return Error(absl::StrCat("unknown key '", key, "'"));
      }
      if (Consume(',')) continue;
      if (Consume('}')) break;
      return Error("expected ',' or '}'");
    }
    SkipSpace();
    if (pos_ != text_.size()) return Error("trailing characters after the dict");
    return header;
  }

 private:
  absl::Status Error(absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat("bad header at character ", pos_, ": ", what));
  }
  void SkipSpace() {
    while (pos_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[pos_]))) ++pos_;
  }
  bool Consume(char c) {
    SkipSpace();
    if (pos_ < text_.size() && text_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  bool ConsumeWord(absl::string_view word) {
    SkipSpace();
    if (text_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }
  absl::StatusOr<std::string> String() {
    SkipSpace();
    if (pos_ >= text_.size() || (text_[pos_] != '\'' && text_[pos_] != '"')) {
      return Error("expected a quoted string");
    }
    char quote = text_[pos_++];
    size_t end = text_.find(quote, pos_);
    if (end == absl::string_view::npos) return Error("unterminated string");
    std::string value(text_.substr(pos_, end - pos_));
    pos_ = end + 1;
    return value;
  }
  absl::StatusOr<std::vector<int64_t>> Tuple() {
    if (!Consume('(')) return Error("shape must be a tuple");
    std::vector<int64_t> dims;
    while (true) {
      if (Consume(')')) break;
      SkipSpace();
      int64_t dim = 0;
      size_t start = pos_;
      while (pos_ < text_.size() && std::isdigit(static_cast<unsigned char>(text_[pos_]))) {
        int digit = text_[pos_] - '0';
        if (dim > (std::numeric_limits<int64_t>::max() - digit) / 10) {
          return Error("shape dimension overflows");
        }
        dim = dim * 10 + digit;
        ++pos_;
      }
      if (pos_ == start) return Error("shape dimensions must be non-negative integers");
      dims.push_back(dim);
      if (Consume(',')) continue;
      if (Consume(')')) break;
      return Error("expected ',' or ')' in shape");
    }
    return dims;
  }

  absl::string_view text_;
  size_t pos_ = 0;
};

}  // namespace

int64_t NpyArray::NumElements() const {
  int64_t n = 1;
  for (int64_t dim : shape) n *= dim;
  return n;
}

std::vector<float> NpyArray::AsFloat() const {
  size_t n = static_cast<size_t>(NumElements());
  std::vector<float> out(n);
  switch (dtype) {
    case DType::kF32:
    case DType::kBF16:
    case DType::kF16:
      ConvertToF32(dtype, data.data(), n, out.data());
      break;
    case DType::kI32:
      for (size_t i = 0; i < n; ++i) {
        int32_t v;
        std::memcpy(&v, data.data() + i * 4, 4);
        out[i] = static_cast<float>(v);
      }
      break;
    case DType::kI64:
      for (size_t i = 0; i < n; ++i) {
        int64_t v;
        std::memcpy(&v, data.data() + i * 8, 8);
        out[i] = static_cast<float>(v);
      }
      break;
  }
  return out;
}

std::vector<int64_t> NpyArray::AsInt64() const {
  size_t n = static_cast<size_t>(NumElements());
  std::vector<int64_t> out(n);
  switch (dtype) {
    case DType::kI32:
      for (size_t i = 0; i < n; ++i) {
        int32_t v;
        std::memcpy(&v, data.data() + i * 4, 4);
        out[i] = v;
      }
      break;
    case DType::kI64:
      std::memcpy(out.data(), data.data(), n * 8);
      break;
    default: {
      std::vector<float> f = AsFloat();
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<int64_t>(f[i]);
    }
  }
  return out;
}

absl::Status WriteNpy(const std::string& path, DType dtype, const std::vector<int64_t>& shape,
                      const void* data) {
  std::optional<absl::string_view> descr = Descr(dtype);
  if (!descr) {
    return absl::InvalidArgumentError(absl::StrCat("cannot write ", path, ": dtype ",
                                                   std::string(DTypeName(dtype)),
                                                   " has no .npy form (use F32, F16, I32, I64)"));
  }
  uint64_t num_elements = 1;
  for (int64_t dim : shape) {
    if (dim < 0 ||
        __builtin_mul_overflow(num_elements, static_cast<uint64_t>(dim), &num_elements)) {
      return absl::InvalidArgumentError(
          absl::StrCat("cannot write ", path, ": bad shape ", absl::StrJoin(shape, ", ")));
    }
  }
  std::string dict = absl::StrCat("{'descr': '", *descr, "', 'fortran_order': False, 'shape': (",
                                  absl::StrJoin(shape, ", "), shape.size() == 1 ? ",), }" : "), }");
  // Padded exactly as numpy 2.x pads it: room for the first axis to grow to 21 digits, then
  // spaces and a final '\n' so that magic + version + length + header is a multiple of 64.
  if (!shape.empty()) dict.append(21 - absl::StrCat(shape[0]).size(), ' ');
  bool v2 = false;
  size_t prefix = kMagic.size() + 2 + 2;
  size_t padding = 64 - (prefix + dict.size() + 1) % 64;
  if (dict.size() + 1 + padding > std::numeric_limits<uint16_t>::max()) {
    v2 = true;
    prefix += 2;
    padding = 64 - (prefix + dict.size() + 1) % 64;
  }
  dict.append(padding, ' ');
  dict.push_back('\n');

  std::string out(kMagic);
  out.push_back(static_cast<char>(v2 ? 2 : 1));
  out.push_back(0);
  uint32_t header_len = static_cast<uint32_t>(dict.size());
  for (int i = 0; i < (v2 ? 4 : 2); ++i)
    out.push_back(static_cast<char>((header_len >> (8 * i)) & 0xff));
  out += dict;

  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  if (!file) {
    return absl::PermissionDeniedError(
        absl::StrCat("cannot open ", path, " for writing: ", strerror(errno)));
  }
  file.write(out.data(), static_cast<std::streamsize>(out.size()));
  file.write(static_cast<const char*>(data),
             static_cast<std::streamsize>(num_elements * DTypeSize(dtype)));
  file.close();
  if (!file) return absl::DataLossError(absl::StrCat("failed writing ", path));
  return absl::OkStatus();
}

absl::StatusOr<NpyArray> ReadNpy(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return absl::NotFoundError(absl::StrCat("cannot open .npy file ", path));
  std::stringstream buffer;
  buffer << file.rdbuf();
  const std::string bytes = buffer.str();
  auto bad = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(".npy file ", path, ": ", what));
  };

  if (bytes.size() < kMagic.size() + 2 || absl::string_view(bytes).substr(0, 6) != kMagic) {
    return bad("bad magic (expected \\x93NUMPY)");
  }
  int major = static_cast<uint8_t>(bytes[6]);
  size_t len_bytes = major == 1 ? 2 : major == 2 ? 4 : 0;
  if (len_bytes == 0) return bad(absl::StrCat("unsupported format version ", major, ".x"));
  size_t prefix = 8 + len_bytes;
  if (bytes.size() < prefix) return bad("truncated before the header length");
  uint64_t header_len = 0;
  for (size_t i = len_bytes; i-- > 0;)
    header_len = (header_len << 8) | static_cast<uint8_t>(bytes[8 + i]);
  if (header_len > bytes.size() - prefix) {
    return bad(absl::StrCat("header length ", header_len, " past the end of file of ", bytes.size(),
                            " bytes"));
  }
  absl::string_view header_text = absl::string_view(bytes).substr(prefix, header_len);
  HeaderParser parser(header_text);
  absl::StatusOr<HeaderParser::Header> header = parser.Parse();
  if (!header.ok()) return bad(header.status().message());
  if (!header->descr || !header->fortran_order || !header->shape) {
    return bad("header lacks one of 'descr', 'fortran_order', 'shape'");
  }
  std::optional<DType> dtype = DTypeFromDescr(*header->descr);
  if (!dtype) {
    return bad(absl::StrCat("unsupported descr '", *header->descr,
                            "' (supported: '<f4', '<f2', '<i4', '<i8')"));
  }
  if (*header->fortran_order) return bad("'fortran_order': True is not supported (need C order)");

  NpyArray array;
  array.dtype = *dtype;
  array.shape = *header->shape;
  uint64_t num_bytes = DTypeSize(*dtype);
  for (int64_t dim : array.shape) {
    if (__builtin_mul_overflow(num_bytes, static_cast<uint64_t>(dim), &num_bytes)) {
      return bad("shape overflows");
    }
  }
  const size_t data_start = prefix + header_len;
  if (bytes.size() - data_start != num_bytes) {
    return bad(absl::StrCat("has ", bytes.size() - data_start, " data bytes, shape (",
                            absl::StrJoin(array.shape, ", "), ") of '", *header->descr, "' needs ",
                            num_bytes));
  }
  array.data.assign(bytes.begin() + static_cast<std::ptrdiff_t>(data_start), bytes.end());
  return array;
}

}  // namespace gemma
