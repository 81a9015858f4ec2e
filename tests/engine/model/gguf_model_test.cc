// llama GGUF files as ModelConfig + ModelWeights (engine/model/gguf_model.h): files written
// here with every dequantizable type, the Q/K row order (against llama.cpp's converter and
// both RoPE conventions, and against llama2.c's own export of stories260K), and bad files.
#include "engine/model/gguf_model.h"

#include <cmath>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "engine/isa/bf16.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/assets.h"
#include "tests/support/gguf_writer.h"
#include "tests/support/safetensors_writer.h"

namespace megaserve::engine {
namespace {

using ::megaserve::testing::bf16_round;
using ::megaserve::testing::bf16_value;
using ::megaserve::testing::f16_value;
using ::megaserve::testing::float_to_f16_reference;
using ::megaserve::testing::gguf_bytes;
using ::megaserve::testing::GgufKv;
using ::megaserve::testing::GgufTensorRecord;
using ::megaserve::testing::make_test_dir;
using ::megaserve::testing::write_file;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
namespace t = ::megaserve::testing;

std::string msg(const absl::Status& status) { return std::string(status.message()); }

// llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute): the rows of a q or k
// projection, per head, as w.reshape(n_head, 2, D/2, in).swapaxes(1, 2).reshape(rows, in).
// Hugging Face row (head, half, i) lands on GGUF row head * D + 2 * i + half.
int64_t llama_cpp_row(int64_t hf_row, int64_t head_dim) {
  const int64_t head = hf_row / head_dim, half = hf_row % head_dim / (head_dim / 2),
                i = hf_row % (head_dim / 2);
  return head * head_dim + 2 * i + half;
}

std::vector<float> permute_rows_llama_cpp(const std::vector<float>& hf, int64_t rows,
                                          int64_t row_length, int64_t head_dim) {
  std::vector<float> out(hf.size());
  for (int64_t r = 0; r < rows; ++r) {
    std::copy_n(hf.begin() + r * row_length, row_length,
                out.begin() + llama_cpp_row(r, head_dim) * row_length);
  }
  return out;
}

// A llama file under construction: key/values, tensors, and what each Hugging Face tensor
// must load as (fp32, Hugging Face layout).
struct LlamaGguf {
  std::vector<GgufKv> kvs;
  std::vector<GgufTensorRecord> tensors;
  std::map<std::string, std::vector<float>> expected;

