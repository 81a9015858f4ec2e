// Dumps the megakernel's logits on small random Llama, Qwen2 and Qwen3 models for
// scripts/hf-compare.py, which runs the same model directories through Hugging Face
// transformers (bf16) and compares. Per family it writes OUT_DIR/<family>/config.json and
// model.safetensors (bf16 weights, Hugging Face names, a config transformers 5 and
// megaserve's loader both read), then runs a mixed schedule on the backend: request A
// prefilled whole, B in chunks of 20 + 13 while A decodes, C (short) and D (150 tokens in
// chunks of 64) joining later, then greedy decodes for all. Every sampling event's full
// logits row goes into OUT_DIR/<family>/steps.json together with each request's tokens
// (prompt + the greedy tokens it generated), for the CUDA-core and the tensor-core variants.
//
//   gpu_logits_dump [--write-only] [--backend=cuda|cpu] OUT_DIR
// --write-only writes the model directories only (no GPU needed); --backend=cpu runs the
// CPU interpreter (fp32) instead, which checks the dump and the comparison without a GPU.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/isa/bf16.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"
#include "engine/step_runner.h"
#include "nlohmann/json.hpp"

namespace megaserve::engine {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

constexpr int32_t kBlockSize = 16;

struct Family {
  std::string name;  // folder under OUT_DIR
  ModelConfig config;
};

ModelConfig base_config(ModelFamily family, const char* architecture) {
  ModelConfig c;
  c.family = family;
  c.architecture = architecture;
  c.hidden_size = 256;
  c.intermediate_size = 512;
  c.head_dim = 64;
  c.max_position_embeddings = 2048;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  c.torch_dtype = "bfloat16";
  return c;
}

// Llama: GQA 4, 3 layers, llama3 RoPE whose original context (64) is short enough that the
// scaled low frequencies matter at the positions used here.
// Qwen2: q/k/v bias, GQA 2, odd vocab. Qwen3: q/k RMSNorm, q_size 512 != hidden 256.
std::vector<Family> families() {
  std::vector<Family> out;
  ModelConfig llama = base_config(ModelFamily::kLlama, "LlamaForCausalLM");
  llama.num_layers = 3;
  llama.num_heads = 4;
  llama.num_kv_heads = 1;
  llama.vocab_size = 1000;
  llama.rope_theta = 500000.0f;
  llama.rope_scaling = {RopeScalingType::kLlama3, 8.0f, 1.0f, 4.0f, 64};
  out.push_back({"llama", llama});
  ModelConfig qwen2 = base_config(ModelFamily::kQwen2, "Qwen2ForCausalLM");
  qwen2.num_layers = 2;
  qwen2.num_heads = 4;
  qwen2.num_kv_heads = 2;
  qwen2.vocab_size = 515;
  qwen2.rms_norm_eps = 1e-6f;
  qwen2.rope_theta = 1000000.0f;
  qwen2.qkv_bias = true;
  out.push_back({"qwen2", qwen2});
  ModelConfig qwen3 = base_config(ModelFamily::kQwen3, "Qwen3ForCausalLM");
  qwen3.num_layers = 2;
  qwen3.num_heads = 8;
  qwen3.num_kv_heads = 2;
  qwen3.vocab_size = 640;
  qwen3.rms_norm_eps = 1e-6f;
  qwen3.rope_theta = 1000000.0f;
  qwen3.qk_norm = true;
  out.push_back({"qwen3", qwen3});
  return out;
}

// config.json in both spellings transformers has used: rope_parameters (5.x, with
// rope_theta inside) and rope_theta/rope_scaling (4.x; 5.x converts them), dtype and
// torch_dtype. megaserve's parser reads either.
// A float field as the decimal a person would write (1e-05, not 9.99999974737875e-06); it
// reads back as the same float.
double decimal(float x) { return std::stod(absl::StrFormat("%.7g", x)); }

json hf_config(const ModelConfig& c) {
  const char* model_type = c.family == ModelFamily::kLlama   ? "llama"
                           : c.family == ModelFamily::kQwen2 ? "qwen2"
                                                             : "qwen3";
  json j;
  j["architectures"] = {c.architecture};
  j["model_type"] = model_type;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = c.num_kv_heads;
  j["head_dim"] = c.head_dim;
  j["vocab_size"] = c.vocab_size;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = decimal(c.rms_norm_eps);
  j["hidden_act"] = "silu";
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["bos_token_id"] = c.bos_token_id;
  j["eos_token_id"] = c.eos_token_ids[0];
  j["torch_dtype"] = c.torch_dtype;
  j["dtype"] = c.torch_dtype;
  j["attention_bias"] = c.qkv_bias;
  j["mlp_bias"] = false;
  j["attention_dropout"] = 0.0;
  j["use_cache"] = true;
  if (c.family != ModelFamily::kLlama) {
    j["use_sliding_window"] = false;
    j["sliding_window"] = nullptr;
    j["max_window_layers"] = c.num_layers;
  }
  json rope = {{"rope_type", "default"}, {"rope_theta", decimal(c.rope_theta)}};
  if (c.rope_scaling.type == RopeScalingType::kLlama3) {
    rope = {{"rope_type", "llama3"},
            {"rope_theta", decimal(c.rope_theta)},
            {"factor", c.rope_scaling.factor},
            {"low_freq_factor", c.rope_scaling.low_freq_factor},
            {"high_freq_factor", c.rope_scaling.high_freq_factor},
            {"original_max_position_embeddings", c.rope_scaling.original_max_position_embeddings}};
    j["rope_scaling"] = rope;
  }
  j["rope_parameters"] = rope;
  j["rope_theta"] = decimal(c.rope_theta);
  return j;
}

// One bf16 tensor of the safetensors file: name, shape, values already rounded to bf16.
struct Bf16Tensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<uint16_t> bits;
};

