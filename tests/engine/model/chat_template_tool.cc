// Renders a chat template for many message lists, for chat_template_test.py to compare with
// jinja2 as transformers configures it.
// Usage: chat_template_tool TEMPLATE_FILE CASES_JSON   (writes a JSON array to stdout)
// CASES_JSON: {"bos_token": str|null, "eos_token": str|null, "cases": [{"messages":
// [{"role", "content"}...], "add_generation_prompt": bool, "extra": {name: bool|int|str}}]}
// Each output element: {"ok": true, "text": ...} or {"ok": false, "error": ...}; a template
// that fails to parse prints the error and exits 1.
// With --snippets, renders small templates of the Jinja subset against given variables.
#include <fstream>
#include <iostream>
#include <sstream>

#include "engine/model/chat_template.h"
#include "engine/model/jinja_ast.h"
#include "nlohmann/json.hpp"

namespace {

megaserve::engine::jinja::Value from_json(const nlohmann::ordered_json& j) {
  using megaserve::engine::jinja::Value;
  if (j.is_null()) return Value::none();
  if (j.is_boolean()) return Value::boolean(j.get<bool>());
  if (j.is_number_integer()) return Value::integer(j.get<int64_t>());
  if (j.is_number()) return Value::floating(j.get<double>());
  if (j.is_string()) return Value::string(j.get<std::string>());
  if (j.is_array()) {
    megaserve::engine::jinja::List items;
    for (const auto& e : j) items.push_back(from_json(e));
    return Value::list(std::move(items));
  }
  megaserve::engine::jinja::Dict d;
  for (const auto& [k, v] : j.items()) d.set(k, from_json(v));
  return Value::dict(std::move(d));
}

// --snippets FILE: {"variables": {...}, "snippets": [template, ...]}; each rendered with the
// variables (JSON objects keep their key order: nlohmann::ordered_json).
int render_snippets(const char* path) {
  std::ifstream file(path);
  const auto spec = nlohmann::ordered_json::parse(file);
  megaserve::engine::jinja::Dict variables;
  for (const auto& [k, v] : spec["variables"].items()) {
    variables.set(k, from_json(v));
  }
  nlohmann::json results = nlohmann::json::array();
  for (const auto& snippet : spec["snippets"]) {
    auto program = megaserve::engine::jinja::parse_template(snippet.get<std::string>(), "snippet");
    if (!program.ok()) {
      results.push_back({{"ok", false}, {"error", std::string(program.status().message())}});
      continue;
    }
    auto text = megaserve::engine::jinja::render_template(**program, variables);
    if (text.ok()) {
      results.push_back({{"ok", true}, {"text", *text}});
    } else {
      results.push_back({{"ok", false}, {"error", std::string(text.status().message())}});
    }
  }
  std::cout << results.dump() << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  using megaserve::engine::ChatTemplate;
  using megaserve::engine::ChatTemplateInputs;
  if (argc == 3 && std::string(argv[1]) == "--snippets") return render_snippets(argv[2]);
  if (argc != 3) {
    std::cerr << "usage: chat_template_tool TEMPLATE_FILE CASES_JSON\n"
                 "       chat_template_tool --snippets SNIPPETS_JSON\n";
    return 2;
  }
  std::ifstream template_file(argv[1], std::ios::binary);
  std::stringstream source;
  source << template_file.rdbuf();
  auto chat_template = ChatTemplate::parse(source.str(), argv[1]);
  if (!chat_template.ok()) {
    std::cerr << chat_template.status() << "\n";
    return 1;
  }
  std::ifstream cases_file(argv[2]);
  const nlohmann::json spec = nlohmann::json::parse(cases_file);
  nlohmann::json results = nlohmann::json::array();
  for (const auto& c : spec["cases"]) {
    ChatTemplateInputs inputs;
    for (const auto& m : c["messages"]) {
      inputs.messages.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
    }
    inputs.add_generation_prompt = c.value("add_generation_prompt", false);
    if (spec["bos_token"].is_string()) inputs.bos_token = spec["bos_token"].get<std::string>();
    if (spec["eos_token"].is_string()) inputs.eos_token = spec["eos_token"].get<std::string>();
    if (c.contains("extra")) {
      for (const auto& [key, value] : c["extra"].items()) {
        if (value.is_boolean()) {
          inputs.extra.emplace_back(key, value.get<bool>());
        } else if (value.is_number_integer()) {
          inputs.extra.emplace_back(key, value.get<int64_t>());
        } else {
          inputs.extra.emplace_back(key, value.get<std::string>());
        }
      }
    }
    auto text = chat_template->render(inputs);
    if (text.ok()) {
      results.push_back({{"ok", true}, {"text", *text}});
    } else {
      results.push_back({{"ok", false}, {"error", std::string(text.status().message())}});
    }
  }
  std::cout << results.dump() << "\n";
  return 0;
}