  std::filesystem::path write(const std::string& name) const {
    const std::filesystem::path path = make_test_dir("gguf") / name;
    write_file(path, gguf_bytes(kvs, tensors));
    return path;
  }
  void erase_tensor(const std::string& name) {
    std::erase_if(tensors, [&](const GgufTensorRecord& r) { return r.name == name; });
  }
  void erase_kv(const std::string& key) {
    std::erase_if(kvs, [&](const GgufKv& kv) { return kv.key == key; });
  }
  GgufTensorRecord& tensor(const std::string& name) {
    for (GgufTensorRecord& r : tensors) {
      if (r.name == name) return r;
    }
    ADD_FAILURE() << "no tensor " << name;
    return tensors.front();
  }
};

ModelConfig tiny_llama() {
  ModelConfig c;
  c.hidden_size = 64;
  c.intermediate_size = 96;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 16;
  c.vocab_size = 40;
  c.max_position_embeddings = 256;
  c.rms_norm_eps = 1e-6f;
  c.rope_theta = 500000.0f;
  return c;
}

// A tensor of `type` with `rows` rows of `row_length` in GGUF order, and its values.
GgufTensorRecord random_tensor(const std::string& name, uint32_t type, int64_t rows,
                               int64_t row_length, uint64_t seed, std::vector<float>* values) {
  const std::vector<int64_t> dims =
      rows == 1 ? std::vector<int64_t>{row_length} : std::vector<int64_t>{row_length, rows};
  const int64_t n = rows * row_length;
  if (type == t::kGgmlQ8_0 || type == t::kGgmlQ4_0 || type == t::kGgmlQ4_1) {
    t::QuantizedData data = t::random_quantized(type, n, seed);
    *values = data.values;
    return {name, type, dims, data.bytes};
  }
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<float> raw(n);
  for (float& v : raw) v = uniform(rng);
  values->resize(n);
  for (int64_t i = 0; i < n; ++i) {
    (*values)[i] = type == t::kGgmlF16    ? f16_value(float_to_f16_reference(raw[i]))
                   : type == t::kGgmlBF16 ? bf16_value(bf16_round(raw[i]))
                                          : raw[i];
  }
  return type == t::kGgmlF16    ? t::gguf_f16(name, dims, raw)
         : type == t::kGgmlBF16 ? t::gguf_bf16(name, dims, raw)
                                : t::gguf_f32(name, dims, raw);
}

// Every tensor of `c` with a mix of types (each matrix kind rotates through the six), q/k
// rows in llama.cpp's order; output.weight unless `tied`.
LlamaGguf make_llama_gguf(const ModelConfig& c, bool tied, uint64_t seed) {
  LlamaGguf g;
  g.kvs = {t::kv_string("general.architecture", "llama"),
           t::kv_string("general.name", "tiny"),
           t::kv_u32("llama.context_length", c.max_position_embeddings),
           t::kv_u32("llama.embedding_length", c.hidden_size),
           t::kv_u32("llama.block_count", c.num_layers),
           t::kv_u32("llama.feed_forward_length", c.intermediate_size),
           t::kv_u32("llama.attention.head_count", c.num_heads),
           t::kv_u32("llama.attention.head_count_kv", c.num_kv_heads),
           t::kv_u32("llama.rope.dimension_count", c.head_dim),
           t::kv_f32("llama.attention.layer_norm_rms_epsilon", c.rms_norm_eps),
           t::kv_f32("llama.rope.freq_base", c.rope_theta),
           t::kv_u32("general.file_type", 3)};
  std::vector<std::string> tokens;
  for (int i = 0; i < c.vocab_size; ++i) tokens.push_back("tok" + std::to_string(i));
  g.kvs.push_back(t::kv_string_array("tokenizer.ggml.tokens", tokens));
  g.kvs.push_back(t::kv_u32("tokenizer.ggml.bos_token_id", 1));
  g.kvs.push_back(t::kv_u32("tokenizer.ggml.eos_token_id", 2));

  const uint32_t types[] = {t::kGgmlQ4_1, t::kGgmlQ8_0, t::kGgmlQ4_0,
                            t::kGgmlF16,  t::kGgmlBF16, t::kGgmlF32};
  int next_type = 0;
  auto add = [&](const std::string& hf, const std::string& gguf, int64_t rows, int64_t row_length,
                 bool norm, int64_t qk_head_dim) {
    const uint32_t type = norm ? t::kGgmlF32 : types[next_type++ % 6];
    std::vector<float> values;
    g.tensors.push_back(random_tensor(gguf, type, rows, row_length, seed++, &values));
    std::vector<float>& expected = g.expected[hf];
    expected.resize(values.size());
    for (int64_t r = 0; r < rows; ++r) {  // Hugging Face row r is stored at the converter's row
      const int64_t from = qk_head_dim > 0 ? llama_cpp_row(r, qk_head_dim) : r;
      std::copy_n(values.begin() + from * row_length, row_length,
                  expected.begin() + r * row_length);
    }
  };
  const int64_t h = c.hidden_size, q = c.q_size(), kv = c.kv_size(), ffn = c.intermediate_size;
  add("model.embed_tokens.weight", "token_embd.weight", c.vocab_size, h, false, 0);
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string hf = "model.layers." + std::to_string(l) + ".";
    const std::string gg = "blk." + std::to_string(l) + ".";
    add(hf + "input_layernorm.weight", gg + "attn_norm.weight", 1, h, true, 0);
    add(hf + "self_attn.q_proj.weight", gg + "attn_q.weight", q, h, false, c.head_dim);
    add(hf + "self_attn.k_proj.weight", gg + "attn_k.weight", kv, h, false, c.head_dim);
    add(hf + "self_attn.v_proj.weight", gg + "attn_v.weight", kv, h, false, 0);
    add(hf + "self_attn.o_proj.weight", gg + "attn_output.weight", h, q, false, 0);
    add(hf + "post_attention_layernorm.weight", gg + "ffn_norm.weight", 1, h, true, 0);
    add(hf + "mlp.gate_proj.weight", gg + "ffn_gate.weight", ffn, h, false, 0);
    add(hf + "mlp.up_proj.weight", gg + "ffn_up.weight", ffn, h, false, 0);
    add(hf + "mlp.down_proj.weight", gg + "ffn_down.weight", h, ffn, false, 0);
  }
  add("model.norm.weight", "output_norm.weight", 1, h, true, 0);
  if (!tied) add("lm_head.weight", "output.weight", c.vocab_size, h, false, 0);
  return g;
}

// megaserve's handles under Hugging Face names.
std::map<std::string, const Tensor*> handles(const ModelWeights& w, bool tied) {
  std::map<std::string, const Tensor*> out;
  out["model.embed_tokens.weight"] = &w.embedding;
  out["model.norm.weight"] = &w.final_norm;
  if (!tied) out["lm_head.weight"] = &w.lm_head;
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
  }
  return out;
}

