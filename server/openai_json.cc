#include "server/openai_json.h"

#include <algorithm>
#include <cmath>
#include <iterator>
#include <limits>
#include <random>
#include <utility>

#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"
#include "server/request_validation.h"

namespace megaserve::server {
namespace {

using Json = nlohmann::json;

// Where openai_error keeps `param` and `code` in an absl::Status.
constexpr char kParamPayload[] = "megaserve.openai/param";
constexpr char kCodePayload[] = "megaserve.openai/code";

// Generated text may hold bytes that are not UTF-8 (a byte-fallback token cut a character):
// they become U+FFFD rather than an exception.
std::string dump(const Json& json) {
  return json.dump(-1, ' ', false, Json::error_handler_t::replace);
}

std::string sse(const Json& json) { return absl::StrCat("data: ", dump(json), "\n\n"); }

const char* type_name(const Json& value) {
  if (value.is_string()) return "a string";
  if (value.is_boolean()) return "a boolean";
  if (value.is_number()) return "a number";
  if (value.is_array()) return "an array";
  if (value.is_object()) return "an object";
  return "null";
}

// Reads the optional fields of one JSON object; null counts as absent (clients send nulls
// for unset fields). A value of the wrong type records an error naming the field; the first
// error is the one reported.
class FieldReader {
 public:
  explicit FieldReader(const Json& object) : object_(object) {}

  const Json* value(const char* name) const {
    const auto it = object_.find(name);
    return it == object_.end() || it->is_null() ? nullptr : &*it;
  }
  std::optional<double> number(const char* name) {
    const Json* v = value(name);
    if (v == nullptr) return std::nullopt;
    if (!v->is_number()) return wrong_type(name, *v, "a number");
    return v->get<double>();
  }
  // An integer in [lo, hi].
  std::optional<int64_t> integer(const char* name, int64_t lo, int64_t hi) {
    const Json* v = value(name);
    if (v == nullptr) return std::nullopt;
    if (!v->is_number_integer()) return wrong_type(name, *v, "an integer");
    const bool too_big =
        v->is_number_unsigned() && v->get<uint64_t>() > static_cast<uint64_t>(hi < 0 ? 0 : hi);
    if (too_big || v->get<int64_t>() < lo || v->get<int64_t>() > hi) {
      fail(name, absl::StrCat(name, " must be in [", lo, ", ", hi, "], got ", v->dump()));
      return std::nullopt;
    }
    return v->get<int64_t>();
  }
  std::optional<bool> boolean(const char* name) {
    const Json* v = value(name);
    if (v == nullptr) return std::nullopt;
    if (!v->is_boolean()) return wrong_type(name, *v, "a boolean");
    return v->get<bool>();
  }
  std::optional<std::string> string(const char* name) {
    const Json* v = value(name);
    if (v == nullptr) return std::nullopt;
    if (!v->is_string()) return wrong_type(name, *v, "a string");
    return v->get<std::string>();
  }

  void fail(const std::string& param, const std::string& message) {
    if (status_.ok()) {
      status_ = openai_error(absl::StatusCode::kInvalidArgument, message, param);
    }
  }
  const absl::Status& status() const { return status_; }

 private:
  std::nullopt_t wrong_type(const char* name, const Json& v, const char* wanted) {
    fail(name, absl::StrCat(name, " must be ", wanted, ", got ", type_name(v)));
    return std::nullopt;
  }