// Random weights drawn as the test writer draws them (projections U(-a, a), a =
// 1/sqrt(in); biases U(-0.1, 0.1); norm gains 1 + U(-0.25, 0.25)), except the lm_head's row
// gains below, stored as bf16 so that transformers and the megakernel hold bit-identical
// weights.
std::vector<Bf16Tensor> random_weights(const ModelConfig& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Bf16Tensor> out;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, double lo, double hi) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::uniform_real_distribution<double> dist(lo, hi);
    Bf16Tensor t{name, std::move(shape), std::vector<uint16_t>(n)};
    for (uint16_t& b : t.bits) b = float_to_bf16(static_cast<float>(dist(rng)));
    out.push_back(std::move(t));
  };
  auto matrix = [&](const std::string& name, int64_t rows, int64_t cols) {
    const double a = 1.0 / std::sqrt(static_cast<double>(cols));
    add(name, {rows, cols}, -a, a);
  };
  auto norm = [&](const std::string& name, int64_t n) { add(name, {n}, 0.75, 1.25); };
  auto bias = [&](const std::string& name, int64_t n) { add(name, {n}, -0.1, 0.1); };
  matrix("model.embed_tokens.weight", c.vocab_size, c.hidden_size);
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    norm(p + "input_layernorm.weight", c.hidden_size);
    matrix(p + "self_attn.q_proj.weight", c.q_size(), c.hidden_size);
    matrix(p + "self_attn.k_proj.weight", c.kv_size(), c.hidden_size);
    matrix(p + "self_attn.v_proj.weight", c.kv_size(), c.hidden_size);
    if (c.qkv_bias) {
      bias(p + "self_attn.q_proj.bias", c.q_size());
      bias(p + "self_attn.k_proj.bias", c.kv_size());
      bias(p + "self_attn.v_proj.bias", c.kv_size());
    }
    if (c.qk_norm) {
      norm(p + "self_attn.q_norm.weight", c.head_dim);
      norm(p + "self_attn.k_norm.weight", c.head_dim);
    }
    matrix(p + "self_attn.o_proj.weight", c.hidden_size, c.q_size());
    norm(p + "post_attention_layernorm.weight", c.hidden_size);
    matrix(p + "mlp.gate_proj.weight", c.intermediate_size, c.hidden_size);
    matrix(p + "mlp.up_proj.weight", c.intermediate_size, c.hidden_size);
    matrix(p + "mlp.down_proj.weight", c.hidden_size, c.intermediate_size);
  }
  norm("model.norm.weight", c.hidden_size);
  // lm_head rows with gains exp(U(-1.5, 1.5)): peaked next-token distributions like a
  // trained model's. With equal row norms the top two logits of ~1000 are often closer than
  // bf16 can resolve (~5% of positions), and argmax agreement would measure ties, not bugs.
  matrix("lm_head.weight", c.vocab_size, c.hidden_size);
  std::uniform_real_distribution<double> log_gain(-1.5, 1.5);
  std::vector<uint16_t>& head = out.back().bits;
  for (int64_t row = 0; row < c.vocab_size; ++row) {
    const double gain = std::exp(log_gain(rng));
    for (int64_t k = row * c.hidden_size; k < (row + 1) * c.hidden_size; ++k) {
      head[k] = float_to_bf16(static_cast<float>(bf16_to_float(head[k]) * gain));
    }
  }
  return out;
}