TEST(GgufModelTest, ReadsTheConfigFromLlamaMetadata) {
  const ModelConfig c = tiny_llama();
  const std::filesystem::path path = make_llama_gguf(c, false, 1).write("tiny.gguf");
  absl::StatusOr<std::unique_ptr<GgufFile>> file = GgufFile::open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  absl::StatusOr<ModelConfig> config = gguf_model_config(**file);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->architecture, "LlamaForCausalLM");
  EXPECT_EQ(config->family, ModelFamily::kLlama);
  EXPECT_EQ(config->hidden_size, 64);
  EXPECT_EQ(config->intermediate_size, 96);
  EXPECT_EQ(config->num_layers, 2);
  EXPECT_EQ(config->num_heads, 4);
  EXPECT_EQ(config->num_kv_heads, 2);
  EXPECT_EQ(config->head_dim, 16);
  EXPECT_EQ(config->vocab_size, 40);
  EXPECT_EQ(config->max_position_embeddings, 256);
  EXPECT_EQ(config->rms_norm_eps, 1e-6f);
  EXPECT_EQ(config->rope_theta, 500000.0f);
  EXPECT_EQ(config->rope_scaling.type, RopeScalingType::kNone);
  EXPECT_FALSE(config->tie_word_embeddings);
  EXPECT_FALSE(config->qkv_bias);
  EXPECT_FALSE(config->qk_norm);
  EXPECT_EQ(config->bos_token_id, 1);
  EXPECT_THAT(config->eos_token_ids, ElementsAre(2));
}

TEST(GgufModelTest, ConfigDefaultsAndFallbacks) {
  LlamaGguf g = make_llama_gguf(tiny_llama(), true, 2);
  // No head_count_kv (plain multi-head attention), no tokens (vocab from llama.vocab_size,
  // then from token_embd), an end-of-turn id beside EOS.
  g.erase_kv("llama.attention.head_count_kv");
  g.erase_kv("tokenizer.ggml.tokens");
  g.erase_kv("llama.rope.freq_base");
  g.kvs.push_back(t::kv_u32("llama.vocab_size", 40));
  g.kvs.push_back(t::kv_u32("tokenizer.ggml.eot_token_id", 7));
  absl::StatusOr<std::unique_ptr<GgufFile>> file = GgufFile::open(g.write("defaults.gguf"));
  ASSERT_TRUE(file.ok()) << file.status();
  absl::StatusOr<ModelConfig> config = gguf_model_config(**file);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->num_kv_heads, 4);
  EXPECT_EQ(config->vocab_size, 40);
  EXPECT_EQ(config->rope_theta, 10000.0f);
  EXPECT_TRUE(config->tie_word_embeddings);
  EXPECT_THAT(config->eos_token_ids, ElementsAre(2, 7));

  g.erase_kv("llama.vocab_size");
  file = GgufFile::open(g.write("embd_rows.gguf"));
  ASSERT_TRUE(file.ok()) << file.status();
  config = gguf_model_config(**file);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->vocab_size, 40);  // token_embd's rows
}

class GgufWeightsTest : public ::testing::TestWithParam<std::tuple<DType, bool>> {};