  const Json& object_;
  absl::Status status_;
};

// A field megaserve does not implement: refused when it asks for something, so that a client
// never silently gets less than it asked for.
void refuse_if(FieldReader& r, bool asked, const char* name, const char* why) {
  if (asked) r.fail(name, absl::StrCat(name, " is not supported", why));
}

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// The sampling fields both endpoints share, into `p`.
void read_sampling(FieldReader& r, v1::SamplingParameters* p) {
  if (auto v = r.number("temperature")) p->set_temperature(static_cast<float>(*v));
  if (auto v = r.number("top_p")) p->set_top_p(static_cast<float>(*v));
  if (auto v = r.number("presence_penalty")) p->set_presence_penalty(static_cast<float>(*v));
  if (auto v = r.number("frequency_penalty")) p->set_frequency_penalty(static_cast<float>(*v));
  if (auto v = r.integer("max_tokens", 1, kInt32Max)) {
    p->set_max_tokens(static_cast<int32_t>(*v));
  }
  // OpenAI's seed is any 64-bit integer; the engine's is unsigned: the same bits.
  if (const Json* seed = r.value("seed")) {
    if (!seed->is_number_integer()) {
      r.fail("seed", absl::StrCat("seed must be an integer, got ", type_name(*seed)));
    } else {
      p->set_seed(seed->is_number_unsigned() ? seed->get<uint64_t>()
                                             : static_cast<uint64_t>(seed->get<int64_t>()));
    }
  }
  if (const Json* stop = r.value("stop")) {
    if (stop->is_string()) {
      p->add_stop(stop->get<std::string>());
    } else if (stop->is_array()) {
      for (const Json& s : *stop) {
        if (!s.is_string()) {
          r.fail("stop", absl::StrCat("stop must be a string or an array of strings, got ",
                                      type_name(s), " in the array"));
          break;
        }
        p->add_stop(s.get<std::string>());
      }
    } else {
      r.fail("stop",
             absl::StrCat("stop must be a string or an array of strings, got ", type_name(*stop)));
    }
  }
  // One choice per request (Json compares 1 and 1.0 equal, and a string unequal).
  if (const Json* n = r.value("n"); n != nullptr && *n != 1) {
    r.fail("n", absl::StrCat("only n = 1 is supported, got ", n->dump()));
  }
  if (const Json* bias = r.value("logit_bias")) {
    refuse_if(r, !bias->is_object() || !bias->empty(), "logit_bias", "");
  }
  // megaserve's own sampling fields, as the gRPC API has them.
  if (auto v = r.integer("top_k", 0, kInt32Max)) {
    p->set_top_k(static_cast<int32_t>(*v));
  }
  if (auto v = r.number("min_p")) p->set_min_p(static_cast<float>(*v));
  if (auto v = r.number("repetition_penalty")) p->set_repetition_penalty(static_cast<float>(*v));
  if (auto v = r.integer("min_tokens", 0, kInt32Max)) {
    p->set_min_tokens(static_cast<int32_t>(*v));
  }
  if (auto v = r.boolean("ignore_eos")) p->set_ignore_eos(*v);
  if (const Json* ids = r.value("stop_token_ids")) {
    bool ok = ids->is_array();
    for (size_t i = 0; ok && i < ids->size(); ++i) {
      const Json& id = (*ids)[i];
      ok = id.is_number_integer() && id.get<int64_t>() >= 0 && id.get<int64_t>() <= kInt32Max;
      if (ok) p->add_stop_token_ids(static_cast<int32_t>(id.get<int64_t>()));
    }
    if (!ok) r.fail("stop_token_ids", "stop_token_ids must be an array of token ids");
  }
}

void read_stream(FieldReader& r, OpenAiRequest* out) {
  out->stream = r.boolean("stream").value_or(false);
  if (const Json* options = r.value("stream_options")) {
    if (!out->stream) {
      r.fail("stream_options", "stream_options is only allowed with \"stream\": true");
    } else if (!options->is_object()) {
      r.fail("stream_options",
             absl::StrCat("stream_options must be an object, got ", type_name(*options)));
    } else {
      FieldReader o(*options);
      out->include_usage = o.boolean("include_usage").value_or(false);
      if (!o.status().ok()) {
        r.fail("stream_options.include_usage", "stream_options.include_usage must be a boolean");
      }
    }
  }
}

absl::StatusOr<Json> parse_object(std::string_view body) {
  Json json = Json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded()) {
    return openai_error(absl::StatusCode::kInvalidArgument,
                        "the request body is not valid JSON (or not UTF-8)", "");
  }
  if (!json.is_object()) {
    return openai_error(
        absl::StatusCode::kInvalidArgument,
        absl::StrCat("the request body must be a JSON object, got ", type_name(json)), "");
  }
  return json;
}

// Token ids of a prompt given as a list; false when an entry is not an int32 integer.
bool read_token_ids(const Json& list, v1::TokenIds* ids) {
  for (const Json& id : list) {
    if (!id.is_number_integer() || id.get<int64_t>() < std::numeric_limits<int32_t>::min() ||
        id.get<int64_t>() > kInt32Max ||
        (id.is_number_unsigned() && id.get<uint64_t>() > kInt32Max)) {
      return false;
    }
    ids->add_ids(static_cast<int32_t>(id.get<int64_t>()));
  }
  return true;
}

// `prompt`: a string, a list of token ids, or a list holding one of those.
void read_prompt(FieldReader& r, v1::GenerateRequest* out) {
  const Json* prompt = r.value("prompt");
  if (prompt == nullptr) {
    r.fail("prompt", "prompt is required");
    return;
  }
  const Json* single = prompt;
  if (prompt->is_array() && prompt->size() == 1 &&
      ((*prompt)[0].is_string() || (*prompt)[0].is_array())) {
    single = &(*prompt)[0];
  } else if (prompt->is_array() && prompt->size() > 1 && !(*prompt)[0].is_number()) {
    r.fail("prompt", absl::StrCat("one prompt per request is supported, got ", prompt->size()));
    return;
  }
  if (single->is_string()) {
    if (single->get_ref<const std::string&>().empty()) {
      r.fail("prompt", "prompt is empty: it needs at least one token");
    }
    out->set_text(single->get<std::string>());
  } else if (single->is_array()) {
    if (single->empty()) r.fail("prompt", "prompt is empty: it needs at least one token");
    if (!read_token_ids(*single, out->mutable_token_ids())) {
      r.fail("prompt", "prompt must be a string or a list of token ids (integers)");
    }
  } else {
    r.fail("prompt", absl::StrCat("prompt must be a string or a list of token ids, got ",
                                  type_name(*single)));
  }
}

// A message's content: a string, or a list of parts of which only text parts are supported.
void read_content(FieldReader& r, const Json& message, size_t index, v1::ChatMessage* out) {
  const std::string param = absl::StrCat("messages[", index, "].content");
  const auto it = message.find("content");
  if (it == message.end() || it->is_null()) return;  // e.g. an assistant turn with no text
  if (it->is_string()) {
    out->set_content(it->get<std::string>());
    return;
  }
  if (!it->is_array()) {
    r.fail(param,
           absl::StrCat(param, " must be a string or a list of parts, got ", type_name(*it)));
    return;
  }
  std::string text;
  for (const Json& part : *it) {
    const auto type = part.is_object() ? part.find("type") : part.end();
    const auto part_text = part.is_object() ? part.find("text") : part.end();
    if (type == part.end() || *type != "text" || part_text == part.end() ||
        !part_text->is_string()) {
      r.fail(param, absl::StrCat(param,
                                 ": only parts {\"type\": \"text\", \"text\": ...} are "
                                 "supported"));
      return;
    }
    text += part_text->get<std::string>();
  }
  out->set_content(std::move(text));
}

void read_messages(FieldReader& r, v1::ChatRequest* out) {
  const Json* messages = r.value("messages");
  if (messages == nullptr || !messages->is_array() || messages->empty()) {
    r.fail("messages", "messages must be a non-empty list of {\"role\", \"content\"}");
    return;
  }
  for (size_t i = 0; i < messages->size(); ++i) {
    const Json& m = (*messages)[i];
    const auto role = m.is_object() ? m.find("role") : m.end();
    if (role == m.end() || !role->is_string()) {
      r.fail(absl::StrCat("messages[", i, "].role"),
             absl::StrCat("messages[", i, "] must be an object with a string \"role\""));
      return;
    }
    v1::ChatMessage* message = out->add_messages();
    message->set_role(role->get<std::string>());
    read_content(r, m, i, message);
  }
}

// The length of the valid UTF-8 sequence at the start of `s`, or 0 when it starts with a
// byte that begins none (overlong forms and surrogates count as invalid, as in JSON).
size_t utf8_sequence_length(std::string_view s) {
  const auto byte = [&s](size_t i) { return static_cast<unsigned char>(s[i]); };
  const unsigned char b0 = byte(0);
  if (b0 < 0x80) return 1;
  size_t n = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // the allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    n = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    n = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    n = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (s.size() < n || byte(1) < lo || byte(1) > hi) return 0;
  for (size_t i = 2; i < n; ++i) {
    if (byte(i) < 0x80 || byte(i) > 0xBF) return 0;
  }
  return n;
}

// A token's string: its bytes with each byte outside valid UTF-8 as U+FFFD.
std::string token_string(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  while (!bytes.empty()) {
    const size_t n = utf8_sequence_length(bytes);
    out += n == 0 ? std::string_view("\xEF\xBF\xBD") : bytes.substr(0, n);
    bytes.remove_prefix(std::max<size_t>(n, 1));
  }
  return out;
}

// JSON has no infinity: a logprob of -inf (a token the sampler could never pick) is reported
// as OpenAI does, -9999.
Json logprob_json(float logprob) {
  return std::isfinite(logprob) ? static_cast<double>(logprob) : -9999.0;
}

// choices[0].logprobs of a completion: parallel lists; each position's top_logprobs is an
// object {token string: logprob} of the alternatives plus the chosen token (OpenAI: "up to
// logprobs + 1 elements"). Two alternatives with the same string keep the better one.
Json completion_logprobs_json(const LogprobsChunk* logprobs) {
  if (logprobs == nullptr) return nullptr;
  Json tokens = Json::array(), token_logprobs = Json::array(), top_logprobs = Json::array(),
       text_offset = Json::array();
  int64_t offset = logprobs->text_offset;
  for (const TokenLogprobs& token : logprobs->tokens) {
    std::string text = token_string(token.bytes);
    Json top = Json::object();
    for (const TokenAlternative& alternative : token.top) {
      top.emplace(token_string(alternative.bytes), logprob_json(alternative.logprob));
    }
    top.emplace(text, logprob_json(token.logprob));
    text_offset.push_back(offset);
    offset += openai_text_length(token.bytes);
    tokens.push_back(std::move(text));
    token_logprobs.push_back(logprob_json(token.logprob));
    top_logprobs.push_back(std::move(top));
  }
  return {{"tokens", std::move(tokens)},
          {"token_logprobs", std::move(token_logprobs)},
          {"top_logprobs", std::move(top_logprobs)},
          {"text_offset", std::move(text_offset)}};
}

Json chat_token_json(std::string_view bytes, float logprob) {
  Json byte_values = Json::array();
  for (const char c : bytes) byte_values.push_back(static_cast<unsigned char>(c));
  return {{"token", token_string(bytes)},
          {"logprob", logprob_json(logprob)},
          {"bytes", std::move(byte_values)}};
}

// choices[0].logprobs of a chat completion: {"content": [one entry per token]}.
Json chat_logprobs_json(const LogprobsChunk* logprobs) {
  if (logprobs == nullptr) return nullptr;
  Json content = Json::array();
  for (const TokenLogprobs& token : logprobs->tokens) {
    Json entry = chat_token_json(token.bytes, token.logprob);
    Json top = Json::array();
    for (const TokenAlternative& alternative : token.top) {
      top.push_back(chat_token_json(alternative.bytes, alternative.logprob));
    }
    entry["top_logprobs"] = std::move(top);
    content.push_back(std::move(entry));
  }
  return {{"content", std::move(content)}};
}

Json usage_json(const UsageCounts& usage) {
  return {{"prompt_tokens", usage.prompt_tokens},
          {"completion_tokens", usage.completion_tokens},
          {"total_tokens", usage.prompt_tokens + usage.completion_tokens},
          {"prompt_tokens_details", {{"cached_tokens", usage.cached_prompt_tokens}}}};
}

Json response_json(const ResponseHeader& header, const char* object) {
  return {
      {"id", header.id}, {"object", object}, {"created", header.created}, {"model", header.model}};
}

Json optional_string(std::optional<std::string_view> s) {
  return s ? Json(std::string(*s)) : Json(nullptr);
}

const char* error_type(int http_status) {
  switch (http_status) {
    case 400:
    case 404:
      return "invalid_request_error";
    case 429:
      return "rate_limit_error";
    case 503:
      return "service_unavailable_error";
    default:
      return "internal_server_error";
  }
}

Json error_json(const absl::Status& status) {
  const auto code = status.GetPayload(kCodePayload);  // an absl::optional
  const std::optional<std::string> param = openai_error_param(status);
  return {{"error",
           {{"message", std::string(status.message())},
            {"type", error_type(openai_http_status(status))},
            {"param", param ? Json(*param) : Json(nullptr)},
            {"code", code ? Json(std::string(*code)) : Json(nullptr)}}}};
}

Json model_json(std::string_view model, int64_t created, int max_model_len) {
  return {{"id", std::string(model)},
          {"object", "model"},
          {"created", created},
          {"owned_by", "megaserve"},
          {"max_model_len", max_model_len}};
}

}  // namespace

