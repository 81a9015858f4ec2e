// The GGUF reader (engine/model/gguf.h) on files written by tests/support/gguf_writer, and
// ggml dequantization (engine/model/ggml_types.h) against the writer's own reference.
#include "engine/model/gguf.h"

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "engine/model/ggml_types.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/gguf_writer.h"
#include "tests/support/safetensors_writer.h"

namespace megaserve::engine {
namespace {

using ::megaserve::testing::bf16_round;
using ::megaserve::testing::bf16_value;
using ::megaserve::testing::f16_value;
using ::megaserve::testing::float_to_f16_reference;
using ::megaserve::testing::gguf_bf16;
using ::megaserve::testing::gguf_bytes;
using ::megaserve::testing::gguf_f16;
using ::megaserve::testing::gguf_f32;
using ::megaserve::testing::GgufFileOptions;
using ::megaserve::testing::GgufKv;
using ::megaserve::testing::GgufTensorRecord;
using ::megaserve::testing::le_bytes;
using ::megaserve::testing::make_test_dir;
using ::megaserve::testing::random_quantized;
using ::megaserve::testing::write_file;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
namespace t = ::megaserve::testing;

std::string msg(const absl::Status& status) { return std::string(status.message()); }

std::filesystem::path write_gguf(const std::string& name, const std::vector<GgufKv>& kvs,
                                 const std::vector<GgufTensorRecord>& tensors,
                                 const GgufFileOptions& options = {}) {
  const std::filesystem::path path = make_test_dir("gguf") / name;
  write_file(path, gguf_bytes(kvs, tensors, options));
  return path;
}

std::vector<float> iota_values(int64_t n, float scale) {
  std::vector<float> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = scale * static_cast<float>(i - n / 2);
  return out;
}

// A small valid file: a few key/values and three tensors of different types.
std::vector<GgufKv> small_kvs() {
  return {t::kv_string("general.architecture", "llama"), t::kv_u32("llama.block_count", 2),
          t::kv_f32("llama.rope.freq_base", 10000.0f)};
}
std::vector<GgufTensorRecord> small_tensors() {
  return {gguf_f32("a.weight", {3, 2}, iota_values(6, 0.5f)),
          gguf_f16("b.weight", {5}, iota_values(5, 0.25f)),
          {"c.weight", t::kGgmlQ8_0, {32, 2}, random_quantized(t::kGgmlQ8_0, 64, 7).bytes}};
}

TEST(GgufFileTest, ReadsEveryMetadataTypeAndTensorInfos) {
  const std::vector<GgufKv> kvs = {
      t::kv_u8("u8", 200),
      t::kv_i8("i8", -100),
      t::kv_u16("u16", 60000),
      t::kv_i16("i16", -30000),
      t::kv_u32("u32", 4000000000u),
      t::kv_i32("i32", -2000000000),
      t::kv_f32("f32", 1.5f),
      t::kv_bool("bool", true),
      t::kv_string("string", "héllo"),
      t::kv_u64("u64", 1ull << 40),
      t::kv_i64("i64", -(1ll << 40)),
      t::kv_f64("f64", 0.1),
      t::kv_string_array("strings", {"a", "", "<|im_end|>"}),
      t::kv_i32_array("ints", {1, -2, 3}),
      t::kv_array("u8s", t::kGgufUint8, 3, std::string("\x01\x02\xff", 3)),
      // An array of two arrays of UINT16.
      t::kv_array("nested", t::kGgufArray, 2,
                  le_bytes<uint32_t>(t::kGgufUint16) + le_bytes<uint64_t>(1) +
                      le_bytes<uint16_t>(7) + le_bytes<uint32_t>(t::kGgufUint16) +
                      le_bytes<uint64_t>(0)),
      t::kv_array("empty", t::kGgufString, 0, ""),
  };
  const auto path = write_gguf("all.gguf", kvs, small_tensors());
  absl::StatusOr<std::unique_ptr<GgufFile>> opened = GgufFile::open(path);
  ASSERT_TRUE(opened.ok()) << opened.status();
  const GgufFile& file = **opened;
  EXPECT_EQ(file.version(), 3u);
  EXPECT_EQ(file.alignment(), 32u);
  EXPECT_EQ(file.data_offset() % 32, 0u);
  EXPECT_EQ(file.metadata().size(), kvs.size());

  EXPECT_EQ(*file.get_int("u8"), 200);
  EXPECT_EQ(*file.get_int("i8"), -100);
  EXPECT_EQ(*file.get_int("u16"), 60000);
  EXPECT_EQ(*file.get_int("i16"), -30000);
  EXPECT_EQ(*file.get_int("u32"), 4000000000ll);
  EXPECT_EQ(*file.get_int("i32"), -2000000000);
  EXPECT_EQ(*file.get_int("u64"), 1ll << 40);
  EXPECT_EQ(*file.get_int("i64"), -(1ll << 40));
  EXPECT_EQ(*file.get_float("f32"), 1.5);
  EXPECT_EQ(*file.get_float("f64"), 0.1);
  EXPECT_EQ(*file.get_bool("bool"), true);
  EXPECT_EQ(*file.get_string("string"), "héllo");
  EXPECT_THAT(*file.get_string_array("strings"), ElementsAre("a", "", "<|im_end|>"));
  EXPECT_THAT(*file.get_int_array("ints"), ElementsAre(1, -2, 3));
  EXPECT_THAT(*file.get_int_array("u8s"), ElementsAre(1, 2, 255));
  EXPECT_TRUE(file.get_string_array("empty")->empty());
  EXPECT_EQ(file.find_metadata("u16")->type(), GgufValueType::kUint16);
  EXPECT_EQ(std::get<int16_t>(file.find_metadata("i16")->value), -30000);

  const GgufValue* nested = file.find_metadata("nested");
  ASSERT_NE(nested, nullptr);
  const auto& outer = std::get<GgufArray>(nested->value);
  EXPECT_EQ(outer.element_type, GgufValueType::kArray);
  ASSERT_EQ(outer.elements.size(), 2u);
  const auto& inner = std::get<GgufArray>(outer.elements[0].value);
  EXPECT_EQ(inner.element_type, GgufValueType::kUint16);
  ASSERT_EQ(inner.elements.size(), 1u);
  EXPECT_EQ(std::get<uint16_t>(inner.elements[0].value), 7);

  // Typed reads name the key and both types when they do not fit, and the file.
  EXPECT_THAT(msg(file.get_int("f32").status()),
              AllOf(HasSubstr(path.string()), HasSubstr("'f32' is FLOAT32, expected an integer")));
  EXPECT_THAT(msg(file.get_string_array("ints").status()),
              HasSubstr("'ints' is ARRAY of INT32, expected ARRAY of STRING"));
  EXPECT_EQ(file.get_int("missing").status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(msg(file.get_int("missing").status()),
              AllOf(HasSubstr(path.string()), HasSubstr("no metadata key 'missing'")));

  ASSERT_EQ(file.tensors().size(), 3u);
  const GgufTensor& a = file.tensors()[0];
  EXPECT_EQ(a.name, "a.weight");
  EXPECT_EQ(a.type, GgmlType::kF32);
  EXPECT_THAT(a.dims, ElementsAre(3, 2));
  EXPECT_THAT(a.shape(), ElementsAre(2, 3));
  EXPECT_EQ(a.num_bytes, 24u);
  EXPECT_EQ(a.offset, 0u);
  std::vector<float> a_values(6);
  std::memcpy(a_values.data(), a.data, 24);
  EXPECT_EQ(a_values, iota_values(6, 0.5f));
  const GgufTensor* b = file.find_tensor("b.weight");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->type, GgmlType::kF16);
  EXPECT_EQ(b->offset, 32u);  // after a's 24 bytes, padded to the alignment
  EXPECT_EQ(b->num_bytes, 10u);
  const GgufTensor* c = file.find_tensor("c.weight");
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->type, GgmlType::kQ8_0);
  EXPECT_EQ(c->offset, 64u);
  EXPECT_EQ(c->num_bytes, 68u);  // two blocks of 34 bytes
  EXPECT_EQ(c->row_bytes(), 34u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(c->data) % 32, 0u);
  EXPECT_EQ(file.find_tensor("d.weight"), nullptr);
}

TEST(GgufFileTest, HonoursGeneralAlignment) {
  std::vector<GgufKv> kvs = small_kvs();
  kvs.push_back(t::kv_u32("general.alignment", 64));
  const auto path = write_gguf("aligned.gguf", kvs, small_tensors(), {.alignment = 64});
  absl::StatusOr<std::unique_ptr<GgufFile>> file = GgufFile::open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->alignment(), 64u);
  EXPECT_EQ((*file)->data_offset() % 64, 0u);
  EXPECT_EQ((*file)->find_tensor("b.weight")->offset, 64u);
  EXPECT_EQ((*file)->find_tensor("c.weight")->offset, 128u);
}