// Every tensor, of every type, loads as the values its blocks stand for, in Hugging Face
// layout, rounded once to the requested dtype.
TEST_P(GgufWeightsTest, LoadsEveryTensorDequantized) {
  const auto [dtype, tied] = GetParam();
  const LlamaGguf g = make_llama_gguf(tiny_llama(), tied, 3);
  absl::StatusOr<GgufModel> model = load_gguf_model(g.write("model.gguf"), dtype);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(model->config.tie_word_embeddings, tied);
  const auto tensors = handles(model->weights, tied);
  ASSERT_EQ(tensors.size(), g.expected.size());
  for (const auto& [name, expected] : g.expected) {
    SCOPED_TRACE(name);
    const Tensor& tensor = *tensors.at(name);
    ASSERT_EQ(tensor.dtype, dtype);
    ASSERT_EQ(tensor.numel(), static_cast<int64_t>(expected.size()));
    for (size_t i = 0; i < expected.size(); ++i) {
      switch (dtype) {
        case DType::kF32:
          ASSERT_EQ(tensor.data<float>()[i], expected[i]) << i;
          break;
        case DType::kBF16:
          ASSERT_EQ(tensor.data<uint16_t>()[i], bf16_round(expected[i])) << i;
          break;
        case DType::kF16:
          ASSERT_EQ(tensor.data<uint16_t>()[i], float_to_f16_reference(expected[i])) << i;
          break;
      }
    }
  }
  EXPECT_THAT(model->weights.layers[0].wq.shape, ElementsAre(64, 64));
  EXPECT_THAT(model->weights.layers[0].wk.shape, ElementsAre(32, 64));
  EXPECT_THAT(model->weights.layers[1].w_down.shape, ElementsAre(64, 96));
  EXPECT_THAT(model->weights.lm_head.shape, ElementsAre(40, 64));
  if (tied) {
    EXPECT_EQ(model->weights.lm_head.bytes, model->weights.embedding.bytes);
  }
}

INSTANTIATE_TEST_SUITE_P(DTypes, GgufWeightsTest,
                         ::testing::Combine(::testing::Values(DType::kF32, DType::kBF16,
                                                              DType::kF16),
                                            ::testing::Bool()),
                         [](const auto& info) {
                           return std::string(dtype_name(std::get<0>(info.param))) +
                                  (std::get<1>(info.param) ? "_tied" : "_untied");
                         });

// ---- The Q/K row order ----

// Rotary embedding of one head vector at `pos`, as each side computes it.
// Hugging Face (rotate_half): dimension i pairs with i + D/2.
std::vector<double> rope_hf(const std::vector<double>& x, int pos, double theta) {
  const size_t d = x.size(), half = d / 2;
  std::vector<double> out(d);
  for (size_t i = 0; i < half; ++i) {
    const double angle = pos * std::pow(theta, -2.0 * i / d);
    out[i] = x[i] * std::cos(angle) - x[i + half] * std::sin(angle);
    out[i + half] = x[i + half] * std::cos(angle) + x[i] * std::sin(angle);
  }
  return out;
}
// llama.cpp's llama models (LLAMA_ROPE_TYPE_NORM): dimension 2i pairs with 2i + 1.
std::vector<double> rope_llama_cpp(const std::vector<double>& x, int pos, double theta) {
  const size_t d = x.size();
  std::vector<double> out(d);
  for (size_t i = 0; i < d / 2; ++i) {
    const double angle = pos * std::pow(theta, -2.0 * i / d);
    out[2 * i] = x[2 * i] * std::cos(angle) - x[2 * i + 1] * std::sin(angle);
    out[2 * i + 1] = x[2 * i] * std::sin(angle) + x[2 * i + 1] * std::cos(angle);
  }
  return out;
}

// Head `head` of W x, W row-major [rows, in].
std::vector<double> head_of(const float* w, int64_t in, const std::vector<double>& x, int head,
                            int64_t head_dim) {
  std::vector<double> out(head_dim);
  for (int64_t r = 0; r < head_dim; ++r) {
    double sum = 0;
    for (int64_t k = 0; k < in; ++k) sum += w[(head * head_dim + r) * in + k] * x[k];
    out[r] = sum;
  }
  return out;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double sum = 0;
  for (size_t i = 0; i < a.size(); ++i) sum += a[i] * b[i];
  return sum;
}

