#include "common/json_util.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace gemma {
namespace {

using Json = nlohmann::json;

// A SAX consumer that accepts everything and records where the parser gave up.
struct ErrorPosition : nlohmann::json_sax<Json> {
  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override { return true; }
  bool key(string_t&) override { return true; }
  bool end_object() override { return true; }
  bool start_array(std::size_t) override { return true; }
  bool end_array() override { return true; }
  bool parse_error(std::size_t position, const std::string&,
                   const nlohmann::detail::exception& error) override {
    byte = position;
    message = error.what();
    return false;
  }
  size_t byte = 0;
  std::string message = "unknown parse error";
};

}  // namespace

absl::StatusOr<Json> ParseJson(absl::string_view text, absl::string_view what) {
  Json value = Json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (!value.is_discarded()) return value;
  ErrorPosition sax;
  Json::sax_parse(text.begin(), text.end(), &sax, nlohmann::detail::input_format_t::json,
                  /*strict=*/true);
  return absl::InvalidArgumentError(
      absl::StrCat(what, " is not valid JSON at byte ", sax.byte, ": ", sax.message));
}

}  // namespace gemma
