#include "engine/model/safetensors.h"

#include <cstring>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/safetensors_writer.h"

namespace megaserve::engine {
namespace {

using ::megaserve::testing::f32_tensor;
using ::megaserve::testing::make_test_dir;
using ::megaserve::testing::safetensors_bytes;
using ::megaserve::testing::TensorRecord;
using ::megaserve::testing::write_file;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string le64(uint64_t value) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(value >> (8 * i) & 0xff);
  return bytes;
}

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = make_test_dir("files"); }

  std::filesystem::path write(const std::string& bytes) {
    const std::filesystem::path path = dir_ / "model.safetensors";
    write_file(path, bytes);
    return path;
  }

  // Opens `bytes` as a file and expects InvalidArgument naming the file and every needle.
  void expect_invalid(const std::string& bytes, std::initializer_list<std::string> needles) {
    const std::filesystem::path path = write(bytes);
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::open(path);
    ASSERT_FALSE(file.ok());
    EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << file.status();
    const std::string message(file.status().message());
    EXPECT_THAT(message, HasSubstr(path.string()));
    for (const std::string& needle : needles) EXPECT_THAT(message, HasSubstr(needle));
  }

  std::filesystem::path dir_;
};

TEST_F(SafetensorsTest, ReadsTensorsMetadataAndBytes) {
  const std::vector<float> a = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, -0.125f};
  const std::vector<float> b = {42.0f};
  TensorRecord ids{"ids", "I64", {2}, std::string(16, '\0')};
  const int64_t id_values[2] = {-5, 1LL << 40};
  std::memcpy(ids.bytes.data(), id_values, 16);
  const std::filesystem::path path =
      write(safetensors_bytes({f32_tensor("layer.a", {2, 3}, a), ids, f32_tensor("b", {}, b)}));

  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->path(), path);
  ASSERT_EQ((*file)->tensors().size(), 3u);
  EXPECT_EQ((*file)->tensors()[0].name, "b");  // sorted by name
  EXPECT_EQ((*file)->metadata().at("format"), "pt");

  const SafetensorsTensor* ta = (*file)->find("layer.a");
  ASSERT_NE(ta, nullptr);
  EXPECT_EQ(ta->dtype, SafetensorsDtype::kF32);
  EXPECT_THAT(ta->shape, ElementsAre(2, 3));
  EXPECT_EQ(ta->numel(), 6);
  EXPECT_EQ(ta->begin, 0u);
  EXPECT_EQ(ta->num_bytes(), 24u);
  std::vector<float> read(6);
  std::memcpy(read.data(), ta->data, 24);
  EXPECT_EQ(read, a);

  const SafetensorsTensor* tids = (*file)->find("ids");
  ASSERT_NE(tids, nullptr);
  EXPECT_EQ(tids->dtype, SafetensorsDtype::kI64);
  EXPECT_EQ(tids->begin, 24u);
  int64_t read_ids[2];
  std::memcpy(read_ids, tids->data, 16);
  EXPECT_EQ(read_ids[0], -5);
  EXPECT_EQ(read_ids[1], 1LL << 40);

  const SafetensorsTensor* tb = (*file)->find("b");
  ASSERT_NE(tb, nullptr);
  EXPECT_TRUE(tb->shape.empty());  // a scalar holds one element
  EXPECT_EQ(tb->numel(), 1);
  float scalar;
  std::memcpy(&scalar, tb->data, 4);
  EXPECT_EQ(scalar, 42.0f);

  EXPECT_EQ((*file)->find("c"), nullptr);
  EXPECT_EQ((*file)->find("layer"), nullptr);
}

TEST_F(SafetensorsTest, UnpaddedHeaderAndEveryDtype) {
  // The header length need not be a multiple of 8; data then starts unaligned.
  std::string header = R"({"x":{"dtype":"BF16","shape":[3],"data_offsets":[0,6]},)"
                       R"("f8":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[6,8]},)"
                       R"("d":{"dtype":"F64","shape":[1],"data_offsets":[8,16]},)"
                       R"("e":{"dtype":"F16","shape":[0,4],"data_offsets":[16,16]}})";
  if (header.size() % 8 == 0) header += " ";  // JSON allows trailing whitespace
  ASSERT_NE(header.size() % 8, 0u);
  std::string data("\x80\x3f\x00\x40\x40\x40", 6);  // bf16 1.0, 2.0, 3.0
  data += std::string("\x01\x02", 2) + std::string(8, '\x11');
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::open(write(le64(header.size()) + header + data));
  ASSERT_TRUE(file.ok()) << file.status();
  const SafetensorsTensor* x = (*file)->find("x");
  ASSERT_NE(x, nullptr);
  EXPECT_EQ(x->dtype, SafetensorsDtype::kBF16);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(x->data), 6), data.substr(0, 6));
  EXPECT_EQ((*file)->find("f8")->dtype, SafetensorsDtype::kF8E4M3);
  EXPECT_EQ((*file)->find("d")->dtype, SafetensorsDtype::kF64);
  EXPECT_EQ((*file)->find("e")->numel(), 0);

  const struct {
    SafetensorsDtype dtype;
    const char* name;
    int size;
  } expected[] = {
      {SafetensorsDtype::kBool, "BOOL", 1},     {SafetensorsDtype::kU8, "U8", 1},
      {SafetensorsDtype::kI8, "I8", 1},         {SafetensorsDtype::kI16, "I16", 2},
      {SafetensorsDtype::kU16, "U16", 2},       {SafetensorsDtype::kF16, "F16", 2},
      {SafetensorsDtype::kBF16, "BF16", 2},     {SafetensorsDtype::kI32, "I32", 4},
      {SafetensorsDtype::kU32, "U32", 4},       {SafetensorsDtype::kF32, "F32", 4},
      {SafetensorsDtype::kF64, "F64", 8},       {SafetensorsDtype::kI64, "I64", 8},
      {SafetensorsDtype::kU64, "U64", 8},       {SafetensorsDtype::kF8E4M3, "F8_E4M3", 1},
      {SafetensorsDtype::kF8E5M2, "F8_E5M2", 1}};
  for (const auto& e : expected) {
    EXPECT_STREQ(safetensors_dtype_name(e.dtype), e.name);
    EXPECT_EQ(safetensors_dtype_size(e.dtype), e.size) << e.name;
  }
}

