#include "engine/model/model_config.h"

#include <cmath>
#include <numbers>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/assets.h"
#include "tests/support/safetensors_writer.h"

namespace megaserve::engine {
namespace {

using ::megaserve::testing::assets_dir;
using ::megaserve::testing::make_test_dir;
using ::megaserve::testing::write_file;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

const std::filesystem::path kModelsDir =
    std::filesystem::path(MEGASERVE_SOURCE_DIR) / "configs/models";

// A minimal valid Llama config.json with `extra` fields (not already in it) appended.
std::string llama_json(const std::string& extra = "") {
  std::string text = R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
    "intermediate_size": 172, "num_hidden_layers": 5, "num_attention_heads": 8,
    "vocab_size": 512)";
  if (!extra.empty()) text += ", " + extra;
  return text + "}";
}

// Parses and expects InvalidArgument whose message contains every one of `needles`.
void expect_refused(const std::string& json, std::initializer_list<std::string> needles) {
  absl::StatusOr<ModelConfig> config = parse_model_config(json, "test/config.json");
  ASSERT_FALSE(config.ok()) << json;
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument) << config.status();
  EXPECT_THAT(std::string(config.status().message()), HasSubstr("test/config.json"));
  for (const std::string& needle : needles) {
    EXPECT_THAT(std::string(config.status().message()), HasSubstr(needle)) << json;
  }
}

TEST(ModelConfigTest, LoadsStories260K) {
  MEGASERVE_REQUIRE_ASSET("models/stories260K-hf/config.json");
  absl::StatusOr<ModelConfig> config = load_model_config(assets_dir() / "models/stories260K-hf");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->architecture, "LlamaForCausalLM");
  EXPECT_EQ(config->family, ModelFamily::kLlama);
  EXPECT_EQ(config->hidden_size, 64);
  EXPECT_EQ(config->intermediate_size, 172);
  EXPECT_EQ(config->num_layers, 5);
  EXPECT_EQ(config->num_heads, 8);
  EXPECT_EQ(config->num_kv_heads, 4);
  EXPECT_EQ(config->head_dim, 8);
  EXPECT_EQ(config->vocab_size, 512);
  EXPECT_EQ(config->max_position_embeddings, 512);
  EXPECT_EQ(config->rms_norm_eps, 1e-5f);
  EXPECT_EQ(config->rope_theta, 10000.0f);
  EXPECT_EQ(config->rope_scaling.type, RopeScalingType::kNone);
  EXPECT_TRUE(config->tie_word_embeddings);
  EXPECT_FALSE(config->qkv_bias);
  EXPECT_FALSE(config->qk_norm);
  EXPECT_EQ(config->bos_token_id, 1);
  EXPECT_THAT(config->eos_token_ids, ElementsAre(2));
  EXPECT_EQ(config->torch_dtype, "float32");
  EXPECT_EQ(config->q_size(), 64);
  EXPECT_EQ(config->kv_size(), 32);
}

TEST(ModelConfigTest, Llama31_8B) {
  absl::StatusOr<ModelConfig> config = load_model_config_file(kModelsDir / "llama-3.1-8b.json");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->family, ModelFamily::kLlama);
  EXPECT_EQ(config->num_layers, 32);
  EXPECT_EQ(config->hidden_size, 4096);
  EXPECT_EQ(config->num_heads, 32);
  EXPECT_EQ(config->num_kv_heads, 8);
  EXPECT_EQ(config->head_dim, 128);
  EXPECT_EQ(config->intermediate_size, 14336);
  EXPECT_EQ(config->vocab_size, 128256);
  EXPECT_EQ(config->max_position_embeddings, 131072);
  EXPECT_EQ(config->rope_theta, 500000.0f);
  EXPECT_EQ(config->rope_scaling.type, RopeScalingType::kLlama3);
  EXPECT_EQ(config->rope_scaling.factor, 8.0f);
  EXPECT_EQ(config->rope_scaling.low_freq_factor, 1.0f);
  EXPECT_EQ(config->rope_scaling.high_freq_factor, 4.0f);
  EXPECT_EQ(config->rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_FALSE(config->tie_word_embeddings);
  EXPECT_EQ(config->bos_token_id, 128000);
  EXPECT_THAT(config->eos_token_ids, ElementsAre(128001));
  EXPECT_EQ(config->torch_dtype, "bfloat16");
}

