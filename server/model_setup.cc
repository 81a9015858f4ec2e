#include "server/model_setup.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/cpu_backend.h"
#include "engine/demo_model.h"
#include "engine/model_config.h"
#include "engine/weights.h"
#include "spdlog/spdlog.h"
#if MEGASERVE_WITH_CUDA_BACKEND
#include "engine/cuda_backend.h"
#endif

namespace megaserve::server {
namespace {

namespace fs = std::filesystem;

struct ModelFiles {
  fs::path config_dir;   // holds config.json (and generation_config.json)
  fs::path weights_dir;  // holds the safetensors; empty with dummy weights
  fs::path tokenizer_file;
  std::string name;
  bool dummy = false;
};

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
        "--model=/path/to/hf-model-dir (config.json, *.safetensors, tokenizer.model).",
        demo.string());
    files.config_dir = demo;
    files.tokenizer_file = demo / "tokenizer.model";
    files.name = "megaserve-demo";
    files.dummy = true;
  } else {
    const fs::path dir = source.path();
    if (!source.config_file().empty()) {
      files.config_dir = fs::path(source.config_file()).parent_path();
    } else {
      files.config_dir = dir;
    }
    files.weights_dir = dir;
    files.tokenizer_file = dir / "tokenizer.model";
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
                                                const ModelFiles& files) {
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

// Which backend to build, and the sentence the log gives for it.
struct BackendChoice {
  bool cuda = false;
  std::string why;
};

absl::StatusOr<BackendChoice> choose_backend(const config::EngineConfig& e) {
  const std::string& asked = e.backend();
  if (asked == "cpu") return BackendChoice{false, "backend cpu: asked for by the configuration"};
#if MEGASERVE_WITH_CUDA_BACKEND
  std::string why_not;
  const bool supported = engine::cuda_backend_supported(&why_not);
  if (asked == "cuda") {
    if (!supported) {
      return absl::FailedPreconditionError(
          absl::StrCat("engine.backend \"cuda\": no usable GPU: ", why_not));
    }
    return BackendChoice{true, "backend cuda: asked for by the configuration"};
  }
  if (supported) return BackendChoice{true, "backend auto: a supported GPU is present"};
  return BackendChoice{false, absl::StrCat("backend auto: no supported GPU (", why_not,
                                           "), using the CPU interpreter")};
#else
  if (asked == "cuda") {
    return absl::FailedPreconditionError(
        "engine.backend \"cuda\": this megaserve was built without the CUDA backend (no CUDA "
        "toolkit at build time)");
  }
  return BackendChoice{false,
                       "backend auto: built without the CUDA backend, using the CPU interpreter"};
#endif
}

absl::StatusOr<std::unique_ptr<engine::Backend>> make_backend(const config::EngineConfig& e,
                                                              const BackendChoice& choice,
                                                              const engine::ModelConfig& model,
                                                              engine::ModelWeights weights) {
  std::unique_ptr<engine::Backend> backend;
#if MEGASERVE_WITH_CUDA_BACKEND
  if (choice.cuda) {
    if (e.tensor_parallel_size() != 1) {
      return absl::UnimplementedError(absl::StrCat(
          "engine.tensor_parallel_size ", e.tensor_parallel_size(),
          ": the CUDA backend runs one GPU (tensor parallelism is CPU-simulated only)"));
    }
    engine::CudaBackendOptions options;
    options.kv_block_size = static_cast<int32_t>(e.kv_block_size());
    options.num_kv_blocks = static_cast<int32_t>(e.num_kv_blocks());
    options.memory_fraction = e.gpu_memory_fraction();
    options.step_watchdog_ms = static_cast<int>(e.step_watchdog_ms());
    auto cuda = engine::CudaBackend::create(model, std::move(weights), options);
    if (!cuda.ok()) return cuda.status();
    backend = *std::move(cuda);
  }
#endif
  if (!choice.cuda) {
    engine::CpuBackendOptions options;
    options.tensor_parallel = static_cast<int>(e.tensor_parallel_size());
    options.kv_block_size = static_cast<int32_t>(e.kv_block_size());
    options.num_kv_blocks = e.num_kv_blocks() > 0 ? static_cast<int32_t>(e.num_kv_blocks())
                                                  : cpu_kv_blocks_for(model, options.kv_block_size,
                                                                      e.cpu_kv_cache_mib());
    const unsigned threads =
        e.cpu_threads() > 0 ? e.cpu_threads() : std::max(1u, std::thread::hardware_concurrency());
    options.num_sms = static_cast<int>(threads);
    options.execution.mode =
        threads > 1 ? engine::ExecutionMode::kThreaded : engine::ExecutionMode::kSequential;
    options.verify = e.verify_schedules();
    auto cpu = engine::CpuBackend::create(model, std::move(weights), options);
    if (!cpu.ok()) return cpu.status();
    backend = *std::move(cpu);
  }
  spdlog::info("{} ({})", choice.why, backend->describe());
  return backend;
}

}  // namespace

