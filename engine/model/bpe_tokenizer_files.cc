// Reading byte-level BPE tokenizers from files: Hugging Face tokenizer.json and GGUF
// metadata (bpe_tokenizer.h), and load_tokenizer(), which picks the reader by file type.
#include <fstream>
#include <optional>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/model/bpe_pretokenizer.h"
#include "engine/model/bpe_tokenizer.h"
#include "engine/model/gguf.h"
#include "engine/model/tokenizer.h"
#include "nlohmann/json.hpp"

namespace megaserve::engine {

namespace {

using nlohmann::json;

// A JSON field's string value, or "" when it is absent or null.
std::string string_field(const json& object, const char* key) {
  const auto it = object.find(key);
  return it != object.end() && it->is_string() ? it->get<std::string>() : "";
}

bool bool_field(const json& object, const char* key, bool fallback) {
  const auto it = object.find(key);
  return it != object.end() && it->is_boolean() ? it->get<bool>() : fallback;
}

// The token a tokenizer_config.json entry names: a string or an AddedToken object.
std::string config_token(const json& config, const char* key) {
  const auto it = config.find(key);
  if (it == config.end()) return "";
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object()) return string_field(*it, "content");
  return "";
}

absl::Status unsupported(const std::filesystem::path& path, const std::string& what) {
  return absl::InvalidArgumentError(
      absl::StrCat("tokenizer ", path.string(), ": ", what, " is not supported"));
}

// Reads the pre_tokenizer into spec->split_pattern.
absl::Status read_pre_tokenizer(const std::filesystem::path& path, const json& pre,
                                BpeTokenizerSpec* spec) {
  const auto byte_level_ok = [&](const json& p, bool want_regex) -> absl::Status {
    if (bool_field(p, "add_prefix_space", true)) {
      return unsupported(path, "pre_tokenizer ByteLevel with add_prefix_space");
    }
    if (bool_field(p, "use_regex", true) != want_regex) {
      return unsupported(path, want_regex ? "pre_tokenizer ByteLevel without use_regex alone"
                                          : "pre_tokenizer ByteLevel with use_regex after Split");
    }
    return absl::OkStatus();
  };
  const std::string type = pre.is_object() ? string_field(pre, "type") : "";
  if (type == "ByteLevel") {
    if (auto status = byte_level_ok(pre, true); !status.ok()) return status;
    spec->split_pattern = std::string(kGpt2SplitPattern);
    return absl::OkStatus();
  }
  if (type == "Sequence" && pre.contains("pretokenizers") && pre["pretokenizers"].is_array() &&
      pre["pretokenizers"].size() == 2) {
    const json& split = pre["pretokenizers"][0];
    const json& byte_level = pre["pretokenizers"][1];
    if (string_field(split, "type") == "Split" && string_field(byte_level, "type") == "ByteLevel") {
      if (string_field(split, "behavior") != "Isolated" || bool_field(split, "invert", false)) {
        return unsupported(path, absl::StrCat("pre_tokenizer Split with behavior ",
                                              string_field(split, "behavior"), " or invert"));
      }
      const auto pattern = split.find("pattern");
      if (pattern == split.end() || !pattern->is_object() || !pattern->contains("Regex") ||
          !(*pattern)["Regex"].is_string()) {
        return unsupported(path, "pre_tokenizer Split without a Regex pattern");
      }
      if (auto status = byte_level_ok(byte_level, false); !status.ok()) return status;
      spec->split_pattern = (*pattern)["Regex"].get<std::string>();
      return absl::OkStatus();
    }
  }
  return unsupported(path, absl::StrCat("pre_tokenizer ", pre.is_null() ? "null" : pre.dump()));
}

// Reads BOS from the post_processor (a TemplateProcessing whose single template is an
// optional special token and then the sequence), possibly inside a Sequence.
absl::Status read_post_processor(const std::filesystem::path& path, const json& post,
                                 BpeTokenizerSpec* spec) {
  if (post.is_null()) return absl::OkStatus();
  const std::string type = string_field(post, "type");
  if (type == "ByteLevel") return absl::OkStatus();  // offsets only
  if (type == "Sequence" && post.contains("processors") && post["processors"].is_array()) {
    for (const json& inner : post["processors"]) {
      if (auto status = read_post_processor(path, inner, spec); !status.ok()) return status;
    }
    return absl::OkStatus();
  }
  if (type != "TemplateProcessing") return unsupported(path, absl::StrCat("post_processor ", type));
  const json single = post.value("single", json::array());
  const auto bad_template = unsupported(
      path, absl::StrCat("post_processor template ", single.dump(), " (only [BOS] $A)"));
  if (!single.is_array() || single.empty() || single.size() > 2) return bad_template;
  if (!single.back().contains("Sequence")) return bad_template;
  if (single.size() == 1) return absl::OkStatus();
  const json& first = single.front();
  if (!first.contains("SpecialToken")) return bad_template;
  const std::string name = string_field(first["SpecialToken"], "id");
  const json special = post.value("special_tokens", json::object());
  if (!special.contains(name) || !special[name].contains("ids") ||
      special[name]["ids"].size() != 1) {
    return bad_template;
  }
  spec->bos_id = special[name]["ids"][0].get<int32_t>();
  spec->add_bos = true;
  return absl::OkStatus();
}

absl::Status read_model(const std::filesystem::path& path, const json& model,
                        BpeTokenizerSpec* spec) {
  const std::string type = string_field(model, "type");
  if (type != "BPE") {
    return unsupported(path, absl::StrCat("model type \"", type, "\" (only byte-level BPE)"));
  }
  if (bool_field(model, "byte_fallback", false)) return unsupported(path, "BPE byte_fallback");
  if (model.contains("dropout") && !model["dropout"].is_null()) {
    return unsupported(path, "BPE dropout");
  }
  if (!string_field(model, "continuing_subword_prefix").empty() ||
      !string_field(model, "end_of_word_suffix").empty()) {
    return unsupported(path, "BPE continuing_subword_prefix or end_of_word_suffix");
  }
  if (!string_field(model, "unk_token").empty()) return unsupported(path, "BPE unk_token");
  spec->ignore_merges = bool_field(model, "ignore_merges", false);
  const auto vocab = model.find("vocab");
  if (vocab == model.end() || !vocab->is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer ", path.string(), ": model.vocab is not an object"));
  }
  for (const auto& [token, id_json] : vocab->items()) {
    if (!id_json.is_number_integer() || id_json.get<int64_t>() < 0 ||
        id_json.get<int64_t>() > (1 << 24)) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer ", path.string(), ": token ", token,
                                                     " has a bad id ", id_json.dump()));
    }
    const auto id = id_json.get<size_t>();
    if (id >= spec->vocab.size()) spec->vocab.resize(id + 1);
    spec->vocab[id] = token;
  }
  for (const json& merge : model.value("merges", json::array())) {
    if (merge.is_string()) {
      const std::string text = merge.get<std::string>();
      const size_t space = text.find(' ');
      if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos) {
        return absl::InvalidArgumentError(
            absl::StrCat("tokenizer ", path.string(), ": merge \"", text, "\" is not two tokens"));
      }
      spec->merges.emplace_back(text.substr(0, space), text.substr(space + 1));
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
               merge[1].is_string()) {
      spec->merges.emplace_back(merge[0].get<std::string>(), merge[1].get<std::string>());
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer ", path.string(), ": merge ", merge.dump(), " is malformed"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<BpeTokenizerSpec> read_tokenizer_json(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("tokenizer ", path.string(), " cannot be opened"));
  }
  json root;
  try {
    root = json::parse(in);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer ", path.string(), " is not valid JSON: ", e.what()));
  }
  if (!root.is_object() || !root.contains("model") || !root["model"].is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer ", path.string(), " has no \"model\" object"));
  }
  BpeTokenizerSpec spec;
  spec.source = path.string();
  try {
    if (auto s = read_model(path, root["model"], &spec); !s.ok()) return s;
    const json normalizer = root.value("normalizer", json());
    if (!normalizer.is_null()) {
      if (string_field(normalizer, "type") != "NFC") {
        return unsupported(path, absl::StrCat("normalizer ", normalizer.dump()));
      }
      spec.nfc = true;
    }
    if (auto s = read_pre_tokenizer(path, root.value("pre_tokenizer", json()), &spec); !s.ok()) {
      return s;
    }
    const json decoder = root.value("decoder", json());
    if (decoder.is_null() || string_field(decoder, "type") != "ByteLevel") {
      return unsupported(path, absl::StrCat("decoder ", decoder.dump()));
    }
    if (auto s = read_post_processor(path, root.value("post_processor", json()), &spec); !s.ok()) {
      return s;
    }
    for (const json& added : root.value("added_tokens", json::array())) {
      BpeAddedToken token;
      token.id = added.at("id").get<int32_t>();
      token.content = added.at("content").get<std::string>();
      token.special = bool_field(added, "special", false);
      if (bool_field(added, "lstrip", false) || bool_field(added, "rstrip", false) ||
          bool_field(added, "single_word", false)) {
        return unsupported(path, absl::StrCat("added token ", token.content,
                                              " with lstrip, rstrip or single_word"));
      }
      spec.added_tokens.push_back(std::move(token));
    }
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer ", path.string(), " is malformed: ", e.what()));
  }
  // EOS (and BOS, when no post-processor adds it) is named by tokenizer_config.json beside
  // the file, where there is one.
  std::ifstream config_in(path.parent_path() / "tokenizer_config.json");
  const json config = config_in ? json::parse(config_in, nullptr, false) : json();
  if (config.is_object()) {
    const auto id_of = [&](const std::string& content) -> int32_t {
      if (content.empty()) return -1;
      for (const auto& token : spec.added_tokens) {
        if (token.content == content) return token.id;
      }
      for (size_t id = 0; id < spec.vocab.size(); ++id) {
        if (spec.vocab[id] == content) return static_cast<int32_t>(id);
      }
      return -1;
    };
    spec.eos_id = id_of(config_token(config, "eos_token"));
    if (spec.bos_id < 0) spec.bos_id = id_of(config_token(config, "bos_token"));
  }
  return spec;
}

