// Chat templates: a model's Jinja template (tokenizer_config.json's `chat_template`, or the
// GGUF key tokenizer.chat_template) parsed once at load and rendered for a list of messages,
// identical to transformers' apply_chat_template(messages, tokenize=False, ...) on the
// templates of Llama-3.x, Qwen2.5, Qwen3 and SmolLM2. A template using a construct outside
// megaserve's Jinja subset (engine/model/jinja_ast.h) is refused at load, naming it.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"

namespace megaserve::engine {

class GgufFile;
namespace jinja {
struct Program;
}

struct ChatMessage {
  std::string role;  // "system", "user", "assistant", ...
  std::string content;
};

struct ChatTemplateInputs {
  std::vector<ChatMessage> messages;
  // Used when `messages` does not start with a system message: prepended as one.
  std::optional<std::string> default_system_prompt;
  // Ends the prompt with the header of an assistant turn, for the model to continue.
  bool add_generation_prompt = false;
  // The tokenizer's special tokens, as transformers passes its special_tokens_map; unset
  // ones stay undefined in the template (Qwen's tokenizers have no bos_token).
  std::optional<std::string> bos_token;
  std::optional<std::string> eos_token;
  // Further template variables, e.g. {"enable_thinking", false} for Qwen3 or
  // {"date_string", "26 Jul 2024"} for Llama-3.x.
  std::vector<std::pair<std::string, std::variant<bool, int64_t, std::string>>> extra;
};

class ChatTemplate {
 public:
  // Parses `source`; `name` (a file or model name) is quoted in every error.
  static absl::StatusOr<ChatTemplate> parse(std::string_view source, std::string_view name);
  // The template of a model, parsed: the metadata key tokenizer.chat_template of a GGUF
  // file, or `chat_template` of a tokenizer_config.json (a string, or transformers' list of
  // {"name", "template"} from which "default" is taken). NotFound when the model has none.
  static absl::StatusOr<ChatTemplate> from_gguf(const GgufFile& file);
  static absl::StatusOr<ChatTemplate> from_tokenizer_config(const std::filesystem::path& path);
  // A template file of its own (chat_template.jinja beside a model's tokenizer_config.json).
  static absl::StatusOr<ChatTemplate> from_file(const std::filesystem::path& path);

  // Renders the prompt. As in transformers, `tools` and `documents` are None and the Jinja
  // globals raise_exception() and strftime_now() exist. A template's raise_exception(msg),
  // or a message list the template cannot handle, is InvalidArgument with the message.
  absl::StatusOr<std::string> render(const ChatTemplateInputs& inputs) const;

  const std::string& name() const;

 private:
  explicit ChatTemplate(std::shared_ptr<const jinja::Program> program)
      : program_(std::move(program)) {}
  std::shared_ptr<const jinja::Program> program_;
};

}  // namespace megaserve::engine