TEST(GgufFileTest, ReadsVersion2AndAFileWithoutTensors) {
  const auto path = write_gguf("v2.gguf", small_kvs(), {}, {.version = 2});
  absl::StatusOr<std::unique_ptr<GgufFile>> file = GgufFile::open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->version(), 2u);
  EXPECT_TRUE((*file)->tensors().empty());
}

// Every bad file fails with InvalidArgument naming the file and the problem.
void expect_bad(const std::filesystem::path& path, const std::string& problem) {
  absl::StatusOr<std::unique_ptr<GgufFile>> file = GgufFile::open(path);
  ASSERT_FALSE(file.ok()) << path;
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << file.status();
  EXPECT_THAT(std::string(file.status().message()),
              AllOf(HasSubstr(path.string()), HasSubstr(problem)));
}

TEST(GgufFileTest, EveryTruncationFailsCleanly) {
  const std::string bytes = gguf_bytes(small_kvs(), small_tensors());
  const std::filesystem::path dir = make_test_dir("truncated");
  // Every prefix: the header, the metadata, the tensor infos, the padding and the data are
  // each cut somewhere; none may crash, all must say the file is truncated.
  for (size_t length = 0; length < bytes.size(); ++length) {
    const std::filesystem::path path = dir / ("cut" + std::to_string(length) + ".gguf");
    write_file(path, bytes.substr(0, length));
    SCOPED_TRACE(length);
    expect_bad(path, "truncated file");
  }
}