absl::StatusOr<BpeTokenizerSpec> read_gguf_tokenizer(const GgufFile& file) {
  const std::string name = file.path().string();
  const auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("GGUF tokenizer ", name, ": ", what));
  };
  auto model = file.get_string("tokenizer.ggml.model");
  if (!model.ok()) return bad(std::string(model.status().message()));
  if (*model != "gpt2") {
    return bad(absl::StrCat("tokenizer.ggml.model \"", *model,
                            "\" is not supported (only \"gpt2\", byte-level BPE)"));
  }
  BpeTokenizerSpec spec;
  spec.source = name;
  auto pre = file.get_string("tokenizer.ggml.pre");
  std::string pre_name = pre.ok() ? *pre : "gpt-2";  // transformers' default: GPT-2's regex
  if (!pre.ok() && !absl::IsNotFound(pre.status())) return bad(std::string(pre.status().message()));
  const std::string_view* pattern = split_pattern_for_gguf_pre(pre_name);
  if (pattern == nullptr) {
    return bad(absl::StrCat("tokenizer.ggml.pre \"", pre_name, "\" is not supported"));
  }
  spec.split_pattern = std::string(*pattern);

  auto tokens = file.get_string_array("tokenizer.ggml.tokens");
  if (!tokens.ok()) return bad(std::string(tokens.status().message()));
  auto merges = file.get_string_array("tokenizer.ggml.merges");
  if (!merges.ok()) return bad(std::string(merges.status().message()));
  std::vector<int64_t> types;
  if (auto t = file.get_int_array("tokenizer.ggml.token_type"); t.ok()) {
    types = std::move(*t);
    if (types.size() != tokens->size()) {
      return bad(absl::StrCat("tokenizer.ggml.token_type has ", types.size(), " entries for ",
                              tokens->size(), " tokens"));
    }
  } else if (!absl::IsNotFound(t.status())) {
    return bad(std::string(t.status().message()));
  }
  // As transformers' GGUF loader: a token outside the byte alphabet is respelled from its
  // UTF-8 bytes; control tokens (3) inside the alphabet become special added tokens,
  // user-defined ones (4) plain added tokens.
  for (size_t id = 0; id < tokens->size(); ++id) {
    const std::string& token = (*tokens)[id];
    const bool in_alphabet = in_byte_level_alphabet(token);
    spec.vocab.push_back(in_alphabet ? token : byte_level_spelling(token));
    const int64_t type = types.empty() ? 1 : types[id];
    if ((type == 3 && in_alphabet) || type == 4) {
      spec.added_tokens.push_back({static_cast<int32_t>(id), token, type == 3});
    }
  }
  for (const std::string& merge : *merges) {
    const size_t space = merge.find(' ');
    if (space == std::string::npos || merge.find(' ', space + 1) != std::string::npos) {
      return bad(absl::StrCat("merge \"", merge, "\" is not two tokens"));
    }
    spec.merges.emplace_back(merge.substr(0, space), merge.substr(space + 1));
  }
  const auto optional_id = [&](const char* key) -> absl::StatusOr<int32_t> {
    auto id = file.get_int(key);
    if (absl::IsNotFound(id.status())) return -1;
    if (!id.ok()) return id.status();
    if (*id < 0 || *id >= static_cast<int64_t>(tokens->size())) {
      return absl::InvalidArgumentError(absl::StrCat(key, " ", *id, " is not a token id"));
    }
    return static_cast<int32_t>(*id);
  };
  auto bos = optional_id("tokenizer.ggml.bos_token_id");
  if (!bos.ok()) return bad(std::string(bos.status().message()));
  auto eos = optional_id("tokenizer.ggml.eos_token_id");
  if (!eos.ok()) return bad(std::string(eos.status().message()));
  spec.bos_id = *bos;
  spec.eos_id = *eos;
  auto add_bos = file.get_bool("tokenizer.ggml.add_bos_token");
  if (!add_bos.ok() && !absl::IsNotFound(add_bos.status())) {
    return bad(std::string(add_bos.status().message()));
  }
  spec.add_bos = add_bos.ok() && *add_bos;
  if (spec.add_bos && spec.bos_id < 0) return bad("add_bos_token is set but there is no BOS id");
  return spec;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> load_tokenizer(const std::filesystem::path& path) {
  std::error_code error;
  if (!std::filesystem::exists(path, error)) {
    return absl::NotFoundError(absl::StrCat("tokenizer ", path.string(), " does not exist"));
  }
  if (!std::filesystem::is_regular_file(path, error)) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer ", path.string(), " is not a regular file"));
  }
  std::ifstream in(path, std::ios::binary);
  std::string head(64, '\0');
  in.read(head.data(), static_cast<std::streamsize>(head.size()));
  head.resize(static_cast<size_t>(in.gcount()));
  if (head.starts_with("GGUF")) {
    auto file = GgufFile::open(path);
    if (!file.ok()) return file.status();
    auto spec = read_gguf_tokenizer(**file);
    if (!spec.ok()) return spec.status();
    auto tokenizer = BpeTokenizer::create(*std::move(spec));
    if (!tokenizer.ok()) return tokenizer.status();
    return std::unique_ptr<Tokenizer>(std::move(*tokenizer));
  }
  const size_t first = head.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && head[first] == '{') {
    auto spec = read_tokenizer_json(path);
    if (!spec.ok()) return spec.status();
    auto tokenizer = BpeTokenizer::create(*std::move(spec));
    if (!tokenizer.ok()) return tokenizer.status();
    return std::unique_ptr<Tokenizer>(std::move(*tokenizer));
  }
  return Tokenizer::load(path);
}

}  // namespace megaserve::engine
