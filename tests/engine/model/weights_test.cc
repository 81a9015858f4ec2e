#include "engine/model/weights.h"

#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "engine/isa/bf16.h"
#include "engine/model/model_config.h"
#include "engine/model/weights_internal.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/support/assets.h"
#include "tests/support/safetensors_writer.h"

namespace megaserve::engine {
namespace {

using ::megaserve::testing::assets_dir;
using ::megaserve::testing::f16_tensor;
using ::megaserve::testing::f32_tensor;
using ::megaserve::testing::float_to_f16_reference;
using ::megaserve::testing::make_test_dir;
using ::megaserve::testing::RandomModelOptions;
using ::megaserve::testing::TensorRecord;
using ::megaserve::testing::TensorValues;
using ::megaserve::testing::tiny_model_config;
using ::megaserve::testing::write_file;
using ::megaserve::testing::write_random_model;
using ::megaserve::testing::write_safetensors;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// The test's own reading of a safetensors file (nlohmann + memcpy, not the engine's reader):
// every tensor's record, in file order.
std::vector<TensorRecord> read_records(const std::filesystem::path& path) {
  const std::string bytes = ::megaserve::testing::read_file(path);
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);  // little-endian host
  const nlohmann::ordered_json header = nlohmann::ordered_json::parse(bytes.substr(8, header_len));
  std::vector<TensorRecord> records;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    const uint64_t begin = entry["data_offsets"][0];
    const uint64_t end = entry["data_offsets"][1];
    records.push_back({name, entry["dtype"].get<std::string>(),
                       entry["shape"].get<std::vector<int64_t>>(),
                       bytes.substr(8 + header_len + begin, end - begin)});
  }
  return records;
}

// The test's own map from Hugging Face names to megaserve's handles.
std::map<std::string, const Tensor*> handles(const ModelWeights& w, const ModelConfig& config) {
  std::map<std::string, const Tensor*> out;
  out["model.embed_tokens.weight"] = &w.embedding;
  out["model.norm.weight"] = &w.final_norm;
  if (!config.tie_word_embeddings) out["lm_head.weight"] = &w.lm_head;
  for (size_t i = 0; i < w.layers.size(); ++i) {
    const LayerWeights& l = w.layers[i];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    out[p + "input_layernorm.weight"] = &l.attn_norm;
    out[p + "post_attention_layernorm.weight"] = &l.ffn_norm;
    out[p + "self_attn.q_proj.weight"] = &l.wq;
    out[p + "self_attn.k_proj.weight"] = &l.wk;
    out[p + "self_attn.v_proj.weight"] = &l.wv;
    out[p + "self_attn.o_proj.weight"] = &l.wo;
    out[p + "mlp.gate_proj.weight"] = &l.w_gate;
    out[p + "mlp.up_proj.weight"] = &l.w_up;
    out[p + "mlp.down_proj.weight"] = &l.w_down;
    if (config.qkv_bias) {
      out[p + "self_attn.q_proj.bias"] = &l.bq;
      out[p + "self_attn.k_proj.bias"] = &l.bk;
      out[p + "self_attn.v_proj.bias"] = &l.bv;
    }
    if (config.qk_norm) {
      out[p + "self_attn.q_norm.weight"] = &l.q_norm;
      out[p + "self_attn.k_norm.weight"] = &l.k_norm;
    }
  }
  return out;
}

std::vector<float> to_floats(const Tensor& tensor) {
  std::vector<float> out(tensor.numel());
  for (int64_t i = 0; i < tensor.numel(); ++i) {
    switch (tensor.dtype) {
      case DType::kF32:
        out[i] = tensor.data<float>()[i];
        break;
      case DType::kBF16:
        out[i] = bf16_to_float(tensor.data<uint16_t>()[i]);
        break;
      case DType::kF16:
        out[i] = f16_to_float(tensor.data<uint16_t>()[i]);
        break;
    }
  }
  return out;
}

