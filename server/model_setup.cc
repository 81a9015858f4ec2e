#include "server/model_setup.h"

#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/backend_choice.h"
#include "engine/model/chat_template.h"
#include "engine/model/demo_model.h"
#include "engine/model/gguf.h"
#include "engine/model/gguf_model.h"
#include "engine/model/host_memory.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"
#include "engine/step_capture.h"
#include "spdlog/spdlog.h"

namespace megaserve::server {
namespace {

namespace fs = std::filesystem;

struct ModelFiles {
  fs::path config_dir;   // holds config.json (and generation_config.json)
  fs::path weights_dir;  // holds the safetensors; empty with dummy weights
  fs::path tokenizer_file;
  // A single .gguf file holding config, weights, tokenizer and chat template; config_dir and
  // weights_dir are then empty.
  fs::path gguf_file;
  std::string name;
  bool dummy = false;
};

// True for a regular file that starts with the GGUF magic, or any path named *.gguf (so
// that a missing or unreadable one gets GGUF's error naming it, not config.json's).
bool is_gguf(const fs::path& path) {
  if (path.extension() == ".gguf") return true;
  std::error_code error;
  if (!fs::is_regular_file(path, error)) return false;
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  return in.read(magic, 4) && std::string_view(magic, 4) == "GGUF";
}

absl::StatusOr<ModelFiles> locate_model(const config::ModelSource& source) {
  ModelFiles files;
  files.dummy = source.load_format() == "dummy";
  if (source.path().empty() && source.config_file().empty()) {
    const fs::path demo = engine::demo_model_dir();
    if (demo.empty()) {
      return absl::NotFoundError(
          "no --model given and the built-in demo model was not found (set MEGASERVE_DEMO_DIR "
          "or pass --model=/path/to/hf-model-dir)");
    }
    spdlog::warn(
        "No model given: serving the built-in DEMO model from {} (a small Llama shape with "
        "random weights; its output is gibberish). To serve a real model, pass "
        "--model=/path/to/hf-model-dir (config.json, *.safetensors, tokenizer.model or "
        "tokenizer.json) or --model=/path/to/model.gguf.",
        demo.string());
    files.config_dir = demo;
    files.tokenizer_file = demo / "tokenizer.model";
    files.name = "megaserve-demo";
    files.dummy = true;
  } else if (is_gguf(source.path())) {
    if (!source.config_file().empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("model.config_file cannot be combined with a GGUF model (", source.path(),
                       "): the GGUF file holds its config"));
    }
    files.gguf_file = source.path();
    files.tokenizer_file = files.gguf_file;
    files.name = files.gguf_file.stem().string();
  } else {
    const fs::path dir = source.path();
    if (!source.config_file().empty()) {
      files.config_dir = fs::path(source.config_file()).parent_path();
    } else {
      files.config_dir = dir;
    }
    files.weights_dir = dir;
    // sentencepiece's tokenizer.model where there is one (Llama-2 ships both), else Hugging
    // Face's tokenizer.json (Llama-3.x, Qwen2/2.5/3, SmolLM2 ship only that).
    files.tokenizer_file = dir / "tokenizer.model";
    std::error_code error;
    if (!fs::exists(files.tokenizer_file, error) && fs::exists(dir / "tokenizer.json", error)) {
      files.tokenizer_file = dir / "tokenizer.json";
    }
    files.name = (dir.empty() ? files.config_dir : dir).lexically_normal().filename().string();
    if (files.name.empty()) files.name = dir.lexically_normal().parent_path().filename().string();
    if (!files.dummy && dir.empty()) {
      return absl::InvalidArgumentError(
          "model.config_file without model.path needs model.load_format \"dummy\"");
    }
  }
  if (!source.tokenizer_file().empty()) files.tokenizer_file = source.tokenizer_file();
  if (!source.served_name().empty()) files.name = source.served_name();
  return files;
}

absl::StatusOr<engine::ModelConfig> read_config(const config::ModelSource& source,
                                                const ModelFiles& files,
                                                const engine::GgufFile* gguf) {
  if (gguf != nullptr) return engine::gguf_model_config(*gguf);
  if (!source.config_file().empty()) {
    std::ifstream in(source.config_file());
    if (!in) {
      return absl::NotFoundError(
          absl::StrCat("model.config_file ", source.config_file(), ": cannot open"));
    }
    std::ostringstream text;
    text << in.rdbuf();
    return engine::parse_model_config(text.str(), source.config_file());
  }
  return engine::load_model_config(files.config_dir);
}

// The model's chat template, or null when it has none: a GGUF file's tokenizer.chat_template;
// in a directory, chat_template.jinja (how transformers saves it now), else tokenizer_config.json's
// chat_template. A template that is there must parse: an error names the file and the problem.
absl::StatusOr<std::shared_ptr<const engine::ChatTemplate>> load_chat_template(
    const ModelFiles& files, const engine::GgufFile* gguf) {
  absl::StatusOr<engine::ChatTemplate> parsed = absl::NotFoundError("");
  if (gguf != nullptr) {
    parsed = engine::ChatTemplate::from_gguf(*gguf);
  } else if (!files.config_dir.empty()) {
    const fs::path jinja = files.config_dir / "chat_template.jinja";
    const fs::path tokenizer_config = files.config_dir / "tokenizer_config.json";
    std::error_code error;
    if (fs::exists(jinja, error)) {
      parsed = engine::ChatTemplate::from_file(jinja);
    } else if (fs::exists(tokenizer_config, error)) {
      parsed = engine::ChatTemplate::from_tokenizer_config(tokenizer_config);
    }
  }
  if (!parsed.ok() && !absl::IsNotFound(parsed.status())) return parsed.status();
  if (!parsed.ok()) {
    spdlog::info("model {}: no chat template, the Chat RPC is refused", files.name);
    return std::shared_ptr<const engine::ChatTemplate>();
  }
  return std::make_shared<const engine::ChatTemplate>(*std::move(parsed));
}

engine::BackendSettings backend_settings(const config::EngineConfig& e) {
  engine::BackendSettings s;
  s.backend = e.backend();
  s.tensor_parallel = static_cast<int>(e.tensor_parallel_size());
  s.tp_ranks_on_one_gpu = e.tp_ranks_on_one_gpu();
  s.kv_block_size = static_cast<int32_t>(e.kv_block_size());
  s.num_kv_blocks = static_cast<int32_t>(e.num_kv_blocks());
  s.gpu_memory_fraction = e.gpu_memory_fraction();
  s.step_watchdog_ms = static_cast<int>(e.step_watchdog_ms());
  s.cpu_kv_cache_mib = e.cpu_kv_cache_mib();
  s.cpu_threads = e.cpu_threads();
  s.verify_schedules = e.verify_schedules();
  return s;
}

}  // namespace

