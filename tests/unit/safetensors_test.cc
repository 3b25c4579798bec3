// Tests for the safetensors reader: files written here byte by byte, read back through
// SafetensorsFile and Checkpoint, and one test per malformed input, each checking the Status
// code and that the message names the file and tensor.
#include "common/safetensors.h"

#include <stdlib.h>

#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/dtype.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace gemma {
namespace {

using Json = nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// The message as std::string, so that matcher failures print text (Abseil's own string_view
// prints as a character list).
std::string Msg(const absl::Status& status) { return std::string(status.message()); }

template <typename T>
std::string Bytes(const std::vector<T>& values) {
  return std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
}

// Writes a safetensors file from a header JSON and the raw data section.
void WriteRaw(const std::string& path, const std::string& header, const std::string& data,
              uint64_t header_len_override = 0) {
  uint64_t n = header_len_override ? header_len_override : header.size();
  std::ofstream out(path, std::ios::binary);
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xff));
  out << header << data;
}

// Builds a well-formed file: tensors laid out back to back in the order added.
class SafetensorsWriter {
 public:
  SafetensorsWriter& Add(const std::string& name, const std::string& dtype,
                         std::vector<int64_t> shape, const std::string& bytes) {
    header_[name] = {{"dtype", dtype},
                     {"shape", shape},
                     {"data_offsets", {data_.size(), data_.size() + bytes.size()}}};
    data_ += bytes;
    return *this;
  }
  SafetensorsWriter& Metadata(const std::string& key, const std::string& value) {
    header_["__metadata__"][key] = value;
    return *this;
  }
  void Write(const std::string& path) const { WriteRaw(path, header_.dump(), data_); }

 private:
  Json header_ = Json::object();
  std::string data_;
};

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "/safetensors_test_XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  // Opens a file with one tensor entry `entry` and `data_size` data bytes; returns the error.
  absl::Status OpenWithEntry(const Json& entry, size_t data_size) {
    std::string path = Path("bad.safetensors");
    WriteRaw(path, Json{{"weight", entry}}.dump(), std::string(data_size, '\0'));
    return SafetensorsFile::Open(path).status();
  }

  std::string dir_;
};

TEST_F(SafetensorsTest, ReadsBf16F16F32AndIntegerTensors) {
  std::vector<uint16_t> bf16 = {F32ToBf16(1.5f),       F32ToBf16(-2.25f),  F32ToBf16(3.0f),
                                F32ToBf16(0.0078125f), F32ToBf16(-100.0f), F32ToBf16(7.0f)};
  std::vector<uint16_t> f16 = {0x3c00, 0xc000, 0x3800};  // 1, -2, 0.5
  std::vector<float> f32 = {0.1f, -7.5f, 1e-3f, 42.0f};
  std::vector<int64_t> i64 = {-3, 1LL << 40};
  std::string path = Path("model.safetensors");
  SafetensorsWriter()
      .Add("a.bf16", "BF16", {2, 3}, Bytes(bf16))
      .Add("b.f16", "F16", {3}, Bytes(f16))
      .Add("c.f32", "F32", {2, 1, 2}, Bytes(f32))
      .Add("d.i64", "I64", {2}, Bytes(i64))
      .Add("e.empty", "F32", {0, 5}, "")
      .Metadata("format", "pt")
      .Write(path);

  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->path(), path);
  EXPECT_EQ((*file)->tensors().size(), 5u);
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
  EXPECT_THAT(std::string((*file)->header()), HasSubstr("\"a.bf16\""));

  const TensorView& a = (*file)->tensors().at("a.bf16");
  EXPECT_EQ(a.dtype, DType::kBF16);
  EXPECT_THAT(a.shape, ElementsAre(2, 3));
  EXPECT_THAT(a.Strides(), ElementsAre(3, 1));
  EXPECT_EQ(a.NumElements(), 6);
  EXPECT_EQ(a.num_bytes, 12u);
  EXPECT_EQ(a.file, path);
  std::vector<float> values(6);
  ConvertToF32(a.dtype, a.data, 6, values.data());
  EXPECT_THAT(values, ElementsAre(1.5f, -2.25f, 3.0f, 0.0078125f, -100.0f, 7.0f));

  const TensorView& b = (*file)->tensors().at("b.f16");
  ConvertToF32(b.dtype, b.data, 3, values.data());
  EXPECT_EQ(values[0], 1.0f);
  EXPECT_EQ(values[1], -2.0f);
  EXPECT_EQ(values[2], 0.5f);

  const TensorView& c = (*file)->tensors().at("c.f32");
  EXPECT_THAT(c.Strides(), ElementsAre(2, 2, 1));
  ConvertToF32(c.dtype, c.data, 4, values.data());
  EXPECT_EQ(values[0], 0.1f);
  EXPECT_EQ(values[1], -7.5f);
  EXPECT_EQ(values[2], 1e-3f);
  EXPECT_EQ(values[3], 42.0f);

  const TensorView& d = (*file)->tensors().at("d.i64");
  int64_t ints[2];
  std::memcpy(ints, d.data, sizeof(ints));
  EXPECT_EQ(ints[0], -3);
  EXPECT_EQ(ints[1], 1LL << 40);

  const TensorView& e = (*file)->tensors().at("e.empty");
  EXPECT_EQ(e.NumElements(), 0);
  EXPECT_EQ(e.num_bytes, 0u);
}

