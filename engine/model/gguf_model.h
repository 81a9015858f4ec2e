// A `llama`-architecture GGUF file as megaserve's ModelConfig and ModelWeights: the
// hyper-parameters from the llama.* metadata keys, the tensors under llama.cpp's names
// (token_embd, blk.N.attn_q, ..., output) dequantized to the requested dtype and laid out
// exactly as the Hugging Face checkpoint they were converted from, so the rest of megaserve
// cannot tell a GGUF model from a safetensors one.
#pragma once

#include <filesystem>

#include "absl/status/statusor.h"
#include "engine/model/gguf.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"

namespace megaserve::engine {

// The config of a llama GGUF (general.architecture "llama"):
//   hidden_size             llama.embedding_length
//   intermediate_size       llama.feed_forward_length
//   num_layers              llama.block_count
//   num_heads, num_kv_heads llama.attention.head_count, .head_count_kv (default: head_count)
//   head_dim                llama.attention.key_length, else hidden_size / num_heads
//   max_position_embeddings llama.context_length
//   rms_norm_eps            llama.attention.layer_norm_rms_epsilon
//   rope_theta              llama.rope.freq_base (default 10000)
//   vocab_size              the length of tokenizer.ggml.tokens, else llama.vocab_size,
//                           else token_embd's row count
//   tie_word_embeddings     when the file has no output.weight
//   bos / eos ids           tokenizer.ggml.bos_token_id, eos_token_id (and eot_token_id)
// What megaserve cannot run is refused by name: another architecture, experts (Mixtral is
// `llama` in GGUF), RoPE scaling types, partial rotary (rope.dimension_count != head_dim).
// rope_freqs.weight (Llama 3.1's scaling, as llama.cpp's converter writes it) becomes
// RopeScaling::kFactors. Errors name the file and the key.
absl::StatusOr<ModelConfig> gguf_model_config(const GgufFile& file);

// Every tensor of `config`, dequantized from its GGUF type (F32, F16, BF16, Q8_0, Q4_0 or
// Q4_1; see ggml_types.h) to `dtype`, rounding once to nearest even. llama.cpp's converter
// permutes the rows of attn_q and attn_k within each head (it interleaves the two rotary
// halves, for its GPT-J-style RoPE); they are put back in Hugging Face's order (halves
// apart, rotate-half RoPE), the layout megaserve computes with. Shapes are checked against
// `config` before any conversion; a missing, misshapen, unexpected or non-dequantizable
// tensor fails naming the file and the tensor.
absl::StatusOr<ModelWeights> load_gguf_weights(const GgufFile& file, const ModelConfig& config,
                                               DType dtype);

struct GgufModel {
  ModelConfig config;
  ModelWeights weights;
};
// Opens `path` and loads both.
absl::StatusOr<GgufModel> load_gguf_model(const std::filesystem::path& path, DType dtype);

// Row `row` of a Hugging Face q or k projection ([num_heads * head_dim, hidden]) is row
// gguf_qk_source_row(row, head_dim) of llama.cpp's: within a head, HF row half * D/2 + i is
// llama.cpp row 2 * i + half. Exposed for tests and tools.
int64_t gguf_qk_source_row(int64_t row, int64_t head_dim);

}  // namespace megaserve::engine