absl::StatusOr<ServedModel> setup_model(const config::ServerConfig& config) {
  auto files = locate_model(config.model());
  if (!files.ok()) return files.status();
  std::unique_ptr<engine::GgufFile> gguf;
  if (!files->gguf_file.empty()) {
    auto opened = engine::GgufFile::open(files->gguf_file);
    if (!opened.ok()) return opened.status();
    gguf = *std::move(opened);
  }
  auto model = read_config(config.model(), *files, gguf.get());
  if (!model.ok()) return model.status();
  auto tokenizer = engine::load_tokenizer(files->tokenizer_file);
  if (!tokenizer.ok()) return tokenizer.status();
  auto chat_template = load_chat_template(*files, gguf.get());
  if (!chat_template.ok()) return chat_template.status();

  spdlog::info("model {}: {} layers, hidden {}, {} heads ({} KV), vocab {}, context {}{}",
               files->name, model->num_layers, model->hidden_size, model->num_heads,
               model->num_kv_heads, model->vocab_size, model->max_position_embeddings,
               files->dummy ? ", dummy weights" : "");
  const config::EngineConfig& e = config.engine();
  // As vLLM does: positions past max_position_embeddings were never trained (and a context
  // the model cannot use only lets requests ask for more KV than makes sense).
  if (e.max_model_len() > static_cast<uint32_t>(model->max_position_embeddings)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "engine.max_model_len ", e.max_model_len(), " exceeds the model's ",
        "max_position_embeddings ", model->max_position_embeddings, " (", files->name,
        "); leave it 0 to use ", model->max_position_embeddings, " or give a smaller value"));
  }
  const engine::BackendSettings settings = backend_settings(e);
  auto choice = engine::choose_backend(settings);
  if (!choice.ok()) return choice.status();
  if (absl::Status s = engine::check_backend_settings(settings, *choice, *model); !s.ok()) {
    return s;
  }
  const engine::DType dtype = engine::weights_dtype(*choice);
  // Weights (dummy or loaded, converted to `dtype`) are held in host memory, on the GPU's way
  // too; the CPU backend adds its KV cache. Refuse what cannot fit before allocating it.
  const int64_t weight_bytes = model->num_parameters() * engine::dtype_size(dtype);
  const int64_t kv_bytes = choice->cuda ? 0 : engine::cpu_kv_cache_bytes(*model, settings);
  if (absl::Status memory = engine::check_host_memory(
          absl::StrCat(
              "model ", files->name, ": ", files->dummy ? "dummy " : "", "weights (",
              model->num_parameters(), " parameters in ", engine::dtype_name(dtype), ")",
              kv_bytes > 0 ? absl::StrCat(" and the CPU KV cache (", kv_bytes, " bytes)") : ""),
          weight_bytes + kv_bytes);
      !memory.ok()) {
    return memory;
  }
  engine::ModelWeights weights;
  if (files->dummy) {
    weights = engine::dummy_weights(*model, dtype, config.model().dummy_seed());
  } else {
    auto loaded = gguf != nullptr ? engine::load_gguf_weights(*gguf, *model, dtype)
                                  : engine::load_weights(files->weights_dir, *model, dtype);
    if (!loaded.ok()) return loaded.status();
    weights = *std::move(loaded);
  }
  auto backend = engine::make_backend(settings, *choice, *model, std::move(weights));
  if (!backend.ok()) return backend.status();
  const std::string backend_description = (*backend)->describe();
  const int32_t num_kv_blocks = (*backend)->num_kv_blocks();

  engine::EngineOptions options;
  options.max_num_seqs = static_cast<int32_t>(e.max_num_seqs());
  options.max_num_batched_tokens = static_cast<int32_t>(e.max_num_batched_tokens());
  options.max_prefill_tokens_with_decodes =
      static_cast<int32_t>(e.max_prefill_tokens_with_decodes());
  options.max_waiting_requests = static_cast<int32_t>(e.max_waiting_requests());
  options.max_model_len = static_cast<int32_t>(e.max_model_len());
  options.enable_prefix_caching = e.enable_prefix_caching();
  // Overlap pays only where a step runs beside the host (the GPU); the CPU interpreter runs
  // steps inside submit(), so there it would only delay applying outputs.
  options.overlap_scheduling = e.has_overlap_scheduling() ? e.overlap_scheduling() : choice->cuda;
  options.trace.steps = static_cast<int32_t>(e.trace_steps());
  options.trace.dir = e.trace_dir();
  if (options.trace.steps > 0) options.trace.plot_script = engine::find_trace_plot_script();
  // One list of stopping tokens for the scheduler and the output side.
  engine::resolve_eos_token_ids(*model, (*tokenizer)->eos_id());
  auto engine = engine::Engine::create(*model, *std::move(backend), options);
  if (!engine.ok()) return engine.status();

  ServedModel served;
  served.engine = *std::move(engine);
  served.tokenizer = *std::move(tokenizer);
  served.eos_token_ids = model->eos_token_ids;
  served.chat_template = *std::move(chat_template);
  if (served.tokenizer->bos_id() >= 0) {
    served.bos_token = served.tokenizer->piece(served.tokenizer->bos_id());
  }
  if (served.tokenizer->eos_id() >= 0) {
    served.eos_token = served.tokenizer->piece(served.tokenizer->eos_id());
  }
  v1::ModelInfo& info = served.info;
  info.set_name(files->name);
  info.set_architecture(model->architecture);
  info.set_max_model_len(e.max_model_len() > 0 ? static_cast<int32_t>(e.max_model_len())
                                               : model->max_position_embeddings);
  info.set_vocab_size(model->vocab_size);
  info.set_bos_token_id(model->bos_token_id);
  for (int32_t id : served.eos_token_ids) info.add_eos_token_ids(id);
  info.set_tensor_parallel_size(static_cast<int32_t>(e.tensor_parallel_size()));
  info.set_kv_block_size(static_cast<int32_t>(e.kv_block_size()));
  info.set_num_kv_blocks(num_kv_blocks);
  info.set_hidden_size(model->hidden_size);
  info.set_intermediate_size(model->intermediate_size);
  info.set_num_layers(model->num_layers);
  info.set_num_heads(model->num_heads);
  info.set_num_kv_heads(model->num_kv_heads);
  info.set_head_dim(model->head_dim);
  info.set_backend(backend_description);
  return served;
}

}  // namespace megaserve::server