TEST(ModelConfigTest, Llama32_1B) {
  absl::StatusOr<ModelConfig> config = load_model_config_file(kModelsDir / "llama-3.2-1b.json");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->num_layers, 16);
  EXPECT_EQ(config->hidden_size, 2048);
  EXPECT_EQ(config->num_heads, 32);
  EXPECT_EQ(config->num_kv_heads, 8);
  EXPECT_EQ(config->head_dim, 64);
  EXPECT_EQ(config->intermediate_size, 8192);
  EXPECT_EQ(config->vocab_size, 128256);
  EXPECT_TRUE(config->tie_word_embeddings);
  EXPECT_EQ(config->rope_scaling.type, RopeScalingType::kLlama3);
  EXPECT_EQ(config->rope_scaling.factor, 32.0f);
}

TEST(ModelConfigTest, Qwen25_7B) {
  absl::StatusOr<ModelConfig> config = load_model_config_file(kModelsDir / "qwen2.5-7b.json");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->family, ModelFamily::kQwen2);
  EXPECT_TRUE(config->qkv_bias);
  EXPECT_FALSE(config->qk_norm);
  EXPECT_EQ(config->num_layers, 28);
  EXPECT_EQ(config->hidden_size, 3584);
  EXPECT_EQ(config->num_heads, 28);
  EXPECT_EQ(config->num_kv_heads, 4);
  EXPECT_EQ(config->head_dim, 128);
  EXPECT_EQ(config->intermediate_size, 18944);
  EXPECT_EQ(config->vocab_size, 152064);
  EXPECT_EQ(config->rms_norm_eps, 1e-6f);
  EXPECT_EQ(config->rope_theta, 1e6f);
  EXPECT_EQ(config->rope_scaling.type, RopeScalingType::kNone);
  EXPECT_FALSE(config->tie_word_embeddings);
}

TEST(ModelConfigTest, Qwen3_8B) {
  absl::StatusOr<ModelConfig> config = load_model_config_file(kModelsDir / "qwen3-8b.json");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->family, ModelFamily::kQwen3);
  EXPECT_FALSE(config->qkv_bias);
  EXPECT_TRUE(config->qk_norm);
  EXPECT_EQ(config->num_layers, 36);
  EXPECT_EQ(config->hidden_size, 4096);
  EXPECT_EQ(config->num_heads, 32);
  EXPECT_EQ(config->num_kv_heads, 8);
  EXPECT_EQ(config->head_dim, 128);
  EXPECT_EQ(config->intermediate_size, 12288);
  EXPECT_EQ(config->vocab_size, 151936);
  EXPECT_EQ(config->max_position_embeddings, 40960);
  EXPECT_THAT(config->eos_token_ids, ElementsAre(151645));
}

TEST(ModelConfigTest, HeadDimFromConfigOrDerived) {
  absl::StatusOr<ModelConfig> derived = parse_model_config(llama_json(), "c.json");
  ASSERT_TRUE(derived.ok()) << derived.status();
  EXPECT_EQ(derived->head_dim, 8);
  EXPECT_EQ(derived->num_kv_heads, 8);  // absent: plain multi-head attention
  // Qwen3-0.6B's shape: head_dim 128 although hidden / heads = 64.
  absl::StatusOr<ModelConfig> given = parse_model_config(
      R"({"architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024, "intermediate_size": 3072,
          "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
          "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": true})",
      "c.json");
  ASSERT_TRUE(given.ok()) << given.status();
  EXPECT_EQ(given->head_dim, 128);
  EXPECT_EQ(given->q_size(), 2048);
  EXPECT_EQ(given->kv_size(), 1024);
  EXPECT_TRUE(given->tie_word_embeddings);
  // head_dim: null (some exporters write it) falls back to hidden / heads.
  absl::StatusOr<ModelConfig> null_head_dim =
      parse_model_config(llama_json(R"("head_dim": null)"), "c.json");
  ASSERT_TRUE(null_head_dim.ok()) << null_head_dim.status();
  EXPECT_EQ(null_head_dim->head_dim, 8);
}

TEST(ModelConfigTest, ArchitectureFromModelTypeWhenNoArchitectures) {
  absl::StatusOr<ModelConfig> config = parse_model_config(
      R"({"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100})",
      "c.json");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->architecture, "Qwen2ForCausalLM");
  EXPECT_EQ(config->family, ModelFamily::kQwen2);
  EXPECT_TRUE(config->qkv_bias);
}