// Hugging Face weights, permuted as llama.cpp's converter does, written, loaded: the loader
// gives back exactly the Hugging Face weights. And the permutation is the right one: with
// llama.cpp's RoPE on the file's rows and Hugging Face's RoPE on the loaded rows, every
// attention score q.k is the same (while Hugging Face's RoPE on the file's rows is not).
TEST(GgufQkOrderTest, UndoesTheConvertersPermutation) {
  const ModelConfig c = tiny_llama();
  const int64_t h = c.hidden_size, d = c.head_dim;
  LlamaGguf g = make_llama_gguf(c, true, 4);
  std::mt19937_64 rng(99);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::map<std::string, std::vector<float>> hf, file_rows;
  for (const auto& [name, rows] : {std::pair{"q", c.q_size()}, std::pair{"k", c.kv_size()}}) {
    std::vector<float>& w = hf[name];
    w.resize(rows * h);
    for (float& v : w) v = uniform(rng);
    file_rows[name] = permute_rows_llama_cpp(w, rows, h, d);
    const std::string gguf = std::string("blk.0.attn_") + name + ".weight";
    g.tensor(gguf) = t::gguf_f32(gguf, {h, rows}, file_rows[name]);
  }
  absl::StatusOr<GgufModel> model = load_gguf_model(g.write("qk.gguf"), DType::kF32);
  ASSERT_TRUE(model.ok()) << model.status();
  const LayerWeights& layer = model->weights.layers[0];
  const std::vector<float> wq(layer.wq.data<float>(), layer.wq.data<float>() + layer.wq.numel());
  const std::vector<float> wk(layer.wk.data<float>(), layer.wk.data<float>() + layer.wk.numel());
  EXPECT_EQ(wq, hf["q"]);
  EXPECT_EQ(wk, hf["k"]);
  EXPECT_NE(wq, file_rows["q"]);  // the permutation is not the identity

  std::vector<double> x(h), y(h);
  for (double& v : x) v = uniform(rng);
  for (double& v : y) v = uniform(rng);
  const int group = c.num_heads / c.num_kv_heads;
  double worst = 0, unpermuted_worst = 0;
  for (int head = 0; head < c.num_heads; ++head) {
    const int kv_head = head / group;
    for (auto [pq, pk] : {std::pair{0, 0}, {5, 2}, {17, 3}, {40, 39}}) {
      const double reference =
          dot(rope_llama_cpp(head_of(file_rows["q"].data(), h, x, head, d), pq, c.rope_theta),
              rope_llama_cpp(head_of(file_rows["k"].data(), h, y, kv_head, d), pk, c.rope_theta));
      const double loaded = dot(rope_hf(head_of(wq.data(), h, x, head, d), pq, c.rope_theta),
                                rope_hf(head_of(wk.data(), h, y, kv_head, d), pk, c.rope_theta));
      const double unpermuted =
          dot(rope_hf(head_of(file_rows["q"].data(), h, x, head, d), pq, c.rope_theta),
              rope_hf(head_of(file_rows["k"].data(), h, y, kv_head, d), pk, c.rope_theta));
      worst = std::max(worst, std::fabs(loaded - reference));
      unpermuted_worst = std::max(unpermuted_worst, std::fabs(unpermuted - reference));
    }
  }
  EXPECT_LT(worst, 1e-9);
  EXPECT_GT(unpermuted_worst, 1e-2);
}

TEST(GgufQkOrderTest, SourceRowFormula) {
  // head_dim 8: Hugging Face rows 0..3 are the first halves of the pairs, llama.cpp's even rows.
  std::vector<int64_t> rows;
  for (int64_t r = 0; r < 16; ++r) rows.push_back(gguf_qk_source_row(r, 8));
  EXPECT_THAT(rows, ElementsAre(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15));
}

