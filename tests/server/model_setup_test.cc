// setup_model settles one list of stopping tokens before the engine is built: a model whose
// config.json names no EOS stops on the tokenizer's EOS (the scheduler and the output side
// see the same list). The model is made to say EOS at once: every layer's weights are zero,
// so the final hidden state is the normalized embedding, and the LM head scores only the
// tokenizer's EOS (id 2 of tok512.model).
#include "server/model_setup.h"

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/model/tokenizer.h"
#include "gtest/gtest.h"
#include "server/config.h"
#include "tests/support/assets.h"
#include "tests/support/safetensors_writer.h"

namespace megaserve::server {
namespace {

namespace fs = std::filesystem;
using megaserve::testing::f32_tensor;
using megaserve::testing::TensorRecord;

constexpr char kTokenizer[] = "models/stories260K/tok512.model";
constexpr int32_t kTokenizerEos = 2;

// A Llama-shaped model that greedily says `eos` after any prompt; config.json has no
// eos_token_id and there is no generation_config.json.
fs::path write_eos_model(int32_t eos) {
  engine::ModelConfig c = megaserve::testing::tiny_model_config(engine::ModelFamily::kLlama);
  c.vocab_size = 512;  // tok512.model
  c.eos_token_ids.clear();
  c.tie_word_embeddings = false;
  const fs::path dir = megaserve::testing::make_test_dir("eos_model");
  megaserve::testing::write_file(dir / "config.json", megaserve::testing::hf_config_json(c));
  const int64_t h = c.hidden_size, q = int64_t{c.num_heads} * c.head_dim;
  const int64_t kv = int64_t{c.num_kv_heads} * c.head_dim, ffn = c.intermediate_size;
  auto zeros = [](std::string name, int64_t rows, int64_t cols) {
    return f32_tensor(std::move(name), {rows, cols}, std::vector<float>(rows * cols, 0.0f));
  };
  auto ones = [](std::string name, int64_t n) {
    return f32_tensor(std::move(name), {n}, std::vector<float>(n, 1.0f));
  };
  std::vector<TensorRecord> t;
  t.push_back(f32_tensor("model.embed_tokens.weight", {c.vocab_size, h},
                         std::vector<float>(c.vocab_size * h, 0.5f)));
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    t.push_back(ones(p + "input_layernorm.weight", h));
    t.push_back(zeros(p + "self_attn.q_proj.weight", q, h));
    t.push_back(zeros(p + "self_attn.k_proj.weight", kv, h));
    t.push_back(zeros(p + "self_attn.v_proj.weight", kv, h));
    t.push_back(zeros(p + "self_attn.o_proj.weight", h, q));
    t.push_back(ones(p + "post_attention_layernorm.weight", h));
    t.push_back(zeros(p + "mlp.gate_proj.weight", ffn, h));
    t.push_back(zeros(p + "mlp.up_proj.weight", ffn, h));
    t.push_back(zeros(p + "mlp.down_proj.weight", h, ffn));
  }
  t.push_back(ones("model.norm.weight", h));
  std::vector<float> head(c.vocab_size * h, 0.0f);
  for (int64_t i = 0; i < h; ++i) head[eos * h + i] = 1.0f;
  t.push_back(f32_tensor("lm_head.weight", {c.vocab_size, h}, head));
  megaserve::testing::write_safetensors(dir / "model.safetensors", t);
  fs::copy_file(megaserve::testing::assets_dir() / kTokenizer, dir / "tokenizer.model");
  return dir;
}

TEST(ModelSetupTest, StopsOnTheTokenizerEosWhenConfigNamesNone) {
  MEGASERVE_REQUIRE_ASSET(kTokenizer);
  config::ServerConfig config = default_server_config();
  config.mutable_model()->set_path(write_eos_model(kTokenizerEos).string());
  config.mutable_engine()->set_backend("cpu");
  config.mutable_engine()->set_cpu_threads(1);
  config.mutable_engine()->set_num_kv_blocks(16);
  auto model = setup_model(config);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(model->eos_token_ids, std::vector<int32_t>{kTokenizerEos});
  ASSERT_EQ(model->info.eos_token_ids_size(), 1);
  EXPECT_EQ(model->info.eos_token_ids(0), kTokenizerEos);

  engine::GenerateRequest request;
  request.prompt_token_ids = {1, 403, 407};
  request.sampling.temperature = 0.0f;
  request.sampling.max_tokens = 8;
  auto output = model->engine->submit(request);
  ASSERT_TRUE(output.ok()) << output.status();
  std::vector<int32_t> tokens;
  std::optional<engine::FinishReason> finished;
  while (!finished) {
    for (engine::RequestEvent& e : (*output)->wait()) {
      for (const auto& tok : e.tokens) tokens.push_back(tok.token_id);
      if (e.finished) finished = e.finished;
    }
  }
  // One EOS, then stop: not eight EOS tokens ending at the length limit.
  EXPECT_EQ(tokens, std::vector<int32_t>{kTokenizerEos});
  EXPECT_EQ(*finished, engine::FinishReason::kStop);
  model->engine->drain(true);
}

// A directory's chat template is part of the model: chat_template.jinja (preferred) or
// tokenizer_config.json's chat_template. One the Jinja subset cannot parse fails the load with
// the file and the problem named, rather than leaving a model whose Chat always fails.
config::ServerConfig eos_model_config(const fs::path& dir) {
  config::ServerConfig config = default_server_config();
  config.mutable_model()->set_path(dir.string());
  config.mutable_engine()->set_backend("cpu");
  config.mutable_engine()->set_cpu_threads(1);
  config.mutable_engine()->set_num_kv_blocks(16);
  return config;
}

TEST(ModelSetupTest, UnsupportedTemplateInTokenizerConfigFailsTheLoad) {
  MEGASERVE_REQUIRE_ASSET(kTokenizer);
  const fs::path dir = write_eos_model(kTokenizerEos);
  megaserve::testing::write_file(dir / "tokenizer_config.json",
                                 R"({"chat_template": "{% macro m() %}x{% endmacro %}{{ m() }}"})");
  auto model = setup_model(eos_model_config(dir));
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument) << model.status();
  EXPECT_NE(model.status().message().find("tokenizer_config.json"), std::string::npos)
      << model.status();
  EXPECT_NE(model.status().message().find("unsupported statement 'macro'"), std::string::npos)
      << model.status();
}