TEST(ModelConfigTest, EosIdsAsIntOrListAndNullBos) {
  absl::StatusOr<ModelConfig> list = parse_model_config(
      llama_json(R"("eos_token_id": [128001, 128008, 128009], "bos_token_id": null)"), "c.json");
  ASSERT_TRUE(list.ok()) << list.status();
  EXPECT_THAT(list->eos_token_ids, ElementsAre(128001, 128008, 128009));
  EXPECT_EQ(list->bos_token_id, -1);
  expect_refused(llama_json(R"("eos_token_id": "2")"), {"eos_token_id"});
  expect_refused(llama_json(R"("eos_token_id": [2, -1])"), {"eos_token_id"});
}

TEST(ModelConfigTest, GenerationConfigOverridesEos) {
  const std::filesystem::path dir = make_test_dir("model");
  write_file(dir / "config.json", llama_json(R"("eos_token_id": 2)"));
  write_file(dir / "generation_config.json", R"({"bos_token_id": 1, "eos_token_id": [7, 9]})");
  absl::StatusOr<ModelConfig> config = load_model_config(dir);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_THAT(config->eos_token_ids, ElementsAre(7, 9));

  write_file(dir / "generation_config.json", R"({"eos_token_id": 11})");
  config = load_model_config(dir);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_THAT(config->eos_token_ids, ElementsAre(11));

  write_file(dir / "generation_config.json", R"({"do_sample": true})");  // no eos: keep config's
  config = load_model_config(dir);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_THAT(config->eos_token_ids, ElementsAre(2));

  write_file(dir / "generation_config.json", R"({"eos_token_id": [7,)");
  config = load_model_config(dir);
  ASSERT_FALSE(config.ok());
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(config.status().message()), HasSubstr("generation_config.json"));
}

TEST(ModelConfigTest, MissingConfigFileIsNotFound) {
  const std::filesystem::path dir = make_test_dir("empty");
  absl::StatusOr<ModelConfig> config = load_model_config(dir);
  ASSERT_FALSE(config.ok());
  EXPECT_EQ(config.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(config.status().message()), HasSubstr((dir / "config.json").string()));
}

TEST(ModelConfigTest, RopeScalingSpellings) {
  // Older configs say "type"; transformers 5 moves everything into rope_parameters.
  absl::StatusOr<ModelConfig> old_key = parse_model_config(
      llama_json(R"("rope_scaling": {"type": "llama3", "factor": 16, "low_freq_factor": 2,
                    "high_freq_factor": 8, "original_max_position_embeddings": 4096})"),
      "c.json");
  ASSERT_TRUE(old_key.ok()) << old_key.status();
  EXPECT_EQ(old_key->rope_scaling.type, RopeScalingType::kLlama3);
  EXPECT_EQ(old_key->rope_scaling.factor, 16.0f);
  EXPECT_EQ(old_key->rope_scaling.low_freq_factor, 2.0f);
  EXPECT_EQ(old_key->rope_scaling.high_freq_factor, 8.0f);
  EXPECT_EQ(old_key->rope_scaling.original_max_position_embeddings, 4096);

  absl::StatusOr<ModelConfig> v5 = parse_model_config(
      llama_json(R"("rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
                    "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192})"),
      "c.json");
  ASSERT_TRUE(v5.ok()) << v5.status();
  EXPECT_EQ(v5->rope_theta, 500000.0f);
  EXPECT_EQ(v5->rope_scaling.type, RopeScalingType::kLlama3);
  EXPECT_EQ(v5->rope_scaling.factor, 8.0f);

  absl::StatusOr<ModelConfig> plain = parse_model_config(
      llama_json(R"("rope_scaling": {"rope_type": "default"}, "rope_theta": 1234.5)"), "c.json");
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ(plain->rope_scaling.type, RopeScalingType::kNone);
  EXPECT_EQ(plain->rope_theta, 1234.5f);
}