absl::StatusOr<ModelWeights> load(const std::filesystem::path& dir, DType dtype) {
  absl::StatusOr<ModelConfig> config = load_model_config(dir);
  if (!config.ok()) return config.status();
  return load_weights(dir, *config, dtype);
}

// Expects `status` to fail with `code` and a message containing every needle.
void expect_error(const absl::Status& status, absl::StatusCode code,
                  std::initializer_list<std::string> needles) {
  ASSERT_FALSE(status.ok());
  EXPECT_EQ(status.code(), code) << status;
  for (const std::string& needle : needles) {
    EXPECT_THAT(std::string(status.message()), HasSubstr(needle));
  }
}

TEST(WeightsTest, Stories260KFp32EqualsTheFileBytes) {
  MEGASERVE_REQUIRE_ASSET("models/stories260K-hf/model.safetensors");
  const std::filesystem::path dir = assets_dir() / "models/stories260K-hf";
  absl::StatusOr<ModelConfig> config = load_model_config(dir);
  ASSERT_TRUE(config.ok()) << config.status();
  absl::StatusOr<ModelWeights> weights = load_weights(dir, *config, DType::kF32);
  ASSERT_TRUE(weights.ok()) << weights.status();

  ASSERT_EQ(weights->layers.size(), 5u);
  EXPECT_THAT(weights->embedding.shape, ElementsAre(512, 64));
  EXPECT_THAT(weights->layers[0].wq.shape, ElementsAre(64, 64));
  EXPECT_THAT(weights->layers[0].wk.shape, ElementsAre(32, 64));
  EXPECT_THAT(weights->layers[0].wv.shape, ElementsAre(32, 64));
  EXPECT_THAT(weights->layers[0].wo.shape, ElementsAre(64, 64));
  EXPECT_THAT(weights->layers[0].w_gate.shape, ElementsAre(172, 64));
  EXPECT_THAT(weights->layers[0].w_down.shape, ElementsAre(64, 172));
  EXPECT_THAT(weights->final_norm.shape, ElementsAre(64));
  EXPECT_TRUE(weights->layers[0].bq.empty());
  EXPECT_TRUE(weights->layers[0].q_norm.empty());
  // Tied: lm_head is the embedding, the same bytes.
  EXPECT_EQ(weights->lm_head.bytes.get(), weights->embedding.bytes.get());
  EXPECT_THAT(weights->lm_head.shape, ElementsAre(512, 64));

  const std::map<std::string, const Tensor*> by_name = handles(*weights, *config);
  const std::vector<TensorRecord> records = read_records(dir / "model.safetensors");
  ASSERT_EQ(records.size(), by_name.size());  // every file tensor has a handle, and back
  for (const TensorRecord& record : records) {
    SCOPED_TRACE(record.name);
    ASSERT_EQ(by_name.count(record.name), 1u);
    const Tensor& tensor = *by_name.at(record.name);
    EXPECT_EQ(tensor.dtype, DType::kF32);
    EXPECT_EQ(tensor.shape, record.shape);
    ASSERT_EQ(tensor.bytes->size(), record.bytes.size());
    EXPECT_EQ(std::memcmp(tensor.bytes->data(), record.bytes.data(), record.bytes.size()), 0);
  }
}