absl::StatusOr<OpenAiRequest> parse_completion_request(std::string_view body) {
  auto json = parse_object(body);
  if (!json.ok()) return json.status();
  FieldReader r(*json);
  OpenAiRequest out;
  out.model = r.string("model").value_or("");
  read_prompt(r, &out.generate);
  read_sampling(r, out.generate.mutable_params());
  read_stream(r, &out);
  out.echo = r.boolean("echo").value_or(false);
  // OpenAI's limit for completions is 5 alternatives (chat's is 20).
  if (auto v = r.integer("logprobs", 0, 5)) {
    out.generate.mutable_params()->set_logprobs(static_cast<int32_t>(*v));
    if (out.echo) {
      r.fail("logprobs",
             "logprobs with echo is not supported: the engine does not compute the prompt's "
             "logprobs");
    }
  }
  if (const Json* best_of = r.value("best_of"); best_of != nullptr && *best_of != 1) {
    r.fail("best_of", absl::StrCat("only best_of = 1 is supported, got ", best_of->dump()));
  }
  if (auto suffix = r.string("suffix")) refuse_if(r, !suffix->empty(), "suffix", "");
  if (!r.status().ok()) return r.status();
  return out;
}

absl::StatusOr<OpenAiRequest> parse_chat_request(std::string_view body) {
  auto json = parse_object(body);
  if (!json.ok()) return json.status();
  FieldReader r(*json);
  OpenAiRequest out;
  out.model = r.string("model").value_or("");
  read_messages(r, &out.chat);
  v1::SamplingParameters* params = out.chat.mutable_params();
  read_sampling(r, params);
  // The newer name of max_tokens for chat.
  if (auto v = r.integer("max_completion_tokens", 1, kInt32Max)) {
    params->set_max_tokens(static_cast<int32_t>(*v));
  }
  read_stream(r, &out);
  const bool logprobs = r.boolean("logprobs").value_or(false);
  if (auto top = r.integer("top_logprobs", 0, kMaxLogprobs)) {
    if (!logprobs) r.fail("top_logprobs", "top_logprobs requires \"logprobs\": true");
    params->set_logprobs(static_cast<int32_t>(*top));
  } else if (logprobs) {
    params->set_logprobs(0);  // the chosen tokens' logprobs, no alternatives
  }
  if (const Json* tools = r.value("tools")) {
    refuse_if(r, !tools->is_array() || !tools->empty(), "tools", " (no tool calling)");
  }
  if (const Json* functions = r.value("functions")) {
    refuse_if(r, !functions->is_array() || !functions->empty(), "functions",
              " (no function calling)");
  }
  if (const Json* format = r.value("response_format")) {
    const auto type = format->is_object() ? format->find("type") : format->end();
    const bool text = type != format->end() && *type == "text";
    refuse_if(r, !text, "response_format", " beyond {\"type\": \"text\"}");
  }
  if (!r.status().ok()) return r.status();
  return out;
}