TEST(ModelConfigTest, RefusesUnsupportedFeaturesByName) {
  expect_refused(R"({"architectures": ["MistralForCausalLM"], "hidden_size": 64})",
                 {"MistralForCausalLM"});
  expect_refused(R"({"architectures": ["Qwen2MoeForCausalLM"], "num_experts": 60})",
                 {"mixture-of-experts", "num_experts"});
  expect_refused(R"({"architectures": ["MixtralForCausalLM"], "num_local_experts": 8})",
                 {"mixture-of-experts"});
  expect_refused(llama_json(R"("num_experts": 4)"), {"mixture-of-experts"});
  expect_refused(llama_json(R"("use_sliding_window": true)"), {"use_sliding_window"});
  expect_refused(
      llama_json(R"("layer_types": ["full_attention", "sliding_attention", "full_attention"])"),
      {"layer_types", "sliding_attention"});
  EXPECT_TRUE(parse_model_config(
                  llama_json(R"("layer_types": ["full_attention", "full_attention"])"), "c.json")
                  .ok());
  expect_refused(llama_json(R"("rope_scaling": {"rope_type": "yarn", "factor": 4.0})"), {"yarn"});
  expect_refused(llama_json(R"("rope_scaling": {"type": "linear", "factor": 2.0})"), {"linear"});
  expect_refused(llama_json(R"("rope_scaling": {"rope_type": "dynamic", "factor": 2.0})"),
                 {"dynamic"});
  expect_refused(llama_json(R"("attention_bias": true)"), {"attention_bias"});
  expect_refused(llama_json(R"("mlp_bias": true)"), {"mlp_bias"});
  expect_refused(llama_json(R"("hidden_act": "gelu")"), {"gelu"});
  expect_refused(llama_json(R"("quantization_config": {"quant_method": "awq"})"),
                 {"quantization_config"});
  // Qwen2 with the sliding window present but off (as every Qwen2.5 ships) is fine.
  EXPECT_TRUE(parse_model_config(
                  R"({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
                      "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "vocab_size": 100, "sliding_window": 4096, "use_sliding_window": false})",
                  "c.json")
                  .ok());
}

TEST(ModelConfigTest, RefusesMalformedConfigs) {
  expect_refused("{\"hidden_size\": 64,", {"malformed JSON"});
  expect_refused("[1, 2]", {"JSON object"});
  expect_refused(R"({"architectures": "LlamaForCausalLM"})", {"architectures"});
  expect_refused(R"({"architectures": ["LlamaForCausalLM"], "intermediate_size": 172,
                     "num_hidden_layers": 5, "num_attention_heads": 8, "vocab_size": 512})",
                 {"hidden_size", "missing"});
  expect_refused(R"({"architectures": ["LlamaForCausalLM"], "hidden_size": "64",
                     "intermediate_size": 172, "num_hidden_layers": 5,
                     "num_attention_heads": 8, "vocab_size": 512})",
                 {"hidden_size", "integer"});
  expect_refused(R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 0,
                     "intermediate_size": 172, "num_hidden_layers": 5,
                     "num_attention_heads": 8, "vocab_size": 512})",
                 {"hidden_size"});
  expect_refused(llama_json(R"("num_key_value_heads": 3)"), {"num_key_value_heads"});
  expect_refused(llama_json(R"("head_dim": 7)"), {"head_dim"});
  expect_refused(llama_json(R"("rms_norm_eps": -1)"), {"rms_norm_eps"});
  expect_refused(llama_json(R"("tie_word_embeddings": "yes")"), {"tie_word_embeddings"});
  expect_refused(llama_json(R"("rope_scaling": {"rope_type": "llama3", "factor": 8.0})"),
                 {"low_freq_factor"});
  expect_refused(llama_json(R"("rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                    "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192})"),
                 {"high_freq_factor"});
  expect_refused(R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 60,
                     "intermediate_size": 172, "num_hidden_layers": 5,
                     "num_attention_heads": 8, "vocab_size": 512})",
                 {"hidden_size", "num_attention_heads"});
}