TEST(ModelSetupTest, MalformedTokenizerConfigFailsTheLoad) {
  MEGASERVE_REQUIRE_ASSET(kTokenizer);
  const fs::path dir = write_eos_model(kTokenizerEos);
  megaserve::testing::write_file(dir / "tokenizer_config.json", "{\"chat_template\": ");
  auto model = setup_model(eos_model_config(dir));
  ASSERT_FALSE(model.ok());
  EXPECT_NE(model.status().message().find("tokenizer_config.json is not a JSON object"),
            std::string::npos)
      << model.status();
}

TEST(ModelSetupTest, ChatTemplateJinjaIsPreferredAndRendered) {
  MEGASERVE_REQUIRE_ASSET(kTokenizer);
  const fs::path dir = write_eos_model(kTokenizerEos);
  megaserve::testing::write_file(dir / "tokenizer_config.json",
                                 R"({"chat_template": "from tokenizer_config"})");
  megaserve::testing::write_file(
      dir / "chat_template.jinja",
      "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}{% endfor %}"
      "{% if add_generation_prompt %}<assistant>{% endif %}");
  auto model = setup_model(eos_model_config(dir));
  ASSERT_TRUE(model.ok()) << model.status();
  ASSERT_NE(model->chat_template, nullptr);
  engine::ChatTemplateInputs inputs;
  inputs.messages = {{"user", " hi "}};
  inputs.add_generation_prompt = true;
  auto text = model->chat_template->render(inputs);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, "<user>hi<assistant>");
  model->engine->drain(true);

  megaserve::testing::write_file(dir / "chat_template.jinja", "{% for m in messages %}");
  auto broken = setup_model(eos_model_config(dir));
  ASSERT_FALSE(broken.ok());
  EXPECT_NE(broken.status().message().find("chat_template.jinja"), std::string::npos)
      << broken.status();
}

// A tensor-parallel degree that does not divide the heads fails before any weight is read:
// the weights file here is garbage, and the error is about the degree, not the file.
TEST(ModelSetupTest, TensorParallelMistakeFailsBeforeTheWeightsLoad) {
  MEGASERVE_REQUIRE_ASSET(kTokenizer);
  const fs::path dir = write_eos_model(kTokenizerEos);
  megaserve::testing::write_file(dir / "model.safetensors", "not a safetensors file");
  config::ServerConfig config = eos_model_config(dir);
  config.mutable_engine()->set_tensor_parallel_size(3);  // 4 heads, 2 KV heads
  auto model = setup_model(config);
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument) << model.status();
  EXPECT_NE(model.status().message().find("engine.tensor_parallel_size: tensor_parallel 3 does "
                                          "not divide num_heads 4 and num_kv_heads 2"),
            std::string::npos)
      << model.status();
  // The same garbage with a degree that divides the heads is a weights error, as it should be.
  config.mutable_engine()->set_tensor_parallel_size(2);
  auto weights_error = setup_model(config);
  ASSERT_FALSE(weights_error.ok());
  EXPECT_NE(weights_error.status().message().find("model.safetensors"), std::string::npos)
      << weights_error.status();
}