absl::Status write_text(const fs::path& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(text.data(), static_cast<std::streamsize>(text.size()));
  if (!f) return absl::InternalError(absl::StrCat("cannot write ", path.string()));
  return absl::OkStatus();
}

// model.safetensors: 8-byte little-endian header length, the JSON header (space-padded to a
// multiple of 8), then the tensors back to back.
absl::Status write_safetensors(const fs::path& path, const std::vector<Bf16Tensor>& tensors) {
  nlohmann::ordered_json header;
  header["__metadata__"] = {{"format", "pt"}};
  uint64_t offset = 0;
  std::string data;
  for (const Bf16Tensor& t : tensors) {
    const size_t bytes = t.bits.size() * sizeof(uint16_t);
    header[t.name] = {
        {"dtype", "BF16"}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
    data.append(reinterpret_cast<const char*>(t.bits.data()), bytes);
    offset += bytes;
  }
  std::string text = header.dump();
  while (text.size() % 8 != 0) text.push_back(' ');
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((text.size() >> (8 * i)) & 0xff);
  return write_text(path, out + text + data);
}

// Writes the model directory, then reads it back through megaserve's own config parser and
// loader (what the server does), so a field either side misreads shows up here.
absl::StatusOr<ModelConfig> write_model(const fs::path& dir, const ModelConfig& config,
                                        uint64_t seed) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", dir.string()));
  if (absl::Status s = write_text(dir / "config.json", hf_config(config).dump(2)); !s.ok()) {
    return s;
  }
  if (absl::Status s = write_safetensors(dir / "model.safetensors", random_weights(config, seed));
      !s.ok()) {
    return s;
  }
  absl::StatusOr<ModelConfig> read = load_model_config(dir);
  if (!read.ok()) return read.status();
  if (read->family != config.family || read->qkv_bias != config.qkv_bias ||
      read->qk_norm != config.qk_norm || read->head_dim != config.head_dim ||
      read->num_kv_heads != config.num_kv_heads || read->vocab_size != config.vocab_size ||
      read->tie_word_embeddings || read->rope_theta != config.rope_theta ||
      read->rope_scaling.type != config.rope_scaling.type ||
      read->rope_scaling.original_max_position_embeddings !=
          config.rope_scaling.original_max_position_embeddings) {
    return absl::InternalError(absl::StrCat((dir / "config.json").string(),
                                            ": megaserve reads back a different model shape"));
  }
  return read;
}

// A request of the schedule: its prompt fed in `chunks` from `start_step` on (one chunk per
// step, sampling only after the last), then one greedy decode per step until it has
// generated `max_new` tokens.
struct Request {
  std::vector<int32_t> tokens;  // prompt, then generated tokens
  int prompt_len = 0;
  std::vector<int> chunks;
  int start_step = 0;
  int max_new = 0;
  int fed = 0;
  std::vector<int32_t> blocks;
};