// llama2.c's stories260K.bin keeps Meta's interleaved q/k rows, as llama.cpp's GGUF does;
// llama2.c's own exporter permuted them into the Hugging Face copy (stories260K-hf). Written
// as an F32 GGUF, unchanged, the file must load as exactly the safetensors model: two
// independent conversions agree.
TEST(GgufQkOrderTest, Stories260KFromLlama2cEqualsTheHuggingFaceExport) {
  MEGASERVE_REQUIRE_ASSET("models/stories260K/stories260K.bin");
  MEGASERVE_REQUIRE_ASSET("models/stories260K-hf/model.safetensors");
  const std::string bin = t::read_file(t::assets_dir() / "models/stories260K/stories260K.bin");
  int32_t header[7];
  ASSERT_GT(bin.size(), sizeof header);
  std::memcpy(header, bin.data(), sizeof header);
  const int64_t dim = header[0], ffn = header[1], layers = header[2], heads = header[3],
                kv_heads = header[4], vocab = std::abs(header[5]), seq = header[6];
  const int64_t head_dim = dim / heads, kv = kv_heads * head_dim;
  size_t offset = sizeof header;
  auto take = [&](int64_t n) {
    std::vector<float> out(n);
    EXPECT_LE(offset + 4 * n, bin.size());
    std::memcpy(out.data(), bin.data() + offset, 4 * n);
    offset += 4 * n;
    return out;
  };
  // llama2.c's order: each kind for all layers; matrices [out, in] row-major.
  const std::vector<float> embedding = take(vocab * dim), att_norm = take(layers * dim),
                           wq = take(layers * dim * dim), wk = take(layers * kv * dim),
                           wv = take(layers * kv * dim), wo = take(layers * dim * dim),
                           ffn_norm = take(layers * dim), w1 = take(layers * ffn * dim),
                           w2 = take(layers * dim * ffn), w3 = take(layers * ffn * dim),
                           final_norm = take(dim);
  auto slice = [](const std::vector<float>& all, int64_t layer, int64_t n) {
    return std::vector<float>(all.begin() + layer * n, all.begin() + (layer + 1) * n);
  };
  std::vector<GgufKv> kvs = {t::kv_string("general.architecture", "llama"),
                             t::kv_u32("llama.context_length", seq),
                             t::kv_u32("llama.embedding_length", dim),
                             t::kv_u32("llama.block_count", layers),
                             t::kv_u32("llama.feed_forward_length", ffn),
                             t::kv_u32("llama.attention.head_count", heads),
                             t::kv_u32("llama.attention.head_count_kv", kv_heads),
                             t::kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5f),
                             t::kv_f32("llama.rope.freq_base", 10000.0f),
                             t::kv_u32("llama.vocab_size", vocab)};
  std::vector<GgufTensorRecord> tensors = {
      t::gguf_f32("token_embd.weight", {dim, vocab}, embedding),
      t::gguf_f32("output_norm.weight", {dim}, final_norm)};
  for (int64_t l = 0; l < layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    tensors.push_back(t::gguf_f32(p + "attn_norm.weight", {dim}, slice(att_norm, l, dim)));
    tensors.push_back(t::gguf_f32(p + "attn_q.weight", {dim, dim}, slice(wq, l, dim * dim)));
    tensors.push_back(t::gguf_f32(p + "attn_k.weight", {dim, kv}, slice(wk, l, kv * dim)));
    tensors.push_back(t::gguf_f32(p + "attn_v.weight", {dim, kv}, slice(wv, l, kv * dim)));
    tensors.push_back(t::gguf_f32(p + "attn_output.weight", {dim, dim}, slice(wo, l, dim * dim)));
    tensors.push_back(t::gguf_f32(p + "ffn_norm.weight", {dim}, slice(ffn_norm, l, dim)));
    tensors.push_back(t::gguf_f32(p + "ffn_gate.weight", {dim, ffn}, slice(w1, l, ffn * dim)));
    tensors.push_back(t::gguf_f32(p + "ffn_down.weight", {ffn, dim}, slice(w2, l, dim * ffn)));
    tensors.push_back(t::gguf_f32(p + "ffn_up.weight", {dim, ffn}, slice(w3, l, ffn * dim)));
  }
  const std::filesystem::path path = make_test_dir("stories") / "stories260K.gguf";
  write_file(path, gguf_bytes(kvs, tensors));

  absl::StatusOr<GgufModel> gguf = load_gguf_model(path, DType::kF32);
  ASSERT_TRUE(gguf.ok()) << gguf.status();
  const std::filesystem::path hf_dir = t::assets_dir() / "models/stories260K-hf";
  absl::StatusOr<ModelConfig> hf_config = load_model_config(hf_dir);
  ASSERT_TRUE(hf_config.ok()) << hf_config.status();
  absl::StatusOr<ModelWeights> hf = load_weights(hf_dir, *hf_config, DType::kF32);
  ASSERT_TRUE(hf.ok()) << hf.status();

  const ModelConfig& g = gguf->config;
  EXPECT_EQ(g.hidden_size, hf_config->hidden_size);
  EXPECT_EQ(g.intermediate_size, hf_config->intermediate_size);
  EXPECT_EQ(g.num_layers, hf_config->num_layers);
  EXPECT_EQ(g.num_heads, hf_config->num_heads);
  EXPECT_EQ(g.num_kv_heads, hf_config->num_kv_heads);
  EXPECT_EQ(g.head_dim, hf_config->head_dim);
  EXPECT_EQ(g.vocab_size, hf_config->vocab_size);
  EXPECT_EQ(g.max_position_embeddings, hf_config->max_position_embeddings);
  EXPECT_EQ(g.rms_norm_eps, hf_config->rms_norm_eps);
  EXPECT_EQ(g.rope_theta, hf_config->rope_theta);
  EXPECT_EQ(g.tie_word_embeddings, hf_config->tie_word_embeddings);
  const auto ours = handles(gguf->weights, true);
  const auto theirs = handles(*hf, true);
  for (const auto& [name, tensor] : theirs) {
    SCOPED_TRACE(name);
    const Tensor& mine = *ours.at(name);
    ASSERT_EQ(mine.shape, tensor->shape);
    EXPECT_EQ(*mine.bytes, *tensor->bytes);
  }
}