absl::Status openai_error(absl::StatusCode code, absl::string_view message, absl::string_view param,
                          absl::string_view error_code) {
  absl::Status status(code, message);
  if (!param.empty()) status.SetPayload(kParamPayload, absl::Cord(param));
  if (!error_code.empty()) status.SetPayload(kCodePayload, absl::Cord(error_code));
  return status;
}

std::optional<std::string> openai_error_param(const absl::Status& status) {
  const auto param = status.GetPayload(kParamPayload);  // an absl::optional
  if (!param) return std::nullopt;
  return std::string(*param);
}

absl::Status with_openai_param(const absl::Status& status) {
  if (status.ok() || openai_error_param(status)) return status;
  std::string message(status.message());
  for (absl::string_view grpc_name : {"text", "token_ids"}) {
    if (absl::StartsWith(message, grpc_name) && message.size() > grpc_name.size() &&
        (message[grpc_name.size()] == ' ' || message[grpc_name.size()] == '[')) {
      message = absl::StrCat("prompt", message.substr(grpc_name.size()));
      break;
    }
  }
  constexpr std::string_view kFields[] = {"prompt",
                                          "max_tokens",
                                          "min_tokens",
                                          "temperature",
                                          "top_p",
                                          "top_k",
                                          "min_p",
                                          "repetition_penalty",
                                          "frequency_penalty",
                                          "presence_penalty",
                                          "stop",
                                          "stop_token_ids",
                                          "messages",
                                          "seed"};
  const std::string_view first = std::string_view(message).substr(0, message.find_first_of(" [:"));
  const bool known = std::find(std::begin(kFields), std::end(kFields), first) != std::end(kFields);
  // "prompt has N tokens and max_tokens is M: ... exceed the model's context": the field to
  // change is max_tokens.
  if (first == "prompt" && absl::StrContains(message, " and max_tokens is ")) {
    return openai_error(status.code(), message, "max_tokens");
  }
  return openai_error(status.code(), message, known ? std::string(first) : "");
}