TEST_F(SafetensorsTest, MissingFileIsNotFound) {
  const std::filesystem::path path = dir_ / "absent.safetensors";
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(file.status().message()), HasSubstr(path.string()));
}

TEST_F(SafetensorsTest, RefusesTruncatedFraming) {
  expect_invalid("", {"too short"});
  expect_invalid(std::string("\x10\x00\x00", 3), {"too short"});
  expect_invalid(le64(100) + "{}", {"header length 100", "past the end"});
  expect_invalid(le64(~0ull) + "{}", {"past the end"});  // no overflow in 8 + length
}

TEST_F(SafetensorsTest, RefusesHeadersThatAreNotWellFormedJson) {
  expect_invalid(safetensors_bytes("{\"a\": {", ""), {"not valid JSON"});
  expect_invalid(safetensors_bytes("[1, 2, 3]", ""), {"not a JSON object"});
  expect_invalid(safetensors_bytes(R"({"a": 5})", ""), {"'a'", "not an object"});
  expect_invalid(safetensors_bytes(R"({"__metadata__": {"format": 1}})", ""), {"__metadata__"});
  expect_invalid(safetensors_bytes(R"({"__metadata__": [1]})", ""), {"__metadata__"});
}

TEST_F(SafetensorsTest, RefusesEntriesWithWrongFields) {
  const std::string data(8, '\0');
  auto one = [&](const std::string& entry) {
    return safetensors_bytes(R"({"w": )" + entry + "}", data);
  };
  expect_invalid(one(R"({"shape": [2], "data_offsets": [0, 8]})"), {"'w'", "dtype"});
  expect_invalid(one(R"({"dtype": 4, "shape": [2], "data_offsets": [0, 8]})"), {"'w'", "dtype"});
  expect_invalid(one(R"({"dtype": "F128", "shape": [2], "data_offsets": [0, 8]})"),
                 {"'w'", "unknown dtype 'F128'"});
  expect_invalid(one(R"({"dtype": "F32", "data_offsets": [0, 8]})"), {"'w'", "shape"});
  expect_invalid(one(R"({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]})"),
                 {"'w'", "shape"});
  expect_invalid(one(R"({"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]})"),
                 {"'w'", "shape"});
  expect_invalid(one(R"({"dtype": "F32", "shape": [2]})"), {"'w'", "data_offsets"});
  expect_invalid(one(R"({"dtype": "F32", "shape": [2], "data_offsets": [0]})"),
                 {"'w'", "data_offsets"});
  expect_invalid(one(R"({"dtype": "F32", "shape": [2], "data_offsets": [0, "8"]})"),
                 {"'w'", "data_offsets"});
  expect_invalid(one(R"({"dtype": "F32", "shape": [0], "data_offsets": [8, 0]})"),
                 {"'w'", "end before they begin"});
}

TEST_F(SafetensorsTest, RefusesShapeBytesMismatch) {
  const std::string data(12, '\0');
  expect_invalid(safetensors_bytes(
                     R"({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}})", data),
                 {"'w'", "[2, 2]", "needs 16 bytes", "hold 12"});
  // 2^40 * 2^40 elements overflow 64 bits: still a clean error.
  expect_invalid(safetensors_bytes(R"({"w": {"dtype": "F32", "shape": [1099511627776,
                                      1099511627776], "data_offsets": [0, 12]}})",
                                   data),
                 {"'w'", "more than 2^64"});
}

TEST_F(SafetensorsTest, RefusesOffsetsPastTheEndAndTruncatedData) {
  expect_invalid(
      safetensors_bytes(R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})",
                        std::string(12, '\0')),
      {"'w'", "past the end", "truncated"});
  // A whole valid file cut short by a few bytes.
  std::string bytes =
      safetensors_bytes({f32_tensor("a", {4}, {1, 2, 3, 4}), f32_tensor("b", {4}, {5, 6, 7, 8})});
  bytes.resize(bytes.size() - 3);
  expect_invalid(bytes, {"'b'", "past the end"});
}

TEST_F(SafetensorsTest, RefusesOverlappingAndDuplicateTensors) {
  expect_invalid(safetensors_bytes(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                                   std::string(12, '\0')),
                 {"'b'", "overlaps", "'a'"});
  expect_invalid(safetensors_bytes(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                            "a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}})",
                                   std::string(16, '\0')),
                 {"'a'", "more than once"});
}

}  // namespace
}  // namespace megaserve::engine