// Llama 3.1 in GGUF: llama.cpp's converter turns transformers' llama3 rope_scaling into
// rope_freqs.weight, the divisor of each rotary pair's frequency. Read as such, the
// frequencies equal those the llama3 parameters give (to float rounding), and the model loads
// with the tensor in it.
TEST(GgufModelTest, RopeFreqsAreTheLlama3ScaledFrequencies) {
  ModelConfig llama3 = tiny_llama();
  llama3.rope_scaling.type = RopeScalingType::kLlama3;
  llama3.rope_scaling.factor = 8.0f;
  llama3.rope_scaling.low_freq_factor = 1.0f;
  llama3.rope_scaling.high_freq_factor = 4.0f;
  llama3.rope_scaling.original_max_position_embeddings = 8192;
  const std::vector<float> want = rope_inv_freq(llama3);
  const std::vector<float> plain = rope_inv_freq(tiny_llama());
  std::vector<float> factors(want.size());
  int scaled = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    factors[i] = static_cast<float>(static_cast<double>(plain[i]) / want[i]);
    scaled += factors[i] > 1.001f ? 1 : 0;
  }
  ASSERT_GE(scaled, 2) << "the test's head_dim and theta should reach the scaled bands";
  ASSERT_LT(scaled, static_cast<int>(factors.size()));

  LlamaGguf g = make_llama_gguf(tiny_llama(), true, 11);
  g.tensors.push_back(t::gguf_f32("rope_freqs.weight", {8}, factors));
  const std::filesystem::path path = g.write("rope_freqs.gguf");
  absl::StatusOr<GgufModel> model = load_gguf_model(path, DType::kBF16);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(model->config.rope_scaling.type, RopeScalingType::kFactors);
  EXPECT_EQ(model->config.rope_scaling.freq_factors, factors);
  const std::vector<float> got = rope_inv_freq(model->config);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_NEAR(got[i], want[i], 1e-6 * want[i]) << "pair " << i;
  }
}

// ---- Bad files ----

void expect_config_error(LlamaGguf g, const std::string& name, const std::string& problem) {
  const std::filesystem::path path = g.write(name);
  absl::StatusOr<std::unique_ptr<GgufFile>> file = GgufFile::open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  absl::StatusOr<ModelConfig> config = gguf_model_config(**file);
  ASSERT_FALSE(config.ok()) << name;
  EXPECT_THAT(msg(config.status()), HasSubstr(path.string()));
  EXPECT_THAT(msg(config.status()), HasSubstr(problem));
}