int32_t cpu_kv_blocks_for(const engine::ModelConfig& model, int32_t kv_block_size, uint32_t mib) {
  const int64_t bytes_per_block = int64_t{2} * model.num_layers * model.num_kv_heads *
                                  model.head_dim * kv_block_size * int64_t{sizeof(float)};
  if (bytes_per_block <= 0) return 0;
  return static_cast<int32_t>(std::max<int64_t>(1, (int64_t{mib} << 20) / bytes_per_block));
}

absl::StatusOr<ServedModel> setup_model(const config::ServerConfig& config) {
  auto files = locate_model(config.model());
  if (!files.ok()) return files.status();
  auto model = read_config(config.model(), *files);
  if (!model.ok()) return model.status();
  auto tokenizer = engine::Tokenizer::load(files->tokenizer_file);
  if (!tokenizer.ok()) return tokenizer.status();

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
  auto choice = choose_backend(e);
  if (!choice.ok()) return choice.status();
  // The CPU interpreter computes in fp32; the GPU takes bf16 (converted while loading, so
  // the host never holds an fp32 copy of a large model).
  const engine::DType dtype = choice->cuda ? engine::DType::kBF16 : engine::DType::kF32;
  engine::ModelWeights weights;
  if (files->dummy) {
    weights = engine::dummy_weights(*model, dtype, config.model().dummy_seed());
  } else {
    auto loaded = engine::load_weights(files->weights_dir, *model, dtype);
    if (!loaded.ok()) return loaded.status();
    weights = *std::move(loaded);
  }
  auto backend = make_backend(e, *choice, *model, std::move(weights));
  if (!backend.ok()) return backend.status();
  const std::string backend_description = (*backend)->describe();
  const int32_t num_kv_blocks = (*backend)->num_kv_blocks();

  engine::EngineOptions options;
  options.max_num_seqs = static_cast<int32_t>(e.max_num_seqs());
  options.max_num_batched_tokens = static_cast<int32_t>(e.max_num_batched_tokens());
  options.max_waiting_requests = static_cast<int32_t>(e.max_waiting_requests());
  options.max_model_len = static_cast<int32_t>(e.max_model_len());
  options.enable_prefix_caching = e.enable_prefix_caching();
  // Overlap pays only where a step runs beside the host (the GPU); the CPU interpreter runs
  // steps inside submit(), so there it would only delay applying outputs.
  options.overlap_scheduling = e.has_overlap_scheduling() ? e.overlap_scheduling() : choice->cuda;
  auto engine = engine::Engine::create(*model, *std::move(backend), options);
  if (!engine.ok()) return engine.status();

  ServedModel served;
  served.engine = *std::move(engine);
  served.tokenizer = *std::move(tokenizer);
  served.eos_token_ids = model->eos_token_ids;
  if (served.eos_token_ids.empty()) served.eos_token_ids = {served.tokenizer->eos_id()};
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