TEST(WeightsTest, Stories260KBf16IsTheRoundedFp32) {
  MEGASERVE_REQUIRE_ASSET("models/stories260K-hf/model.safetensors");
  const std::filesystem::path dir = assets_dir() / "models/stories260K-hf";
  absl::StatusOr<ModelWeights> f32 = load(dir, DType::kF32);
  absl::StatusOr<ModelWeights> bf16 = load(dir, DType::kBF16);
  ASSERT_TRUE(f32.ok()) << f32.status();
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  EXPECT_EQ(bf16->lm_head.bytes.get(), bf16->embedding.bytes.get());
  absl::StatusOr<ModelConfig> config = load_model_config(dir);
  ASSERT_TRUE(config.ok()) << config.status();
  const auto f32_handles = handles(*f32, *config);
  const auto bf16_handles = handles(*bf16, *config);
  int64_t checked = 0;
  for (const auto& [name, tensor] : bf16_handles) {
    SCOPED_TRACE(name);
    const Tensor& reference = *f32_handles.at(name);
    ASSERT_EQ(tensor->dtype, DType::kBF16);
    ASSERT_EQ(tensor->shape, reference.shape);
    ASSERT_EQ(tensor->bytes->size(), reference.bytes->size() / 2);
    for (int64_t i = 0; i < tensor->numel(); ++i, ++checked) {
      ASSERT_EQ(tensor->data<uint16_t>()[i], float_to_bf16(reference.data<float>()[i])) << i;
    }
  }
  EXPECT_GT(checked, 250000);  // every parameter of the ~260K model
}

TEST(WeightsTest, Stories260KF16TargetMatchesReferenceRounding) {
  MEGASERVE_REQUIRE_ASSET("models/stories260K-hf/model.safetensors");
  const std::filesystem::path dir = assets_dir() / "models/stories260K-hf";
  absl::StatusOr<ModelWeights> f32 = load(dir, DType::kF32);
  absl::StatusOr<ModelWeights> f16 = load(dir, DType::kF16);
  ASSERT_TRUE(f32.ok()) << f32.status();
  ASSERT_TRUE(f16.ok()) << f16.status();
  ASSERT_EQ(f16->layers[2].w_up.dtype, DType::kF16);
  const std::pair<const Tensor*, const Tensor*> compared[] = {
      {&f32->layers[2].w_up, &f16->layers[2].w_up},
      {&f32->embedding, &f16->embedding},
      {&f32->final_norm, &f16->final_norm}};
  for (const auto& [reference, converted] : compared) {
    ASSERT_EQ(reference->numel(), converted->numel());
    for (int64_t i = 0; i < reference->numel(); ++i) {
      ASSERT_EQ(converted->data<uint16_t>()[i], float_to_f16_reference(reference->data<float>()[i]))
          << i;
    }
  }
}