// Every byte before the data section overwritten with a few awkward values: the reader
// either accepts the file (a changed name or value) or refuses it with a message naming the
// file, and never reads outside it (the ASAN twin of this suite checks that).
TEST(GgufFileTest, CorruptedHeaderBytesFailCleanly) {
  std::vector<GgufKv> kvs = small_kvs();
  kvs.push_back(t::kv_string_array("tokens", {"a", "bc"}));
  kvs.push_back(t::kv_array("nested", t::kGgufArray, 1,
                            le_bytes<uint32_t>(t::kGgufUint8) + le_bytes<uint64_t>(1) + "x"));
  const std::string bytes = gguf_bytes(kvs, small_tensors());
  absl::StatusOr<std::unique_ptr<GgufFile>> original =
      GgufFile::open(write_gguf("ok.gguf", kvs, small_tensors()));
  ASSERT_TRUE(original.ok()) << original.status();
  const uint64_t header_end = (*original)->data_offset();
  const std::filesystem::path path = make_test_dir("corrupt") / "corrupt.gguf";
  int refused = 0;
  for (uint64_t i = 0; i < header_end; ++i) {
    for (uint8_t value : {0x00, 0x01, 0x7f, 0x80, 0xff}) {
      if (static_cast<uint8_t>(bytes[i]) == value) continue;
      std::string corrupt = bytes;
      corrupt[i] = static_cast<char>(value);
      write_file(path, corrupt);
      absl::StatusOr<std::unique_ptr<GgufFile>> file = GgufFile::open(path);
      if (file.ok()) {
        for (const GgufTensor& tensor : (*file)->tensors()) {
          ASSERT_LE((*file)->data_offset() + tensor.offset + tensor.num_bytes, corrupt.size());
        }
        continue;
      }
      ++refused;
      ASSERT_THAT(msg(file.status()), HasSubstr(path.string())) << "byte " << i;
    }
  }
  EXPECT_GT(refused, 0);
}

