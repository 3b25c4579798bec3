// Tests for .npy reading and writing: round trips per dtype, numpy's 64-byte header padding,
// v2.0 headers, and refusals (bad magic, Fortran order, unknown descr, truncated data).
#include "common/npy.h"

#include <stdlib.h>

#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace gemma {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// The message as std::string, so that matcher failures print text (Abseil's own string_view
// prints as a character list).
std::string Msg(const absl::Status& status) { return std::string(status.message()); }

class NpyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "/npy_test_XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }
  static std::string ReadAll(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
  }
  // Writes a file from a version byte, a header dict and data bytes.
  void WriteHandMade(const std::string& path, int major, const std::string& dict,
                     const std::string& data) {
    std::string out("\x93NUMPY", 6);
    out.push_back(static_cast<char>(major));
    out.push_back(0);
    size_t len_bytes = major == 1 ? 2 : 4;
    for (size_t i = 0; i < len_bytes; ++i) {
      out.push_back(static_cast<char>((dict.size() >> (8 * i)) & 0xff));
    }
    std::ofstream(path, std::ios::binary) << out << dict << data;
  }
  std::string dir_;
};

TEST_F(NpyTest, F32RoundTripKeepsShapeAndValuesWithPaddedHeader) {
  std::vector<float> values = {0.5f, -1.25f, 3.0f, 1e-7f, 65504.0f, -0.0f};
  ASSERT_TRUE(WriteNpy(Path("a.npy"), DType::kF32, {2, 3}, values.data()).ok());
  std::string bytes = ReadAll(Path("a.npy"));
  ASSERT_GE(bytes.size(), 10u);
  EXPECT_EQ(bytes[6], 1);                             // format 1.0
  EXPECT_EQ(bytes.size() - values.size() * 4, 128u);  // what np.save writes for this array
  EXPECT_THAT(bytes, HasSubstr("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"));
  EXPECT_EQ(bytes[bytes.size() - values.size() * 4 - 1], '\n');

  absl::StatusOr<NpyArray> array = ReadNpy(Path("a.npy"));
  ASSERT_TRUE(array.ok()) << array.status();
  EXPECT_EQ(array->dtype, DType::kF32);
  EXPECT_THAT(array->shape, ElementsAre(2, 3));
  EXPECT_EQ(array->NumElements(), 6);
  EXPECT_EQ(array->AsFloat(), values);
}

TEST_F(NpyTest, HeaderIsByteIdenticalToNumpy) {
  // numpy 2.4 leaves room for 21 digits in the first axis before padding to 64 bytes, so this
  // shape gets a 192-byte header where plain rounding up would give 128 (checked with np.save).
  std::vector<int64_t> shape = {0};
  for (int i = 0; i < 14; ++i) shape.push_back(1);
  ASSERT_TRUE(WriteNpy(Path("z.npy"), DType::kF32, shape, nullptr).ok());
  std::string bytes = ReadAll(Path("z.npy"));
  ASSERT_EQ(bytes.size(), 192u);
  EXPECT_EQ(static_cast<uint8_t>(bytes[8]) | (static_cast<uint8_t>(bytes[9]) << 8), 182);
  std::string dict =
      "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, "
      "1, 1), }";
  EXPECT_EQ(bytes.substr(10), dict + std::string(182 - dict.size() - 1, ' ') + "\n");
  absl::StatusOr<NpyArray> array = ReadNpy(Path("z.npy"));
  ASSERT_TRUE(array.ok()) << array.status();
  EXPECT_EQ(array->NumElements(), 0);
  EXPECT_EQ(array->shape, shape);
}

TEST_F(NpyTest, IntegerRoundTrips) {
  std::vector<int64_t> i64 = {-5, 0, 1LL << 50, 7};
  ASSERT_TRUE(WriteNpy(Path("i64.npy"), DType::kI64, {4}, i64.data()).ok());
  EXPECT_THAT(ReadAll(Path("i64.npy")), HasSubstr("'shape': (4,)"));
  absl::StatusOr<NpyArray> a = ReadNpy(Path("i64.npy"));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->dtype, DType::kI64);
  EXPECT_EQ(a->AsInt64(), i64);

  std::vector<int32_t> i32 = {3, -9, 11};
  ASSERT_TRUE(WriteNpy(Path("i32.npy"), DType::kI32, {1, 3}, i32.data()).ok());
  absl::StatusOr<NpyArray> b = ReadNpy(Path("i32.npy"));
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->dtype, DType::kI32);
  EXPECT_THAT(b->AsInt64(), ElementsAre(3, -9, 11));
  EXPECT_THAT(b->AsFloat(), ElementsAre(3.0f, -9.0f, 11.0f));
}