// The test writer's config.json (what other suites' random models carry) reads back whole.
TEST(ModelConfigTest, WriterConfigJsonRoundTrips) {
  for (ModelFamily family : {ModelFamily::kLlama, ModelFamily::kQwen2, ModelFamily::kQwen3}) {
    SCOPED_TRACE(static_cast<int>(family));
    ModelConfig written = ::megaserve::testing::tiny_model_config(family);
    written.eos_token_ids = {5, 6};
    written.bos_token_id = 3;
    written.rms_norm_eps = 1e-5f;
    if (family == ModelFamily::kLlama) {
      written.rope_scaling = {RopeScalingType::kLlama3, 8.0f, 1.0f, 4.0f, 64};
    }
    absl::StatusOr<ModelConfig> read =
        parse_model_config(::megaserve::testing::hf_config_json(written), "written.json");
    ASSERT_TRUE(read.ok()) << read.status();
    EXPECT_EQ(read->architecture, written.architecture);
    EXPECT_EQ(read->family, written.family);
    EXPECT_EQ(read->hidden_size, written.hidden_size);
    EXPECT_EQ(read->intermediate_size, written.intermediate_size);
    EXPECT_EQ(read->num_layers, written.num_layers);
    EXPECT_EQ(read->num_heads, written.num_heads);
    EXPECT_EQ(read->num_kv_heads, written.num_kv_heads);
    EXPECT_EQ(read->head_dim, written.head_dim);
    EXPECT_EQ(read->vocab_size, written.vocab_size);
    EXPECT_EQ(read->max_position_embeddings, written.max_position_embeddings);
    EXPECT_EQ(read->rms_norm_eps, written.rms_norm_eps);
    EXPECT_EQ(read->rope_theta, written.rope_theta);
    EXPECT_EQ(read->rope_scaling.type, written.rope_scaling.type);
    EXPECT_EQ(read->rope_scaling.factor, written.rope_scaling.factor);
    EXPECT_EQ(read->rope_scaling.original_max_position_embeddings,
              written.rope_scaling.original_max_position_embeddings);
    EXPECT_EQ(read->tie_word_embeddings, written.tie_word_embeddings);
    EXPECT_EQ(read->qkv_bias, written.qkv_bias);
    EXPECT_EQ(read->qk_norm, written.qk_norm);
    EXPECT_EQ(read->bos_token_id, 3);
    EXPECT_THAT(read->eos_token_ids, ElementsAre(5, 6));
  }
}

TEST(RopeInvFreqTest, UnscaledIsThetaPower) {
  ModelConfig config;
  config.head_dim = 8;
  config.rope_theta = 10000.0f;
  std::vector<float> inv_freq = rope_inv_freq(config);
  ASSERT_EQ(inv_freq.size(), 4u);
  EXPECT_FLOAT_EQ(inv_freq[0], 1.0f);
  EXPECT_FLOAT_EQ(inv_freq[1], 0.1f);    // 10000^(-2/8)
  EXPECT_FLOAT_EQ(inv_freq[2], 0.01f);   // 10000^(-4/8)
  EXPECT_FLOAT_EQ(inv_freq[3], 0.001f);  // 10000^(-6/8)
}

// Hugging Face's _compute_llama3_parameters, written out for one index.
double llama3_reference(double theta, int head_dim, int i, double factor, double low, double high,
                        double original) {
  const double inv_freq = 1.0 / std::pow(theta, 2.0 * i / head_dim);
  const double wavelen = 2 * std::numbers::pi / inv_freq;
  const double low_freq_wavelen = original / low;
  const double high_freq_wavelen = original / high;
  if (wavelen > low_freq_wavelen) return inv_freq / factor;
  if (wavelen < high_freq_wavelen) return inv_freq;
  const double smooth = (original / wavelen - low) / (high - low);
  return (1 - smooth) * inv_freq / factor + smooth * inv_freq;
}

TEST(RopeInvFreqTest, Llama3ScalingInEachRegime) {
  absl::StatusOr<ModelConfig> config = load_model_config_file(kModelsDir / "llama-3.1-8b.json");
  ASSERT_TRUE(config.ok()) << config.status();
  const std::vector<float> inv_freq = rope_inv_freq(*config);
  ASSERT_EQ(inv_freq.size(), 64u);
  // theta 500000, head_dim 128, original 8192, low 1, high 4: wavelengths below 2048 keep
  // their frequency (i <= 28), above 8192 divide it by 8 (i >= 35), between interpolate.
  struct Case {
    int i;
    const char* regime;
  };
  for (const Case& c : {Case{0, "high"}, Case{10, "high"}, Case{28, "high"}, Case{29, "medium"},
                        Case{31, "medium"}, Case{34, "medium"}, Case{35, "low"}, Case{63, "low"}}) {
    SCOPED_TRACE(c.i);
    const double unscaled = 1.0 / std::pow(500000.0, 2.0 * c.i / 128);
    const double wavelen = 2 * std::numbers::pi / unscaled;
    const std::string regime = wavelen < 2048 ? "high" : wavelen > 8192 ? "low" : "medium";
    ASSERT_EQ(regime, c.regime) << "wavelen " << wavelen;
    const double expected = llama3_reference(500000.0, 128, c.i, 8.0, 1.0, 4.0, 8192.0);
    EXPECT_NEAR(inv_freq[c.i], expected, 1e-6 * expected);
    if (regime == "high") {
      EXPECT_NEAR(inv_freq[c.i], unscaled, 1e-6 * unscaled);
    } else if (regime == "low") {
      EXPECT_NEAR(inv_freq[c.i], unscaled / 8, 1e-6 * unscaled);
    } else {
      EXPECT_LT(inv_freq[c.i], unscaled);
      EXPECT_GT(inv_freq[c.i], unscaled / 8);
    }
  }
}