int openai_http_status(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange:
      return 400;
    case absl::StatusCode::kNotFound:
      return 404;
    case absl::StatusCode::kResourceExhausted:
      return 429;
    case absl::StatusCode::kUnavailable:
      return 503;
    default:
      return 500;
  }
}

std::string openai_error_body(const absl::Status& status) { return dump(error_json(status)); }

std::string new_response_id(std::string_view prefix) {
  thread_local std::mt19937_64 random(std::random_device{}());
  return absl::StrFormat("%s%016x%08x", std::string(prefix), random(),
                         static_cast<uint32_t>(random()));
}

int64_t openai_text_length(std::string_view bytes) {
  int64_t length = 0;
  while (!bytes.empty()) {
    bytes.remove_prefix(std::max<size_t>(utf8_sequence_length(bytes), 1));
    ++length;
  }
  return length;
}

std::string completion_response(const ResponseHeader& header, std::string_view text,
                                std::string_view finish_reason, const UsageCounts& usage,
                                const LogprobsChunk* logprobs) {
  Json json = response_json(header, "text_completion");
  json["choices"] = Json::array({{{"index", 0},
                                  {"text", std::string(text)},
                                  {"logprobs", completion_logprobs_json(logprobs)},
                                  {"finish_reason", std::string(finish_reason)}}});
  json["usage"] = usage_json(usage);
  return dump(json);
}