TEST_F(NpyTest, ScalarAndF16RoundTrip) {
  int32_t scalar = 42;
  ASSERT_TRUE(WriteNpy(Path("s.npy"), DType::kI32, {}, &scalar).ok());
  absl::StatusOr<NpyArray> s = ReadNpy(Path("s.npy"));
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_TRUE(s->shape.empty());
  EXPECT_THAT(s->AsInt64(), ElementsAre(42));

  std::vector<uint16_t> f16 = {0x3c00, 0xc000, 0x3800};  // 1, -2, 0.5
  ASSERT_TRUE(WriteNpy(Path("h.npy"), DType::kF16, {3}, f16.data()).ok());
  absl::StatusOr<NpyArray> h = ReadNpy(Path("h.npy"));
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->dtype, DType::kF16);
  EXPECT_THAT(h->AsFloat(), ElementsAre(1.0f, -2.0f, 0.5f));
}

TEST_F(NpyTest, ReadsVersion2Header) {
  std::vector<float> values = {1.0f, 2.0f};
  WriteHandMade(Path("v2.npy"), 2, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }\n",
                std::string(reinterpret_cast<const char*>(values.data()), 8));
  absl::StatusOr<NpyArray> array = ReadNpy(Path("v2.npy"));
  ASSERT_TRUE(array.ok()) << array.status();
  EXPECT_THAT(array->AsFloat(), ElementsAre(1.0f, 2.0f));
}

TEST_F(NpyTest, BadMagicIsInvalidNamingTheFile) {
  std::ofstream(Path("bad.npy"), std::ios::binary) << "PK\x03\x04 this is a zip";
  absl::StatusOr<NpyArray> array = ReadNpy(Path("bad.npy"));
  ASSERT_EQ(array.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(array.status()), HasSubstr(Path("bad.npy")));
  EXPECT_THAT(Msg(array.status()), HasSubstr("magic"));
}

TEST_F(NpyTest, FortranOrderIsRefused) {
  WriteHandMade(Path("f.npy"), 1, "{'descr': '<f4', 'fortran_order': True, 'shape': (1,), }\n",
                std::string(4, '\0'));
  absl::StatusOr<NpyArray> array = ReadNpy(Path("f.npy"));
  ASSERT_EQ(array.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(array.status()), HasSubstr("fortran_order"));
  EXPECT_THAT(Msg(array.status()), HasSubstr(Path("f.npy")));
}

TEST_F(NpyTest, BigEndianDescrIsRefused) {
  WriteHandMade(Path("be.npy"), 1, "{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }\n",
                std::string(4, '\0'));
  absl::StatusOr<NpyArray> array = ReadNpy(Path("be.npy"));
  ASSERT_EQ(array.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(array.status()), HasSubstr("'>f4'"));
}

TEST_F(NpyTest, TruncatedDataIsRefused) {
  WriteHandMade(Path("t.npy"), 1, "{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }\n",
                std::string(16, '\0'));
  absl::StatusOr<NpyArray> array = ReadNpy(Path("t.npy"));
  ASSERT_EQ(array.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(array.status()), HasSubstr("has 16 data bytes"));
  EXPECT_THAT(Msg(array.status()), HasSubstr("needs 24"));
}

TEST_F(NpyTest, MalformedHeaderIsRefused) {
  WriteHandMade(Path("m.npy"), 1, "{'descr': '<f4', 'shape': (1,", "");
  absl::StatusOr<NpyArray> array = ReadNpy(Path("m.npy"));
  ASSERT_EQ(array.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(array.status()), HasSubstr("bad header"));
}

TEST_F(NpyTest, MissingFileIsNotFound) {
  absl::StatusOr<NpyArray> array = ReadNpy(Path("absent.npy"));
  ASSERT_EQ(array.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Msg(array.status()), HasSubstr(Path("absent.npy")));
}

TEST_F(NpyTest, Bf16CannotBeWritten) {
  uint16_t value = 0;
  absl::Status status = WriteNpy(Path("b.npy"), DType::kBF16, {1}, &value);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(status), HasSubstr("BF16"));
}

}  // namespace
}  // namespace gemma