std::vector<Request> make_requests(int vocab) {
  std::mt19937 rng(2024);
  auto prompt = [&](int n) {
    std::vector<int32_t> t(n);
    for (int32_t& x : t) x = static_cast<int32_t>(rng() % vocab);
    return t;
  };
  std::vector<Request> r(4);
  r[0] = {prompt(37), 37, {37}, 0, 20};            // A: whole prefill
  r[1] = {prompt(33), 33, {20, 13}, 1, 16};        // B: chunked while A decodes
  r[2] = {prompt(5), 5, {5}, 3, 18};               // C: short prompt joining later
  r[3] = {prompt(150), 150, {64, 64, 22}, 2, 12};  // D: several KV blocks, 64-token chunks
  return r;
}

using LogitsFn = std::function<absl::StatusOr<std::vector<float>>(int sample)>;

// Runs the schedule on `backend`; returns {"requests": [...], "events": [...]}.
absl::StatusOr<json> run_schedule(const ModelConfig& config, Backend& backend,
                                  const LogitsFn& logits) {
  const int vocab = config.vocab_size;
  StepRunner runner(config, backend);
  std::vector<Request> reqs = make_requests(vocab);
  std::vector<int32_t> free_blocks;
  for (int32_t b = backend.num_kv_blocks() - 1; b >= 0; --b) free_blocks.push_back(b);
  std::shuffle(free_blocks.begin(), free_blocks.end(), std::mt19937(7));
  json events = json::array();
  for (int step = 0;; ++step) {
    scheduler::StepPlan plan;
    plan.step_id = step;
    plan.kv_block_size = kBlockSize;
    std::vector<int> in_plan;
    for (size_t i = 0; i < reqs.size(); ++i) {
      Request& r = reqs[i];
      const int generated = static_cast<int>(r.tokens.size()) - r.prompt_len;
      if (step < r.start_step || generated >= r.max_new) continue;
      const int k = step - r.start_step;
      const int n = k < static_cast<int>(r.chunks.size()) ? r.chunks[k] : 1;
      scheduler::StepRequest sr;
      sr.request_id = i + 1;  // ids from 1, as the engine numbers them
      sr.first_position = r.fed;
      sr.token_ids.assign(r.tokens.begin() + r.fed, r.tokens.begin() + r.fed + n);
      while (static_cast<int>(r.blocks.size()) * kBlockSize < r.fed + n) {
        if (free_blocks.empty()) return absl::ResourceExhaustedError("out of KV blocks");
        r.blocks.push_back(free_blocks.back());
        free_blocks.pop_back();
      }
      sr.block_table = r.blocks;
      sr.sample = r.fed + n >= r.prompt_len;  // not after a non-final prefill chunk
      sr.sampling.temperature = 0.0f;
      sr.output_token_index = generated;
      r.fed += n;
      if (sr.sample) in_plan.push_back(static_cast<int>(i));
      plan.requests.push_back(std::move(sr));
    }
    if (plan.requests.empty()) break;
    absl::StatusOr<scheduler::StepOutput> out = runner.execute(plan);
    if (!out.ok()) return out.status();
    if (out->sampled.size() != in_plan.size()) {
      return absl::InternalError(absl::StrCat("step ", step, ": ", out->sampled.size(),
                                              " samples for ", in_plan.size(), " requests"));
    }
    for (size_t s = 0; s < in_plan.size(); ++s) {
      Request& r = reqs[in_plan[s]];
      absl::StatusOr<std::vector<float>> row = logits(static_cast<int>(s));
      if (!row.ok()) return row.status();
      const int32_t id = out->sampled[s].token_id;
      events.push_back({{"step", step},
                        {"request", in_plan[s]},
                        {"position", r.fed - 1},
                        {"sampled", id},
                        {"logits", *row}});
      r.tokens.push_back(id);
    }
  }
  json requests = json::array();
  for (const Request& r : reqs) {
    requests.push_back({{"prompt_len", r.prompt_len}, {"tokens", r.tokens}});
  }
  return json{{"requests", requests}, {"events", events}};
}