std::string chat_response(const ResponseHeader& header, std::string_view content,
                          std::string_view finish_reason, const UsageCounts& usage,
                          const LogprobsChunk* logprobs) {
  Json json = response_json(header, "chat.completion");
  json["choices"] =
      Json::array({{{"index", 0},
                    {"message", {{"role", "assistant"}, {"content", std::string(content)}}},
                    {"logprobs", chat_logprobs_json(logprobs)},
                    {"finish_reason", std::string(finish_reason)}}});
  json["usage"] = usage_json(usage);
  return dump(json);
}

std::string completion_chunk(const ResponseHeader& header, std::string_view text,
                             std::optional<std::string_view> finish_reason, bool include_usage,
                             const LogprobsChunk* logprobs) {
  Json json = response_json(header, "text_completion");
  json["choices"] = Json::array({{{"index", 0},
                                  {"text", std::string(text)},
                                  {"logprobs", completion_logprobs_json(logprobs)},
                                  {"finish_reason", optional_string(finish_reason)}}});
  if (include_usage) json["usage"] = nullptr;
  return sse(json);
}

std::string chat_chunk(const ResponseHeader& header, bool with_role,
                       std::optional<std::string_view> content,
                       std::optional<std::string_view> finish_reason, bool include_usage,
                       const LogprobsChunk* logprobs) {
  Json delta = Json::object();
  if (with_role) delta["role"] = "assistant";
  if (content) delta["content"] = std::string(*content);
  Json json = response_json(header, "chat.completion.chunk");
  json["choices"] = Json::array({{{"index", 0},
                                  {"delta", std::move(delta)},
                                  {"logprobs", chat_logprobs_json(logprobs)},
                                  {"finish_reason", optional_string(finish_reason)}}});
  if (include_usage) json["usage"] = nullptr;
  return sse(json);
}

std::string usage_chunk(const ResponseHeader& header, bool chat, const UsageCounts& usage) {
  Json json = response_json(header, chat ? "chat.completion.chunk" : "text_completion");
  json["choices"] = Json::array();
  json["usage"] = usage_json(usage);
  return sse(json);
}

std::string error_event(const absl::Status& status) { return sse(error_json(status)); }

std::string model_list(std::string_view model, int64_t created, int max_model_len) {
  return dump(
      {{"object", "list"}, {"data", Json::array({model_json(model, created, max_model_len)})}});
}

std::string model_object(std::string_view model, int64_t created, int max_model_len) {
  return dump(model_json(model, created, max_model_len));
}

}  // namespace megaserve::server