TEST(GgufFileTest, TruncationMessagesSayWhatWasCut) {
  const std::string bytes = gguf_bytes(small_kvs(), small_tensors());
  const std::filesystem::path dir = make_test_dir("truncated");
  write_file(dir / "empty.gguf", "");
  expect_bad(dir / "empty.gguf", "truncated file: the magic needs 4 bytes at offset 0");
  write_file(dir / "data.gguf", bytes.substr(0, bytes.size() - 1));
  expect_bad(dir / "data.gguf", "tensor 'c.weight' data");
  expect_bad(dir / "data.gguf", "runs past the end of the file");
  write_file(dir / "kv.gguf", bytes.substr(0, 100));  // in the second value
  expect_bad(dir / "kv.gguf", "truncated file: metadata 'llama.block_count' needs 4 bytes");
}

TEST(GgufFileTest, RefusesABadMagic) {
  expect_bad(write_gguf("magic.gguf", small_kvs(), small_tensors(), {.magic = 0x46554746}),
             "bad magic 'FGUF': not a GGUF file");
  const std::filesystem::path path = make_test_dir("st") / "model.safetensors";
  write_file(path, std::string("\x10\x00\x00\x00\x00\x00\x00\x00{}", 10));
  expect_bad(path, "bad magic '\\x10\\x00\\x00\\x00'");
}

TEST(GgufFileTest, RefusesUnsupportedVersions) {
  expect_bad(write_gguf("v1.gguf", small_kvs(), {}, {.version = 1}), "unsupported GGUF version 1");
  expect_bad(write_gguf("v4.gguf", small_kvs(), {}, {.version = 4}), "unsupported GGUF version 4");
  expect_bad(write_gguf("be.gguf", small_kvs(), {}, {.version = 3u << 24}), "big-endian");
}

TEST(GgufFileTest, RefusesUnknownTypes) {
  std::vector<GgufTensorRecord> tensors = small_tensors();
  tensors[1].type = 99;
  expect_bad(write_gguf("type99.gguf", small_kvs(), tensors),
             "tensor 'b.weight' has unknown tensor type 99");
  tensors[1].type = 4;  // Q4_2, removed from ggml
  expect_bad(write_gguf("type4.gguf", small_kvs(), tensors),
             "tensor 'b.weight' has unknown tensor type 4");
  std::vector<GgufKv> kvs = small_kvs();
  kvs.push_back(GgufKv{"odd", 13, le_bytes<uint32_t>(0)});
  expect_bad(write_gguf("value13.gguf", kvs, {}), "metadata 'odd': unknown value type 13");
  kvs.back() = t::kv_array("odd", 42, 0, "");
  expect_bad(write_gguf("element42.gguf", kvs, {}), "metadata 'odd': unknown value type 42");
  kvs.back() = GgufKv{"flag", t::kGgufBool, le_bytes<uint8_t>(2)};
  expect_bad(write_gguf("bool2.gguf", kvs, {}), "BOOL value 2 is not 0 or 1");
}