// A Hugging Face directory of the Llama-3.x kind: tokenizer.json (no tokenizer.model),
// tokenizer_config.json and chat_template.jinja; Llama-3.2's real tokenizer files
// (scripts/install-deps unpacks them) and template, a tiny Llama shape with its vocabulary and
// dummy weights.
fs::path llama32_tokenizer_dir() {
  if (const char* dir = std::getenv("MEGASERVE_TOKENIZERS_DIR"); dir && *dir) {
    return fs::path(dir) / "llama-3.2";
  }
  if (const char* cache = std::getenv("XDG_CACHE_HOME"); cache && *cache) {
    return fs::path(cache) / "megaserve/tokenizers/llama-3.2";
  }
  const char* home = std::getenv("HOME");
  return fs::path(home != nullptr ? home : "") / ".cache/megaserve/tokenizers/llama-3.2";
}

TEST(ModelSetupTest, DirectoryWithOnlyTokenizerJsonServesWithItsTemplate) {
  const fs::path source = llama32_tokenizer_dir();
  if (!fs::exists(source / "tokenizer.json")) {
    if (megaserve::testing::running_in_ci()) {
      FAIL() << "missing " << source << " (scripts/install-deps fetches it)";
    }
    GTEST_SKIP() << source << " not present (scripts/install-deps fetches it)";
  }
  engine::ModelConfig c = megaserve::testing::tiny_model_config(engine::ModelFamily::kLlama);
  c.vocab_size = 128256;
  c.bos_token_id = 128000;
  c.eos_token_ids = {128009};
  const fs::path dir = megaserve::testing::make_test_dir("llama32_json");
  megaserve::testing::write_file(dir / "config.json", megaserve::testing::hf_config_json(c));
  fs::copy_file(source / "tokenizer.json", dir / "tokenizer.json",
                fs::copy_options::overwrite_existing);
  fs::copy_file(source / "tokenizer_config.json", dir / "tokenizer_config.json",
                fs::copy_options::overwrite_existing);
  // That tokenizer_config.json has no template; Meta's Llama-3.2 template as its own file.
  fs::copy_file(fs::path(MEGASERVE_SOURCE_DIR) / "tests/data/chat_templates/llama3.2.jinja",
                dir / "chat_template.jinja", fs::copy_options::overwrite_existing);
  config::ServerConfig config = eos_model_config(dir);
  config.mutable_model()->set_load_format("dummy");
  auto model = setup_model(config);
  ASSERT_TRUE(model.ok()) << model.status();

  // The directory's tokenizer is tokenizer.json: the same ids as loading that file directly.
  auto direct = engine::load_tokenizer(source / "tokenizer.json");
  ASSERT_TRUE(direct.ok()) << direct.status();
  const std::string text = "Hello, world! Tokenizers differ on text like this.";
  EXPECT_EQ(model->tokenizer->encode(text, true), (*direct)->encode(text, true));
  EXPECT_EQ(model->tokenizer->encode(text, true).front(), 128000);  // the post-processor's BOS

  ASSERT_NE(model->chat_template, nullptr);
  engine::ChatTemplateInputs inputs;
  inputs.messages = {{"user", "Hi"}};
  inputs.add_generation_prompt = true;
  inputs.bos_token = model->bos_token;
  inputs.eos_token = model->eos_token;
  auto prompt = model->chat_template->render(inputs);
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  EXPECT_NE(prompt->find("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"),
            std::string::npos)
      << *prompt;
  EXPECT_TRUE(prompt->ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n")) << *prompt;

  // And it generates: the engine runs on the tokenizer's ids.
  engine::GenerateRequest request;
  request.prompt_token_ids = model->tokenizer->encode("Hello", true);
  request.sampling.temperature = 0.0f;
  request.sampling.max_tokens = 3;
  request.sampling.ignore_eos = true;
  auto output = model->engine->submit(request);
  ASSERT_TRUE(output.ok()) << output.status();
  int tokens = 0;
  for (bool done = false; !done;) {
    for (engine::RequestEvent& e : (*output)->wait()) {
      tokens += static_cast<int>(e.tokens.size());
      done = done || e.finished.has_value();
    }
  }
  EXPECT_EQ(tokens, 3);
  model->engine->drain(true);
}

TEST(ModelSetupTest, DirectoryWithoutATemplateServesWithoutChat) {
  MEGASERVE_REQUIRE_ASSET(kTokenizer);
  const fs::path dir = write_eos_model(kTokenizerEos);
  megaserve::testing::write_file(dir / "tokenizer_config.json", R"({"bos_token": "<s>"})");
  auto model = setup_model(eos_model_config(dir));
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(model->chat_template, nullptr);
  model->engine->drain(true);
}

}  // namespace
}  // namespace megaserve::server