TEST_F(SafetensorsTest, CheckpointOpensModelSafetensors) {
  SafetensorsWriter()
      .Add("x", "F32", {1}, Bytes(std::vector<float>{2.0f}))
      .Write(Path("model.safetensors"));
  // A stray file is ignored when model.safetensors exists.
  SafetensorsWriter()
      .Add("x", "F32", {1}, Bytes(std::vector<float>{3.0f}))
      .Write(Path("other.safetensors"));
  absl::StatusOr<std::unique_ptr<Checkpoint>> checkpoint = Checkpoint::Open(dir_);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  EXPECT_EQ((*checkpoint)->files().size(), 1u);
  EXPECT_TRUE((*checkpoint)->Has("x"));
  EXPECT_FALSE((*checkpoint)->Has("y"));
  absl::StatusOr<TensorView> x = (*checkpoint)->GetWithShape("x", {1});
  ASSERT_TRUE(x.ok()) << x.status();
  float value;
  std::memcpy(&value, x->data, sizeof(value));
  EXPECT_EQ(value, 2.0f);
}

TEST_F(SafetensorsTest, CheckpointOpensShardsFromIndex) {
  std::vector<float> w0 = {1, 2, 3, 4};
  std::vector<uint16_t> w1 = {F32ToBf16(5.0f), F32ToBf16(6.0f)};
  SafetensorsWriter()
      .Add("layers.0.w", "F32", {2, 2}, Bytes(w0))
      .Write(Path("model-00001-of-00002.safetensors"));
  SafetensorsWriter()
      .Add("layers.1.w", "BF16", {2}, Bytes(w1))
      .Add("norm.w", "BF16", {2}, Bytes(w1))
      .Write(Path("model-00002-of-00002.safetensors"));
  std::ofstream(Path("model.safetensors.index.json")) << Json{
      {"metadata", {{"total_size", 24}}},
      {"weight_map",
       {{"layers.0.w", "model-00001-of-00002.safetensors"},
        {"layers.1.w", "model-00002-of-00002.safetensors"},
        {"norm.w", "model-00002-of-00002.safetensors"}}}}.dump();

  absl::StatusOr<std::unique_ptr<Checkpoint>> checkpoint = Checkpoint::Open(dir_);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  EXPECT_EQ((*checkpoint)->files().size(), 2u);
  EXPECT_THAT((*checkpoint)->Names(), ElementsAre("layers.0.w", "layers.1.w", "norm.w"));
  absl::StatusOr<TensorView> t0 = (*checkpoint)->Get("layers.0.w");
  ASSERT_TRUE(t0.ok());
  EXPECT_THAT(t0->file, HasSubstr("model-00001-of-00002.safetensors"));
  float values[4];
  ConvertToF32(t0->dtype, t0->data, 4, values);
  EXPECT_EQ(values[3], 4.0f);
  absl::StatusOr<TensorView> t1 = (*checkpoint)->Get("layers.1.w");
  ASSERT_TRUE(t1.ok());
  ConvertToF32(t1->dtype, t1->data, 2, values);
  EXPECT_EQ(values[1], 6.0f);
}

TEST_F(SafetensorsTest, CheckpointFallsBackToAllSafetensorsFiles) {
  SafetensorsWriter()
      .Add("a", "F32", {1}, Bytes(std::vector<float>{1}))
      .Write(Path("b.safetensors"));
  SafetensorsWriter()
      .Add("b", "F32", {1}, Bytes(std::vector<float>{2}))
      .Write(Path("a.safetensors"));
  absl::StatusOr<std::unique_ptr<Checkpoint>> checkpoint = Checkpoint::Open(dir_);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  ASSERT_EQ((*checkpoint)->files().size(), 2u);
  EXPECT_EQ((*checkpoint)->files()[0]->path(), Path("a.safetensors"));
  EXPECT_THAT((*checkpoint)->Names(), ElementsAre("a", "b"));
}

TEST_F(SafetensorsTest, TruncatedFileIsInvalid) {
  std::ofstream(Path("model.safetensors"), std::ios::binary) << std::string("\x10\x00\x00", 3);
  absl::Status status = SafetensorsFile::Open(Path("model.safetensors")).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(status), HasSubstr(Path("model.safetensors")));
  EXPECT_THAT(Msg(status), HasSubstr("3 bytes"));
}