// The table the CUDA backend uploads (DeviceModel::rope): cos then sin of p * inv_freq[i] at
// 2 (p * head_dim/2 + i); no positions, no table.
TEST(RopeCosSinTest, EachPositionAndPairInPlace) {
  ModelConfig config;
  config.head_dim = 8;
  config.rope_theta = 10000.0f;  // inv_freq 1, 0.1, 0.01, 0.001
  const std::vector<float> table = rope_cos_sin(config, 3);
  ASSERT_EQ(table.size(), 3u * 4 * 2);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(table[2 * i], 1.0f) << i;  // position 0
    EXPECT_EQ(table[2 * i + 1], 0.0f) << i;
  }
  const auto at = [&](int p, int i) { return 2 * (p * 4 + i); };
  EXPECT_NEAR(table[at(2, 0)], -0.4161468, 1e-6);  // cos 2
  EXPECT_NEAR(table[at(2, 0) + 1], 0.9092974, 1e-6);
  EXPECT_NEAR(table[at(2, 1)], 0.9800666, 1e-6);  // cos 0.2
  EXPECT_NEAR(table[at(2, 1) + 1], 0.1986693, 1e-6);
  EXPECT_NEAR(table[at(1, 3)], 0.9999995, 1e-6);  // cos 0.001
  EXPECT_NEAR(table[at(1, 3) + 1], 0.001, 1e-7);
  EXPECT_TRUE(rope_cos_sin(config, 0).empty());
}

// Issue 18 item 6: num_hidden_layers 2147483647 was accepted and ended in std::bad_alloc.
TEST(ModelConfigTest, SizesOutOfRangeAreRefusedNamingFieldAndValue) {
  const auto with = [](const std::string& field, const std::string& value) {
    std::string json = R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
      "intermediate_size": 172, "num_hidden_layers": 5, "num_attention_heads": 8,
      "vocab_size": 512})";
    const size_t at = json.find("\"" + field + "\"");
    if (at == std::string::npos)
      return json.substr(0, json.size() - 1) + ", \"" + field + "\": " + value + "}";
    const size_t begin = json.find(':', at) + 2;
    const size_t end = json.find_first_of(",}", begin);
    return json.substr(0, begin) + value + json.substr(end);
  };
  expect_refused(with("num_hidden_layers", "2147483647"),
                 {"'num_hidden_layers'", "[1, 1024]", "2147483647"});
  expect_refused(with("hidden_size", "1000000"), {"'hidden_size'", "1000000"});
  expect_refused(with("intermediate_size", "4000000000"), {"'intermediate_size'", "4000000000"});
  expect_refused(with("num_attention_heads", "0"), {"'num_attention_heads'", "0"});
  expect_refused(with("vocab_size", "-5"), {"'vocab_size'", "-5"});
  expect_refused(with("num_key_value_heads", "2048"), {"'num_key_value_heads'", "2048"});
  expect_refused(with("head_dim", "4096"), {"'head_dim'", "4096"});
  expect_refused(with("max_position_embeddings", "2147483647"),
                 {"'max_position_embeddings'", "2147483647"});
  // The largest accepted shape still counts its parameters in 64 bits.
  auto largest = parse_model_config(
      R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 65536, "intermediate_size": 262144,
          "num_hidden_layers": 1024, "num_attention_heads": 1024, "head_dim": 1024,
          "vocab_size": 4194304})",
      "c.json");
  ASSERT_TRUE(largest.ok()) << largest.status();
  EXPECT_GT(largest->num_parameters(), 0);
}

TEST(ModelConfigTest, NumParametersOfLlama31_8B) {
  auto config = load_model_config_file(kModelsDir / "llama-3.1-8b.json");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->num_parameters(), 8'030'261'248);
}

}  // namespace
}  // namespace megaserve::engine