TEST(GgufFileTest, RefusesMisplacedTensorData) {
  std::vector<GgufTensorRecord> tensors = small_tensors();
  tensors[2].offset_override = 48;  // a multiple of 16, not of 32
  expect_bad(write_gguf("misaligned.gguf", small_kvs(), tensors),
             "tensor 'c.weight' has data offset 48, not a multiple of the alignment 32");
  tensors[2].offset_override = 4096;
  expect_bad(write_gguf("past.gguf", small_kvs(), tensors), "runs past the end of the file");
  tensors[2].offset_override = 32;  // on top of b.weight
  expect_bad(write_gguf("overlap.gguf", small_kvs(), tensors),
             "tensor 'c.weight' (data offset 32) overlaps tensor 'b.weight'");
  tensors[2].offset_override = -1;
  tensors[2].dims = {16, 4};  // Q8_0 rows must be whole 32-element blocks
  expect_bad(write_gguf("rows.gguf", small_kvs(), tensors),
             "tensor 'c.weight' of type Q8_0 has rows of 16 elements, not a multiple of its "
             "32-element block");
  tensors[2].dims = {32, 1, 1, 1, 2};
  expect_bad(write_gguf("rank5.gguf", small_kvs(), tensors), "has 5 dimensions; at most 4");
  tensors = small_tensors();
  tensors[1].name = "a.weight";
  expect_bad(write_gguf("dup_tensor.gguf", small_kvs(), tensors),
             "tensor name 'a.weight' appears more than once");
}

TEST(GgufFileTest, RefusesBadMetadata) {
  std::vector<GgufKv> kvs = small_kvs();
  kvs.push_back(t::kv_u32("llama.block_count", 3));
  expect_bad(write_gguf("dup_key.gguf", kvs, {}),
             "metadata key 'llama.block_count' appears more than once");
  for (uint32_t bad : {0u, 3u, 48u}) {
    kvs = small_kvs();
    kvs.push_back(t::kv_u32("general.alignment", bad));
    expect_bad(write_gguf("align" + std::to_string(bad) + ".gguf", kvs, {}),
               "general.alignment " + std::to_string(bad) + " is not a non-zero power of two");
  }
  kvs = small_kvs();
  kvs.push_back(t::kv_u64("general.alignment", 32));
  expect_bad(write_gguf("align_u64.gguf", kvs, {}), "general.alignment is UINT64, must be UINT32");
  // A count the rest of the file cannot hold is refused before anything is allocated.
  kvs = small_kvs();
  kvs.push_back(t::kv_array("huge", t::kGgufUint64, 1ull << 60, ""));
  expect_bad(write_gguf("huge.gguf", kvs, {}), "truncated file: metadata 'huge': array length");
}

// ---- Dequantization ----

TEST(GgmlTypesTest, KnowsEveryLiveTypeAndOnlyThose) {
  EXPECT_STREQ(ggml_type_info(3)->name, "Q4_1");
  EXPECT_EQ(ggml_type_info(3)->type_size, 20);
  EXPECT_EQ(ggml_type_info(8)->type_size, 34);
  EXPECT_EQ(ggml_type_info(2)->type_size, 18);
  EXPECT_EQ(ggml_type_info(12)->block_size, 256);
  EXPECT_STREQ(ggml_type_info(30)->name, "BF16");
  for (uint32_t removed : {4u, 5u, 31u, 32u, 33u, 36u, 37u, 38u, 1000u}) {
    EXPECT_EQ(ggml_type_info(removed), nullptr) << removed;
  }
  EXPECT_EQ(ggml_dequantizable_type_names(), "F32, F16, BF16, Q8_0, Q4_0, Q4_1");
  EXPECT_FALSE(ggml_can_dequantize(GgmlType::kQ4_K));
}