TEST(GgufModelTest, RefusesWhatItCannotRun) {
  const LlamaGguf base = make_llama_gguf(tiny_llama(), true, 5);
  LlamaGguf g = base;
  g.erase_kv("general.architecture");
  g.kvs.push_back(t::kv_string("general.architecture", "qwen2"));
  expect_config_error(g, "qwen2.gguf",
                      "unsupported by megaserve: general.architecture 'qwen2' (only llama");
  g = base;
  g.kvs.push_back(t::kv_u32("llama.expert_count", 8));
  expect_config_error(g, "moe.gguf", "mixture-of-experts (llama.expert_count = 8)");
  g = base;
  g.kvs.push_back(t::kv_string("llama.rope.scaling.type", "linear"));
  expect_config_error(g, "scaling.gguf", "RoPE scaling type 'linear'");
  g = base;
  g.tensors.push_back(t::gguf_f32("rope_freqs.weight", {3}, std::vector<float>(3, 1.0f)));
  expect_config_error(g, "rope_freqs_shape.gguf",
                      "tensor 'rope_freqs.weight' has shape [3], expected [8] (head_dim / 2)");
  g = base;
  std::vector<float> zero_factor(8, 1.0f);
  zero_factor[5] = 0.0f;
  g.tensors.push_back(t::gguf_f32("rope_freqs.weight", {8}, zero_factor));
  expect_config_error(g, "rope_freqs_zero.gguf", "factor 5 is 0; each must be finite and positive");
  g = base;
  g.erase_kv("llama.rope.dimension_count");
  g.kvs.push_back(t::kv_u32("llama.rope.dimension_count", 8));
  expect_config_error(g, "partial.gguf", "partial rotary embedding");
  g = base;
  g.erase_kv("llama.block_count");
  expect_config_error(g, "no_blocks.gguf", "no metadata key 'llama.block_count'");
  g = base;
  g.erase_kv("llama.attention.head_count_kv");
  g.kvs.push_back(t::kv_u32("llama.attention.head_count_kv", 3));
  expect_config_error(g, "heads.gguf",
                      "(4) is not a multiple of llama.attention.head_count_kv (3)");
  g = base;
  g.erase_kv("llama.embedding_length");
  g.kvs.push_back(t::kv_f32("llama.embedding_length", 64.0f));
  expect_config_error(g, "float.gguf", "'llama.embedding_length' is FLOAT32, expected an integer");
  g = base;
  g.erase_kv("llama.embedding_length");
  g.kvs.push_back(t::kv_u64("llama.embedding_length", 1ull << 40));
  expect_config_error(g, "huge.gguf", "'llama.embedding_length' = 1099511627776 is outside");
}

void expect_load_error(const LlamaGguf& g, const std::string& name,
                       const std::vector<std::string>& problems) {
  const std::filesystem::path path = g.write(name);
  absl::StatusOr<GgufModel> model = load_gguf_model(path, DType::kBF16);
  ASSERT_FALSE(model.ok()) << name;
  EXPECT_THAT(msg(model.status()), HasSubstr(path.string()));
  for (const std::string& problem : problems) EXPECT_THAT(msg(model.status()), HasSubstr(problem));
}

TEST(GgufModelTest, RefusesBadTensors) {
  const LlamaGguf base = make_llama_gguf(tiny_llama(), false, 6);
  // A type the reader knows but megaserve does not dequantize: Q4_K (256-element blocks, so
  // a model whose rows are 256 long).
  LlamaGguf g = make_llama_gguf(
      [] {
        ModelConfig c = tiny_llama();
        c.hidden_size = 256;
        c.num_heads = 16;
        c.num_kv_heads = 8;
        return c;
      }(),
      false, 7);
  g.tensor("blk.1.ffn_up.weight") = {
      "blk.1.ffn_up.weight", t::kGgmlQ4_K, {256, 96}, std::string(96 * 144, '\0')};
  expect_load_error(g, "q4k.gguf",
                    {"tensor 'blk.1.ffn_up.weight' has type Q4_K, which megaserve does not "
                     "dequantize (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)"});
  g = base;
  g.erase_tensor("blk.1.attn_v.weight");
  expect_load_error(g, "missing.gguf",
                    {"missing tensor 'blk.1.attn_v.weight' (model.layers.1.self_attn.v_proj"});
  g = base;
  g.tensor("blk.0.attn_k.weight").dims = {64, 16};
  g.tensor("blk.0.attn_k.weight").bytes.resize(g.tensor("blk.0.attn_k.weight").bytes.size() / 2);
  expect_load_error(g, "shape.gguf",
                    {"tensor 'blk.0.attn_k.weight' has shape [16, 64] (GGUF dims [64, 16]), but "
                     "this model needs [32, 64]"});
  g = base;
  g.tensors.push_back(t::gguf_f32("blk.0.attn_q.bias", {64}, std::vector<float>(64)));
  expect_load_error(g, "extra.gguf", {"unexpected tensor 'blk.0.attn_q.bias'"});
}

}  // namespace
}  // namespace megaserve::engine