TEST_F(SafetensorsTest, HeaderLengthPastEndOfFileIsInvalid) {
  WriteRaw(Path("model.safetensors"), "{}", "", /*header_len_override=*/1000);
  absl::Status status = SafetensorsFile::Open(Path("model.safetensors")).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(status), HasSubstr(Path("model.safetensors")));
  EXPECT_THAT(Msg(status), HasSubstr("header length 1000 past the end of file of 10 bytes"));
}

TEST_F(SafetensorsTest, BadHeaderJsonIsInvalid) {
  WriteRaw(Path("model.safetensors"), "{\"a\": [", "");
  absl::Status status = SafetensorsFile::Open(Path("model.safetensors")).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(status), HasSubstr(Path("model.safetensors")));
  EXPECT_THAT(Msg(status), HasSubstr("not valid JSON at byte"));
}

TEST_F(SafetensorsTest, OverlappingTensorsAreInvalid) {
  Json header = {{"first", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8}}}},
                 {"second", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {4, 12}}}}};
  WriteRaw(Path("model.safetensors"), header.dump(), std::string(12, '\0'));
  absl::Status status = SafetensorsFile::Open(Path("model.safetensors")).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(status), HasSubstr(Path("model.safetensors")));
  EXPECT_THAT(Msg(status), HasSubstr("'first'"));
  EXPECT_THAT(Msg(status), HasSubstr("'second'"));
  EXPECT_THAT(Msg(status), HasSubstr("overlap"));
}

TEST_F(SafetensorsTest, TensorInsideAnotherIsOverlapping) {
  Json header = {{"big", {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {0, 16}}}},
                 {"mid", {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {4, 8}}}},
                 {"tail", {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {8, 12}}}}};
  WriteRaw(Path("model.safetensors"), header.dump(), std::string(16, '\0'));
  absl::Status status = SafetensorsFile::Open(Path("model.safetensors")).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(status), HasSubstr("'big'"));
}

TEST_F(SafetensorsTest, OffsetsPastTheDataAreInvalid) {
  absl::Status status =
      OpenWithEntry({{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {0, 16}}}, /*data_size=*/8);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(status), HasSubstr(Path("bad.safetensors")));
  EXPECT_THAT(Msg(status), HasSubstr("'weight'"));
  EXPECT_THAT(Msg(status), HasSubstr("past the end of the data section of 8 bytes"));
}

TEST_F(SafetensorsTest, BeginAfterEndIsInvalid) {
  absl::Status status =
      OpenWithEntry({{"dtype", "F32"}, {"shape", {0}}, {"data_offsets", {8, 4}}}, 8);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(status), HasSubstr("'weight'"));
  EXPECT_THAT(Msg(status), HasSubstr("begin > end"));
}

TEST_F(SafetensorsTest, SizeMismatchIsInvalid) {
  absl::Status status =
      OpenWithEntry({{"dtype", "BF16"}, {"shape", {3, 2}}, {"data_offsets", {0, 8}}}, 8);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(status), HasSubstr(Path("bad.safetensors")));
  EXPECT_THAT(Msg(status), HasSubstr("'weight'"));
  EXPECT_THAT(Msg(status), HasSubstr("hold 8 bytes but shape [3, 2] of BF16 needs 12"));
}

TEST_F(SafetensorsTest, UnknownDtypeIsInvalid) {
  absl::Status status =
      OpenWithEntry({{"dtype", "F8_E4M3"}, {"shape", {2}}, {"data_offsets", {0, 2}}}, 2);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(status), HasSubstr(Path("bad.safetensors")));
  EXPECT_THAT(Msg(status), HasSubstr("'weight'"));
  EXPECT_THAT(Msg(status), HasSubstr("F8_E4M3"));
}

TEST_F(SafetensorsTest, NegativeDimensionIsInvalid) {
  absl::Status status =
      OpenWithEntry({{"dtype", "F32"}, {"shape", {-1, 2}}, {"data_offsets", {0, 0}}}, 0);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(status), HasSubstr("'weight'"));
  EXPECT_THAT(Msg(status), HasSubstr("-1"));
}

TEST_F(SafetensorsTest, OverflowingShapeIsInvalid) {
  absl::Status status = OpenWithEntry(
      {{"dtype", "F32"}, {"shape", {1LL << 40, 1LL << 40}}, {"data_offsets", {0, 0}}}, 0);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(status), HasSubstr("overflows"));
}