// Hand-made blocks whose values are exact, checked one by one: the nibble order and the
// formulas themselves.
TEST(GgmlTypesTest, DequantizesHandMadeBlocks) {
  uint8_t q4[32];
  for (int j = 0; j < 32; ++j) q4[j] = static_cast<uint8_t>(j % 16);
  q4[16] = 15;  // byte 0 holds elements 0 (low nibble) and 16 (high nibble)
  std::vector<float> out(32);

  const std::string q4_0 = t::q4_0_block(0x3800, q4);  // d = 0.5
  EXPECT_EQ(static_cast<uint8_t>(q4_0[2]), 0xf0);
  ASSERT_TRUE(dequantize_to_f32(GgmlType::kQ4_0, reinterpret_cast<const uint8_t*>(q4_0.data()), 32,
                                out.data())
                  .ok());
  EXPECT_EQ(out[0], -4.0f);   // (0 - 8) * 0.5
  EXPECT_EQ(out[8], 0.0f);    // (8 - 8) * 0.5
  EXPECT_EQ(out[15], 3.5f);   // (15 - 8) * 0.5
  EXPECT_EQ(out[16], 3.5f);   // high nibble of byte 0
  EXPECT_EQ(out[17], -3.5f);  // (1 - 8) * 0.5

  const std::string q4_1 = t::q4_1_block(0x3400, 0xbc00, q4);  // d = 0.25, m = -1
  ASSERT_TRUE(dequantize_to_f32(GgmlType::kQ4_1, reinterpret_cast<const uint8_t*>(q4_1.data()), 32,
                                out.data())
                  .ok());
  EXPECT_EQ(out[0], -1.0f);
  EXPECT_EQ(out[4], 0.0f);
  EXPECT_EQ(out[16], 2.75f);  // 15 * 0.25 - 1
  EXPECT_EQ(out[31], 2.75f);

  int8_t q8[32];
  for (int j = 0; j < 32; ++j) q8[j] = static_cast<int8_t>(j * 8 - 128);
  const std::string q8_0 = t::q8_0_block(0xc000, q8);  // d = -2
  ASSERT_TRUE(dequantize_to_f32(GgmlType::kQ8_0, reinterpret_cast<const uint8_t*>(q8_0.data()), 32,
                                out.data())
                  .ok());
  EXPECT_EQ(out[0], 256.0f);
  EXPECT_EQ(out[16], 0.0f);
  EXPECT_EQ(out[31], -240.0f);
}

struct SweepCase {
  uint32_t type;
  const char* name;
};

class DequantizeSweepTest : public ::testing::TestWithParam<SweepCase> {};

// Random blocks (and, for the float types, random values with their special cases) against
// the writer's reference, for awkward lengths, in fp32 and rounded to bf16.
TEST_P(DequantizeSweepTest, MatchesTheReference) {
  const uint32_t type = GetParam().type;
  const int block = type == t::kGgmlQ8_0 || type == t::kGgmlQ4_0 || type == t::kGgmlQ4_1 ? 32 : 1;
  for (int64_t blocks : {1, 2, 3, 7, 33, 100}) {
    const int64_t n = blocks * block;
    SCOPED_TRACE(n);
    std::string bytes;
    std::vector<float> expected;
    if (block == 32) {
      t::QuantizedData data = random_quantized(type, n, 1000 + n);
      bytes = std::move(data.bytes);
      expected = std::move(data.values);
    } else {
      std::vector<float> values(n);
      for (int64_t i = 0; i < n; ++i) values[i] = std::sin(0.7f * i) * std::pow(10.0f, i % 9 - 4);
      if (n > 5) values[3] = 1e-7f, values[4] = -65504.0f, values[5] = 3e38f;
      GgufTensorRecord record = type == t::kGgmlF32   ? gguf_f32("x", {n}, values)
                                : type == t::kGgmlF16 ? gguf_f16("x", {n}, values)
                                                      : gguf_bf16("x", {n}, values);
      bytes = record.bytes;
      for (int64_t i = 0; i < n; ++i) {
        uint16_t bits;
        std::memcpy(&bits, bytes.data() + 2 * i, 2);
        expected.push_back(type == t::kGgmlF32   ? values[i]
                           : type == t::kGgmlF16 ? f16_value(bits)
                                                 : bf16_value(bits));
      }
    }
    const GgmlType ggml = ggml_type_info(type)->type;
    const auto* src = reinterpret_cast<const uint8_t*>(bytes.data());
    std::vector<float> f32(n, NAN);
    ASSERT_TRUE(dequantize_to_f32(ggml, src, n, f32.data()).ok());
    std::vector<uint16_t> bf16(n + 2, 0xdead);  // a sentinel past the end
    ASSERT_TRUE(dequantize_to_bf16(ggml, src, n, bf16.data()).ok());
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(f32[i], expected[i]) << "element " << i;
      ASSERT_EQ(bf16[i], bf16_round(expected[i])) << "element " << i << " = " << expected[i];
    }
    EXPECT_EQ(bf16[n], 0xdead);
  }
}