TEST(WeightsTest, F16RoundsToNearestEven) {
  // Exact bit patterns (IEEE half) first, then the test writer's own rounding on a sweep.
  EXPECT_EQ(float_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(float_to_f16(-2.0f), 0xc000);
  EXPECT_EQ(float_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(float_to_f16(65519.0f), 0x7bff);
  EXPECT_EQ(float_to_f16(65520.0f), 0x7c00);  // the tie above the largest half: infinity
  EXPECT_EQ(float_to_f16(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(float_to_f16(std::ldexp(1.0f, -25)), 0x0000);             // tie to even (zero)
  EXPECT_EQ(float_to_f16(3 * std::ldexp(1.0f, -25)), 0x0002);         // 1.5 units: tie to even
  EXPECT_EQ(float_to_f16(std::ldexp(1.0f, -14)), 0x0400);             // smallest normal
  EXPECT_EQ(float_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);      // tie to even
  EXPECT_EQ(float_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);  // tie to even
  EXPECT_EQ(float_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(float_to_f16(INFINITY), 0x7c00);
  EXPECT_TRUE(std::isnan(f16_to_float(float_to_f16(NAN))));
  for (uint32_t k = 0; k < 200000; ++k) {
    // Bit patterns spread over every exponent a half can reach and beyond, up to infinity
    // (an odd step, so the low mantissa bits that decide rounding vary).
    const uint32_t bits = 0x30000000u + k * 0x19ffu;
    float value;
    std::memcpy(&value, &bits, 4);
    ASSERT_EQ(float_to_f16(value), float_to_f16_reference(value)) << value;
    ASSERT_EQ(float_to_f16(-value), float_to_f16_reference(-value)) << -value;
  }
}

class RandomModelTest : public ::testing::TestWithParam<ModelFamily> {};

TEST_P(RandomModelTest, LoadsEveryTensorUnderItsHandle) {
  const ModelConfig written = tiny_model_config(GetParam());
  const std::filesystem::path dir = make_test_dir("model");
  const TensorValues values = write_random_model(dir, written, /*seed=*/7);
  absl::StatusOr<ModelConfig> config = load_model_config(dir);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->family, written.family);
  EXPECT_EQ(config->head_dim, written.head_dim);
  absl::StatusOr<ModelWeights> weights = load_weights(dir, *config, DType::kF32);
  ASSERT_TRUE(weights.ok()) << weights.status();

  const auto by_name = handles(*weights, *config);
  ASSERT_EQ(by_name.size(), values.size());
  for (const auto& [name, expected] : values) {
    SCOPED_TRACE(name);
    ASSERT_EQ(by_name.count(name), 1u);
    EXPECT_EQ(to_floats(*by_name.at(name)), expected);
  }
  const LayerWeights& layer = weights->layers[1];
  EXPECT_EQ(layer.bq.empty(), !written.qkv_bias);
  EXPECT_EQ(layer.q_norm.empty(), !written.qk_norm);
  if (written.qkv_bias) {
    EXPECT_THAT(layer.bq.shape, ElementsAre(written.q_size()));
    EXPECT_THAT(layer.bk.shape, ElementsAre(written.kv_size()));
    EXPECT_THAT(layer.bv.shape, ElementsAre(written.kv_size()));
  }
  if (written.qk_norm) {
    EXPECT_THAT(layer.q_norm.shape, ElementsAre(written.head_dim));
    EXPECT_THAT(layer.k_norm.shape, ElementsAre(written.head_dim));
  }
  EXPECT_THAT(layer.wq.shape, ElementsAre(written.q_size(), written.hidden_size));
  EXPECT_THAT(layer.wo.shape, ElementsAre(written.hidden_size, written.q_size()));
  EXPECT_EQ(weights->lm_head.bytes.get() == weights->embedding.bytes.get(),
            written.tie_word_embeddings);
  EXPECT_THAT(weights->lm_head.shape, ElementsAre(written.vocab_size, written.hidden_size));
}

TEST_P(RandomModelTest, LoadsShardsThroughTheIndex) {
  const ModelConfig written = tiny_model_config(GetParam());
  const std::filesystem::path dir = make_test_dir("sharded");
  const TensorValues values = write_random_model(dir, written, 11, {.num_shards = 3});
  ASSERT_TRUE(std::filesystem::exists(dir / "model-00003-of-00003.safetensors"));
  ASSERT_FALSE(std::filesystem::exists(dir / "model.safetensors"));
  absl::StatusOr<ModelWeights> weights = load(dir, DType::kF32);
  ASSERT_TRUE(weights.ok()) << weights.status();
  const auto by_name = handles(*weights, tiny_model_config(GetParam()));
  ASSERT_EQ(by_name.size(), values.size());
  for (const auto& [name, expected] : values) {
    SCOPED_TRACE(name);
    EXPECT_EQ(to_floats(*by_name.at(name)), expected);
  }
}

TEST_P(RandomModelTest, ConvertsF16AndBf16Sources) {
  const ModelConfig written = tiny_model_config(GetParam());
  for (const char* source : {"F16", "BF16"}) {
    SCOPED_TRACE(source);
    const std::filesystem::path dir = make_test_dir(source);
    // The returned values are already rounded to the file's dtype, so F32 loads exactly.
    const TensorValues values = write_random_model(dir, written, 3, {.dtype = source});
    absl::StatusOr<ModelWeights> f32 = load(dir, DType::kF32);
    absl::StatusOr<ModelWeights> bf16 = load(dir, DType::kBF16);
    ASSERT_TRUE(f32.ok()) << f32.status();
    ASSERT_TRUE(bf16.ok()) << bf16.status();
    const auto f32_by_name = handles(*f32, written);
    const auto bf16_by_name = handles(*bf16, written);
    for (const auto& [name, expected] : values) {
      SCOPED_TRACE(name);
      EXPECT_EQ(to_floats(*f32_by_name.at(name)), expected);
      const Tensor& converted = *bf16_by_name.at(name);
      ASSERT_EQ(converted.dtype, DType::kBF16);
      for (size_t i = 0; i < expected.size(); ++i) {
        ASSERT_EQ(converted.data<uint16_t>()[i], float_to_bf16(expected[i])) << i;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Families, RandomModelTest,
                         ::testing::Values(ModelFamily::kLlama, ModelFamily::kQwen2,
                                           ModelFamily::kQwen3),
                         [](const ::testing::TestParamInfo<ModelFamily>& info) {
                           switch (info.param) {
                             case ModelFamily::kLlama:
                               return "Llama";
                             case ModelFamily::kQwen2:
                               return "Qwen2";
                             case ModelFamily::kQwen3:
                               return "Qwen3";
                           }
                           return "Unknown";
                         });

TEST(WeightsTest, F16BitPatternsWidenExactly) {
  const ModelConfig config = tiny_model_config(ModelFamily::kLlama);
  const std::filesystem::path dir = make_test_dir("model");
  write_random_model(dir, config, 5);
  std::vector<TensorRecord> records = read_records(dir / "model.safetensors");
  // model.norm.weight [32] as hand-written half bits: 1, -2, 65504, 2^-24, -0, 0.5, 2^-14, ...
  const uint16_t bits[8] = {0x3c00, 0xc000, 0x7bff, 0x0001, 0x8000, 0x3800, 0x0400, 0x3555};
  const float expected[8] = {
      1.0f,          -2.0f, 65504.0f, std::ldexp(1.0f, -24), -0.0f, 0.5f, std::ldexp(1.0f, -14),
      1365.0f / 4096};
  for (TensorRecord& record : records) {
    if (record.name != "model.norm.weight") continue;
    record.dtype = "F16";
    record.bytes.assign(64, '\0');
    for (int i = 0; i < 32; ++i) std::memcpy(&record.bytes[2 * i], &bits[i % 8], 2);
  }
  write_safetensors(dir / "model.safetensors", records);
  absl::StatusOr<ModelWeights> weights = load(dir, DType::kF32);
  ASSERT_TRUE(weights.ok()) << weights.status();
  for (int i = 0; i < 32; ++i) {
    const float want = expected[i % 8];  // 0x3555 is 1.0101010101b * 2^-2 = 1365/4096
    EXPECT_EQ(weights->final_norm.data<float>()[i], want) << i;
    EXPECT_EQ(std::signbit(weights->final_norm.data<float>()[i]), std::signbit(want)) << i;
  }
}

// Writes a tiny Llama model, lets `edit` change its tensors, and loads it.
absl::Status load_edited(const std::string& name,
                         const std::function<void(std::vector<TensorRecord>&)>& edit,
                         ModelFamily family = ModelFamily::kLlama) {
  const std::filesystem::path dir = make_test_dir(name);
  write_random_model(dir, tiny_model_config(family), 1);
  std::vector<TensorRecord> records = read_records(dir / "model.safetensors");
  edit(records);
  write_safetensors(dir / "model.safetensors", records);
  return load(dir, DType::kF32).status();
}

void replace_tensor(std::vector<TensorRecord>& records, const TensorRecord& replacement) {
  for (TensorRecord& record : records) {
    if (record.name == replacement.name) record = replacement;
  }
}

void erase_tensor(std::vector<TensorRecord>& records, const std::string& name) {
  std::erase_if(records, [&](const TensorRecord& record) { return record.name == name; });
}

TEST(WeightsErrorTest, NamesTheMissingTensor) {
  expect_error(
      load_edited("missing", [](auto& r) { erase_tensor(r, "model.layers.1.mlp.up_proj.weight"); }),
      absl::StatusCode::kNotFound, {"model.layers.1.mlp.up_proj.weight", "missing"});
  expect_error(load_edited(
                   "bias", [](auto& r) { erase_tensor(r, "model.layers.0.self_attn.k_proj.bias"); },
                   ModelFamily::kQwen2),
               absl::StatusCode::kNotFound, {"model.layers.0.self_attn.k_proj.bias"});
  expect_error(
      load_edited(
          "qnorm", [](auto& r) { erase_tensor(r, "model.layers.1.self_attn.q_norm.weight"); },
          ModelFamily::kQwen3),
      absl::StatusCode::kNotFound, {"model.layers.1.self_attn.q_norm.weight"});
  expect_error(load_edited("lm_head", [](auto& r) { erase_tensor(r, "lm_head.weight"); }),
               absl::StatusCode::kNotFound, {"lm_head.weight"});
}

TEST(WeightsErrorTest, NamesFileTensorAndShapesOnWrongShape) {
  // k_proj is [kv_size 16, hidden 32]; the same bytes transposed.
  expect_error(
      load_edited("shape",
                  [](auto& r) {
                    replace_tensor(r, f32_tensor("model.layers.0.self_attn.k_proj.weight", {32, 16},
                                                 std::vector<float>(512, 0.5f)));
                  }),
      absl::StatusCode::kInvalidArgument,
      {"model.safetensors", "model.layers.0.self_attn.k_proj.weight", "[32, 16]", "[16, 32]"});
}

TEST(WeightsErrorTest, NamesTheUnsupportedDtype) {
  for (const char* dtype : {"I64", "F8_E4M3", "F64"}) {
    const int size = std::string(dtype) == "F8_E4M3" ? 1 : 8;
    expect_error(
        load_edited(dtype,
                    [&](auto& r) {
                      replace_tensor(
                          r, TensorRecord{
                                 "model.norm.weight", dtype, {32}, std::string(32 * size, '\0')});
                    }),
        absl::StatusCode::kInvalidArgument, {"model.safetensors", "model.norm.weight", dtype});
  }
}

TEST(WeightsErrorTest, UnexpectedTensorsAreErrorsExceptRopeBuffers) {
  expect_error(
      load_edited("extra",
                  [](auto& r) {
                    r.push_back(f32_tensor("model.layers.0.self_attn.extra.weight", {2}, {1, 2}));
                  }),
      absl::StatusCode::kInvalidArgument,
      {"model.safetensors", "unexpected tensor", "model.layers.0.self_attn.extra.weight"});
  // Biases on a Llama model are unexpected too.
  expect_error(load_edited("llama_bias",
                           [](auto& r) {
                             r.push_back(f32_tensor("model.layers.0.self_attn.q_proj.bias", {32},
                                                    std::vector<float>(32, 0)));
                           }),
               absl::StatusCode::kInvalidArgument, {"model.layers.0.self_attn.q_proj.bias"});
  EXPECT_TRUE(load_edited("inv_freq", [](auto& r) {
                r.push_back(f32_tensor("model.layers.0.self_attn.rotary_emb.inv_freq", {4},
                                       {1, 0.1f, 0.01f, 0.001f}));
              }).ok());
  // A tied model that still ships lm_head.weight: the tie decides.
  EXPECT_TRUE(load_edited(
                  "tied_lm_head",
                  [](auto& r) {
                    r.push_back(f32_tensor("lm_head.weight", {64, 32}, std::vector<float>(2048)));
                  },
                  ModelFamily::kQwen2)
                  .ok());
}

TEST(WeightsErrorTest, TruncatedOrGarbledFilesNameTheFile) {
  const ModelConfig config = tiny_model_config(ModelFamily::kLlama);
  const std::filesystem::path dir = make_test_dir("truncated");
  write_random_model(dir, config, 1);
  const std::filesystem::path file = dir / "model.safetensors";
  std::filesystem::resize_file(file, std::filesystem::file_size(file) - 5);
  expect_error(load(dir, DType::kF32).status(), absl::StatusCode::kInvalidArgument,
               {file.string(), "past the end"});
  write_file(file, std::string("\x08\0\0\0\0\0\0\0not json", 16));
  expect_error(load(dir, DType::kF32).status(), absl::StatusCode::kInvalidArgument,
               {file.string(), "JSON"});
  std::filesystem::remove(file);
  expect_error(load(dir, DType::kF32).status(), absl::StatusCode::kNotFound,
               {dir.string(), "model.safetensors"});
}

TEST(WeightsErrorTest, RefusesAnIncompleteConfig) {
  ModelConfig config = tiny_model_config(ModelFamily::kLlama);
  const std::filesystem::path dir = make_test_dir("model");
  write_random_model(dir, config, 1);
  config.num_kv_heads = 0;
  expect_error(load_weights(dir, config, DType::kF32).status(), absl::StatusCode::kInvalidArgument,
               {"num_kv_heads"});
}

TEST(WeightsErrorTest, ShardIndexProblemsNameIndexAndShard) {
  const ModelConfig config = tiny_model_config(ModelFamily::kLlama);
  const std::filesystem::path dir = make_test_dir("sharded");
  write_random_model(dir, config, 1, {.num_shards = 2});
  const std::filesystem::path index_path = dir / "model.safetensors.index.json";
  const std::string index_text = ::megaserve::testing::read_file(index_path);
  const nlohmann::json index = nlohmann::json::parse(index_text);
  const std::string shard1 = "model-00001-of-00002.safetensors";
  const std::string shard2 = "model-00002-of-00002.safetensors";
  auto with_index = [&](const nlohmann::json& edited) {
    write_file(index_path, edited.dump());
    return load(dir, DType::kF32).status();
  };
  ASSERT_TRUE(with_index(index).ok());

  write_file(index_path, "{\"weight_map\": {");
  expect_error(load(dir, DType::kF32).status(), absl::StatusCode::kInvalidArgument,
               {index_path.string(), "JSON"});
  expect_error(with_index({{"metadata", {}}}), absl::StatusCode::kInvalidArgument,
               {index_path.string(), "weight_map"});

  nlohmann::json missing_shard = index;
  missing_shard["weight_map"]["model.norm.weight"] = "model-00003-of-00003.safetensors";
  expect_error(with_index(missing_shard), absl::StatusCode::kNotFound,
               {"model-00003-of-00003.safetensors", index_path.string()});

  nlohmann::json moved = index;  // the map says shard 1, but the tensor is in shard 2
  moved["weight_map"]["model.norm.weight"] = shard1;
  expect_error(with_index(moved), absl::StatusCode::kNotFound, {"model.norm.weight", shard1});

  nlohmann::json dropped = index;  // shard 2 holds a tensor the map does not list
  dropped["weight_map"].erase("model.norm.weight");
  expect_error(with_index(dropped), absl::StatusCode::kInvalidArgument,
               {"model.norm.weight", shard2, "weight_map"});

  nlohmann::json escape = index;
  escape["weight_map"]["model.norm.weight"] = "../" + shard2;
  expect_error(with_index(escape), absl::StatusCode::kInvalidArgument,
               {"model.norm.weight", "not a file name"});
}

TEST(DummyWeightsTest, ShapesScaleAndDeterminism) {
  for (ModelFamily family : {ModelFamily::kLlama, ModelFamily::kQwen2, ModelFamily::kQwen3}) {
    SCOPED_TRACE(static_cast<int>(family));
    ModelConfig config = tiny_model_config(family);
    const ModelWeights a = dummy_weights(config, DType::kF32, 42);
    const ModelWeights b = dummy_weights(config, DType::kF32, 42);
    const ModelWeights c = dummy_weights(config, DType::kF32, 43);
    const ModelWeights a16 = dummy_weights(config, DType::kBF16, 42);
    const auto by_a = handles(a, config);
    const auto by_b = handles(b, config);
    const auto by_c = handles(c, config);
    const auto by_a16 = handles(a16, config);
    EXPECT_EQ(a.lm_head.bytes.get() == a.embedding.bytes.get(), config.tie_word_embeddings);
    for (const auto& [name, tensor] : by_a) {
      SCOPED_TRACE(name);
      ASSERT_FALSE(tensor->empty());
      EXPECT_EQ(*tensor->bytes, *by_b.at(name)->bytes);  // same seed, same weights
      const std::vector<float> values = to_floats(*tensor);
      ASSERT_EQ(static_cast<int64_t>(values.size()), tensor->numel());
      ASSERT_EQ(tensor->bytes->size(), values.size() * 4);
      for (size_t i = 0; i < values.size(); ++i) {
        ASSERT_EQ(by_a16.at(name)->data<uint16_t>()[i], float_to_bf16(values[i]));
      }
      if (name.find("norm") != std::string::npos) {
        EXPECT_THAT(values, ::testing::Each(1.0f));
        continue;
      }
      EXPECT_NE(*tensor->bytes, *by_c.at(name)->bytes);  // another seed, other weights
      // U(-a, a), a = 1/sqrt(in_features): bounded, mean ~0, standard deviation a/sqrt(3).
      const double in = tensor->shape.size() == 2 ? tensor->shape[1] : config.hidden_size;
      const double bound = 1 / std::sqrt(in);
      double sum = 0, sum_sq = 0;
      for (float v : values) {
        ASSERT_LE(std::fabs(v), bound);
        sum += v;
        sum_sq += static_cast<double>(v) * v;
      }
      const double n = values.size();
      if (n < 256) continue;  // too few draws for the moments to be tight
      EXPECT_NEAR(sum / n, 0.0, 4 * bound / std::sqrt(3 * n));
      EXPECT_NEAR(std::sqrt(sum_sq / n), bound / std::sqrt(3.0), 0.25 * bound);
    }
  }
}

TEST(DummyWeightsTest, Llama31_8BShapesWithoutFilling) {
  // The shape list behind dummy_weights, for the real 8B config (filling it would take
  // 16 GB): every handle, the right shapes, 8.03B parameters.
  absl::StatusOr<ModelConfig> config = load_model_config_file(
      std::filesystem::path(MEGASERVE_SOURCE_DIR) / "configs/models/llama-3.1-8b.json");
  ASSERT_TRUE(config.ok()) << config.status();
  ModelWeights weights;
  const std::vector<WeightSlot> slots = weight_slots(*config, &weights);
  int64_t parameters = 0;
  for (const WeightSlot& slot : slots) {
    int64_t n = 1;
    for (int64_t extent : slot.shape) n *= extent;
    parameters += n;
  }
  EXPECT_EQ(slots.size(), 1u + 32 * 9 + 2);
  EXPECT_EQ(parameters, 8030261248);
  EXPECT_EQ(weights.layers.size(), 32u);
}

TEST(DTypeTest, NamesAndSizes) {
  EXPECT_STREQ(dtype_name(DType::kF32), "F32");
  EXPECT_STREQ(dtype_name(DType::kBF16), "BF16");
  EXPECT_STREQ(dtype_name(DType::kF16), "F16");
  EXPECT_EQ(dtype_size(DType::kF32), 4);
  EXPECT_EQ(dtype_size(DType::kBF16), 2);
  EXPECT_EQ(dtype_size(DType::kF16), 2);
  Tensor tensor;
  tensor.shape = {3, 5, 7};
  EXPECT_EQ(tensor.numel(), 105);
  EXPECT_TRUE(tensor.empty());
}

}  // namespace
}  // namespace megaserve::engine