TEST_F(SafetensorsTest, MissingTensorIsNotFound) {
  SafetensorsWriter()
      .Add("x", "F32", {1}, Bytes(std::vector<float>{1}))
      .Write(Path("model.safetensors"));
  absl::StatusOr<std::unique_ptr<Checkpoint>> checkpoint = Checkpoint::Open(dir_);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  absl::Status status = (*checkpoint)->Get("model.norm.weight").status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(Msg(status), "tensor 'model.norm.weight' not found in checkpoint " + dir_);
}

TEST_F(SafetensorsTest, ShapeMismatchNamesTensorFileAndShapes) {
  SafetensorsWriter()
      .Add("w", "F32", {2, 3}, std::string(24, '\0'))
      .Write(Path("model.safetensors"));
  absl::StatusOr<std::unique_ptr<Checkpoint>> checkpoint = Checkpoint::Open(dir_);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  absl::Status status = (*checkpoint)->GetWithShape("w", {3, 2}).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Msg(status), "tensor 'w' in " + Path("model.safetensors") +
                             " has shape [2, 3], expected [3, 2] (from config.json)");
}

TEST_F(SafetensorsTest, IndexedTensorAbsentFromShardIsAnError) {
  SafetensorsWriter().Add("a", "F32", {1}, std::string(4, '\0')).Write(Path("shard1.safetensors"));
  std::ofstream(Path("model.safetensors.index.json"))
      << Json{{"weight_map", {{"a", "shard1.safetensors"}, {"ghost", "shard1.safetensors"}}}}
             .dump();
  absl::Status status = Checkpoint::Open(dir_).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Msg(status), HasSubstr("'ghost'"));
  EXPECT_THAT(Msg(status), HasSubstr(Path("shard1.safetensors")));
}

TEST_F(SafetensorsTest, IndexNamingAMissingShardIsNotFound) {
  std::ofstream(Path("model.safetensors.index.json"))
      << Json{{"weight_map", {{"a", "nowhere.safetensors"}}}}.dump();
  absl::Status status = Checkpoint::Open(dir_).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Msg(status), HasSubstr(Path("nowhere.safetensors")));
}

TEST_F(SafetensorsTest, TensorInTwoShardsIsAnError) {
  SafetensorsWriter().Add("a", "F32", {1}, std::string(4, '\0')).Write(Path("s1.safetensors"));
  SafetensorsWriter()
      .Add("a", "F32", {1}, std::string(4, '\0'))
      .Add("b", "F32", {1}, std::string(4, '\0'))
      .Write(Path("s2.safetensors"));
  std::ofstream(Path("model.safetensors.index.json"))
      << Json{{"weight_map", {{"a", "s1.safetensors"}, {"b", "s2.safetensors"}}}}.dump();
  absl::Status status = Checkpoint::Open(dir_).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(status), HasSubstr("'a'"));
  EXPECT_THAT(Msg(status), HasSubstr(Path("s1.safetensors")));
  EXPECT_THAT(Msg(status), HasSubstr(Path("s2.safetensors")));
}

TEST_F(SafetensorsTest, BadIndexJsonIsInvalid) {
  std::ofstream(Path("model.safetensors.index.json")) << "{\"weight_map\": ";
  absl::Status status = Checkpoint::Open(dir_).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(status), HasSubstr("model.safetensors.index.json"));
}

TEST_F(SafetensorsTest, EmptyDirectoryIsNotFound) {
  absl::Status status = Checkpoint::Open(dir_).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Msg(status), HasSubstr(dir_));
}

TEST_F(SafetensorsTest, MissingOrNonDirectoryPathIsAnError) {
  absl::Status status = Checkpoint::Open(Path("absent")).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Msg(status), HasSubstr(Path("absent")));
  EXPECT_THAT(Msg(status), HasSubstr("does not exist"));

  std::ofstream(Path("file")) << "x";
  status = Checkpoint::Open(Path("file")).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(status), HasSubstr("not a directory"));
}

TEST_F(SafetensorsTest, FromBufferParsesWithoutAFile) {
  std::vector<float> values = {1.0f, 2.0f};
  std::string header =
      Json{{"t", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8}}}}}.dump();
  std::string buffer(8, '\0');
  buffer[0] = static_cast<char>(header.size());
  buffer += header + Bytes(values);
  auto file = SafetensorsFile::FromBuffer(reinterpret_cast<const uint8_t*>(buffer.data()),
                                          buffer.size(), "buffer");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->tensors().at("t").data,
            reinterpret_cast<const uint8_t*>(buffer.data()) + 8 + header.size());
}

TEST(ShapeToStringTest, FormatsLikeAList) {
  EXPECT_EQ(ShapeToString({}), "[]");
  EXPECT_EQ(ShapeToString({7}), "[7]");
  EXPECT_EQ(ShapeToString({2, 3}), "[2, 3]");
}

}  // namespace
}  // namespace gemma