INSTANTIATE_TEST_SUITE_P(
    EveryType, DequantizeSweepTest,
    ::testing::Values(SweepCase{t::kGgmlF32, "F32"}, SweepCase{t::kGgmlF16, "F16"},
                      SweepCase{t::kGgmlBF16, "BF16"}, SweepCase{t::kGgmlQ8_0, "Q8_0"},
                      SweepCase{t::kGgmlQ4_0, "Q4_0"}, SweepCase{t::kGgmlQ4_1, "Q4_1"}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(GgmlTypesTest, Bf16RoundsToNearestEvenOnce) {
  // Q8_0 with d = 2.00390625 (fp16 0x4002): q = 127 gives 254.49609375 in fp32, which bf16
  // (8 significant bits; 1 apart in [128, 256)) rounds down to 254; q = -127 to -254; q = 63
  // gives 126.24609375, to 126.
  int8_t q[32] = {};
  q[0] = 127;
  q[1] = -127;
  q[2] = 63;
  const std::string block = t::q8_0_block(0x4002, q);
  std::vector<uint16_t> out(32);
  ASSERT_TRUE(dequantize_to_bf16(GgmlType::kQ8_0, reinterpret_cast<const uint8_t*>(block.data()),
                                 32, out.data())
                  .ok());
  EXPECT_EQ(bf16_value(out[0]), 254.0f);
  EXPECT_EQ(bf16_value(out[1]), -254.0f);
  EXPECT_EQ(bf16_value(out[2]), 126.0f);
  // Exact ties, through an F32 tensor: 257 lies between 256 and 258 (to even 256), 259
  // between 258 and 260 (to even 260).
  std::vector<uint16_t> ties(2);
  const std::string f32 = le_bytes(257.0f) + le_bytes(259.0f);
  ASSERT_TRUE(dequantize_to_bf16(GgmlType::kF32, reinterpret_cast<const uint8_t*>(f32.data()), 2,
                                 ties.data())
                  .ok());
  EXPECT_EQ(bf16_value(ties[0]), 256.0f);
  EXPECT_EQ(bf16_value(ties[1]), 260.0f);
}

TEST(GgmlTypesTest, RefusesWhatItCannotDequantize) {
  std::vector<uint8_t> src(256);
  std::vector<float> out(256);
  absl::Status status = dequantize_to_f32(GgmlType::kQ4_K, src.data(), 256, out.data());
  EXPECT_THAT(msg(status), HasSubstr("cannot dequantize ggml type Q4_K (supported: F32, "
                                     "F16, BF16, Q8_0, Q4_0, Q4_1)"));
  status = dequantize_to_f32(GgmlType::kQ4_1, src.data(), 48, out.data());
  EXPECT_THAT(msg(status), HasSubstr("48 elements of Q4_1: not a multiple of its 32-element"));
}

}  // namespace
}  // namespace megaserve::engine
