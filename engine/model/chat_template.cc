#include "engine/model/chat_template.h"

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "engine/model/gguf.h"
#include "engine/model/jinja_ast.h"
#include "engine/model/jinja_value.h"
#include "nlohmann/json.hpp"

namespace megaserve::engine {

absl::StatusOr<ChatTemplate> ChatTemplate::parse(std::string_view source, std::string_view name) {
  auto program = jinja::parse_template(source, name);
  if (!program.ok()) return program.status();
  return ChatTemplate(*std::move(program));
}

absl::StatusOr<ChatTemplate> ChatTemplate::from_gguf(const GgufFile& file) {
  const std::string key = "tokenizer.chat_template";
  if (file.find_metadata(key) == nullptr) {
    return absl::NotFoundError(absl::StrCat(file.path().string(), " has no ", key));
  }
  auto source = file.get_string(key);
  if (!source.ok()) return source.status();
  return parse(*source, absl::StrCat(file.path().string(), ":", key));
}

absl::StatusOr<ChatTemplate> ChatTemplate::from_tokenizer_config(
    const std::filesystem::path& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return absl::NotFoundError(absl::StrCat("cannot open ", path.string()));
  std::stringstream text;
  text << file.rdbuf();
  const nlohmann::json config = nlohmann::json::parse(text.str(), nullptr, false);
  if (config.is_discarded() || !config.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path.string(), " is not a JSON object"));
  }
  const auto it = config.find("chat_template");
  if (it == config.end() || it->is_null()) {
    return absl::NotFoundError(absl::StrCat(path.string(), " has no chat_template"));
  }
  if (it->is_string()) return parse(it->get<std::string>(), path.string());
  if (it->is_array()) {  // [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
    for (const auto& entry : *it) {
      if (entry.is_object() && entry.value("name", "") == "default" && entry.contains("template") &&
          entry["template"].is_string()) {
        return parse(entry["template"].get<std::string>(), path.string() + ":default");
      }
    }
    return absl::NotFoundError(
        absl::StrCat(path.string(), ": chat_template has no entry named \"default\""));
  }
  return absl::InvalidArgumentError(
      absl::StrCat(path.string(), ": chat_template is neither a string nor a list"));
}

absl::StatusOr<ChatTemplate> ChatTemplate::from_file(const std::filesystem::path& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return absl::InvalidArgumentError(absl::StrCat("cannot open ", path.string()));
  std::stringstream text;
  text << file.rdbuf();
  return parse(text.str(), path.string());
}

const std::string& ChatTemplate::name() const { return program_->name; }

absl::StatusOr<std::string> ChatTemplate::render(const ChatTemplateInputs& inputs) const {
  using jinja::Value;
  jinja::List messages;
  auto add = [&](const std::string& role, const std::string& content) {
    jinja::Dict message;
    message.set("role", Value::string(role));
    message.set("content", Value::string(content));
    messages.push_back(Value::dict(std::move(message)));
  };
  if (inputs.default_system_prompt &&
      (inputs.messages.empty() || inputs.messages[0].role != "system")) {
    add("system", *inputs.default_system_prompt);
  }
  for (const ChatMessage& m : inputs.messages) add(m.role, m.content);

  // transformers: render(messages=..., tools=None, documents=None, add_generation_prompt=...,
  // **special_tokens_map, **kwargs).
  jinja::Dict variables;
  variables.set("messages", Value::list(std::move(messages)));
  variables.set("tools", Value::none());
  variables.set("documents", Value::none());
  variables.set("add_generation_prompt", Value::boolean(inputs.add_generation_prompt));
  if (inputs.bos_token) variables.set("bos_token", Value::string(*inputs.bos_token));
  if (inputs.eos_token) variables.set("eos_token", Value::string(*inputs.eos_token));
  for (const auto& [key, value] : inputs.extra) {
    if (const bool* b = std::get_if<bool>(&value)) {
      variables.set(key, Value::boolean(*b));
    } else if (const int64_t* i = std::get_if<int64_t>(&value)) {
      variables.set(key, Value::integer(*i));
    } else {
      variables.set(key, Value::string(std::get<std::string>(value)));
    }
  }
  return jinja::render_template(*program_, variables);
}

}  // namespace megaserve::engine