absl::StatusOr<json> run_variant(const std::string& backend_name, bool tensor_cores,
                                 const ModelConfig& config, const ModelWeights& weights) {
  const int32_t blocks = 64;  // the four requests need 4 + 3 + 2 + 11
  if (backend_name == "cpu") {
    CpuBackendOptions o;
    o.num_sms = 4;
    o.num_kv_blocks = blocks;
    o.kv_block_size = kBlockSize;
    auto b = CpuBackend::create(config, weights, o);
    if (!b.ok()) return b.status();
    CpuBackend& cpu = **b;
    return run_schedule(config, cpu, [&](int s) -> absl::StatusOr<std::vector<float>> {
      return cpu.interpreter().logits(s);
    });
  }
  CudaBackendOptions o;
  o.kv_block_size = kBlockSize;
  o.num_kv_blocks = blocks;
  o.tensor_cores = tensor_cores;
  o.poison_workspace = true;  // an unwritten read shows up as NaN in the logits
  auto b = CudaBackend::create(config, weights, o);
  if (!b.ok()) return b.status();
  CudaBackend& gpu = **b;
  std::printf("  %s\n", gpu.describe().c_str());
  return run_schedule(config, gpu, [&](int s) { return gpu.logits(s); });
}

int run(const fs::path& out_dir, const std::string& backend_name, bool write_only) {
  if (!write_only && backend_name == "cuda") {
    std::string why;
    if (!cuda_backend_supported(&why)) {
      std::fprintf(stderr, "gpu_logits_dump: no supported GPU: %s\n", why.c_str());
      return 1;
    }
  }
  uint64_t seed = 11;
  for (const Family& f : families()) {
    const fs::path dir = out_dir / f.name;
    absl::StatusOr<ModelConfig> config = write_model(dir, f.config, seed++);
    if (!config.ok()) {
      std::fprintf(stderr, "%s: %s\n", f.name.c_str(), config.status().ToString().c_str());
      return 1;
    }
    std::printf("%s: wrote %s\n", f.name.c_str(), dir.c_str());
    if (write_only) continue;
    absl::StatusOr<ModelWeights> weights = load_weights(dir, *config, DType::kBF16);
    if (!weights.ok()) {
      std::fprintf(stderr, "%s: %s\n", f.name.c_str(), weights.status().ToString().c_str());
      return 1;
    }
    json variants = json::array();
    const std::vector<std::pair<std::string, bool>> kinds =
        backend_name == "cpu"
            ? std::vector<std::pair<std::string, bool>>{{"cpu-interpreter", false}}
            : std::vector<std::pair<std::string, bool>>{{"cuda-cores", false},
                                                        {"tensor-cores", true}};
    for (const auto& [name, tensor_cores] : kinds) {
      absl::StatusOr<json> v = run_variant(backend_name, tensor_cores, *config, *weights);
      if (!v.ok()) {
        std::fprintf(stderr, "%s %s: %s\n", f.name.c_str(), name.c_str(),
                     v.status().ToString().c_str());
        return 1;
      }
      (*v)["name"] = name;
      std::printf("  %s: %zu sampling events\n", name.c_str(), (*v)["events"].size());
      variants.push_back(std::move(*v));
    }
    const json steps = {{"family", f.name},
                        {"vocab_size", config->vocab_size},
                        {"rope_inv_freq", rope_inv_freq(*config)},
                        {"variants", variants}};
    if (absl::Status s = write_text(dir / "steps.json", steps.dump()); !s.ok()) {
      std::fprintf(stderr, "%s\n", s.ToString().c_str());
      return 1;
    }
  }
  return 0;
}

}  // namespace
}  // namespace megaserve::engine

int main(int argc, char** argv) {
  bool write_only = false;
  std::string backend = "cuda";
  std::string out_dir;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--write-only") {
      write_only = true;
    } else if (arg.rfind("--backend=", 0) == 0) {
      backend = arg.substr(10);
    } else if (out_dir.empty() && arg.rfind("--", 0) != 0) {
      out_dir = arg;
    } else {
      out_dir.clear();
      break;
    }
  }
  if (out_dir.empty() || (backend != "cuda" && backend != "cpu")) {
    std::fprintf(stderr, "usage: gpu_logits_dump [--write-only] [--backend=cuda|cpu] OUT_DIR\n");
    return 2;
  }
  return megaserve::engine::run(out_dir, backend, write_only);
}
