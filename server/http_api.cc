// How a generation's response goes out: validation and admission happen in the handler, so
// that their errors get their HTTP status. Once admitted, the status is 200 and the body is
// written by a chunked content provider that httplib calls on the connection's worker until
// the body is done: each call waits (at most kPollInterval) for the engine's output, writes
// what came, and checks that the client is still there. A client gone (or a write failing)
// ends the response early, and with it the BlockingGeneration, which aborts the request.
//
// A whole (non-streamed) response is sent the same way, so that its client's disconnect is
// seen too; its single JSON body goes out at the end. A request the engine fails or aborts
// (the drain's grace period over) after the 200 went out: a stream gets an error event; a
// whole response is cut off without its last chunk, which clients report as a broken
// connection (and may retry), never as a success.
//
// Logprobs in a stream [logprobs alignment]: a chunk carries the logprobs of the tokens whose
// text it completes. Output text lags the tokens (a UTF-8 character split over tokens, text
// that could begin a stop string), so a token's logprobs wait until the text delivered so far
// covers the token strings up to and including it (counted in bytes). Tokens whose text is
// never delivered (the token that stopped generation, those cut with a stop string, or text
// the detokenizer renders otherwise) go out with the finish reason's chunk, so that a stream
// carries every generated token's logprobs once, in order, as the gRPC Generate stream does.
#include "server/http_api.h"

#include <chrono>
#include <cstdint>
#include <ctime>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "engine/model/tokenizer.h"
#include "httplib.h"
#include "server/blocking_generation.h"
#include "server/openai_json.h"
#include "spdlog/spdlog.h"

namespace megaserve::server {
namespace {

constexpr auto kPollInterval = std::chrono::milliseconds(50);
// Larger bodies get 413. A prompt that fits the longest context is far smaller.
constexpr size_t kMaxBodyBytes = size_t{64} << 20;

void send_error(httplib::Response& res, const absl::Status& status) {
  res.status = openai_http_status(status);
  res.set_content(openai_error_body(status), "application/json");
}

// One admitted generation's response; httplib's copies of the content provider share it, and
// it goes (aborting an unfinished generation) with the response.
struct ResponseState {
  std::unique_ptr<BlockingGeneration> generation;
  ResponseHeader header;
  bool chat = false;
  bool stream = false;
  bool include_usage = false;
  std::string echo;  // the prompt's text, sent before the completion (completions' echo)
  bool started = false;
  std::string text;  // a whole response's text so far
  // Logprobs (when asked for): the tokens not yet sent (a whole response: all of them), the
  // bytes of generated text and of sent tokens' strings so far, and the next token's
  // text_offset (completions). See [logprobs alignment].
  const engine::Tokenizer* tokenizer = nullptr;
  bool logprobs = false;
  std::vector<TokenLogprobs> unsent_logprobs;
  size_t text_bytes = 0;
  size_t sent_token_bytes = 0;
  int64_t text_offset = 0;
};

// A token's text as OpenAI's token strings show it: the detokenized bytes of the token alone
// (sentencepiece's "▁" a space, a byte-fallback piece its byte, a byte-level token its bytes),
// and for a control token (BOS, EOS, "<|im_end|>"), which decodes to nothing, its piece.
std::string token_bytes(const engine::Tokenizer& tokenizer, int32_t id) {
  if (tokenizer.byte_level()) {
    const std::string_view bytes = tokenizer.token_bytes(id);
    return bytes.empty() ? tokenizer.piece(id) : std::string(bytes);
  }
  if (const int byte = tokenizer.byte_value(id); byte >= 0) {
    return std::string(1, static_cast<char>(byte));
  }
  std::string piece = tokenizer.piece(id);
  const bool maybe_control = piece.size() > 2 && piece.front() == '<' && piece.back() == '>';
  if (maybe_control && tokenizer.decode({id}).value_or("").empty()) return piece;
  return absl::StrReplaceAll(piece, {{"\xE2\x96\x81", " "}});  // U+2581, sentencepiece's space
}

void add_logprobs(ResponseState& s, const StreamDelta& delta) {
  if (!s.logprobs) return;
  for (const scheduler::SampledToken& sampled : delta.logprobs) {
    TokenLogprobs token;
    token.bytes = token_bytes(*s.tokenizer, sampled.token_id);
    token.logprob = sampled.logprob;
    for (const auto& [id, logprob] : sampled.top_logprobs) {
      token.top.push_back({token_bytes(*s.tokenizer, id), logprob});
    }
    s.unsent_logprobs.push_back(std::move(token));
  }
  s.text_bytes += delta.text.size();
}

// The unsent tokens whose text has been delivered, or with `all` every unsent one, as the
// logprobs of the next chunk (null when not asked for). Advances text_offset past them.
std::optional<LogprobsChunk> take_logprobs(ResponseState& s, bool all) {
  if (!s.logprobs) return std::nullopt;
  LogprobsChunk chunk;
  chunk.text_offset = s.text_offset;
  size_t n = 0;
  while (n < s.unsent_logprobs.size() &&
         (all || s.sent_token_bytes + s.unsent_logprobs[n].bytes.size() <= s.text_bytes)) {
    s.sent_token_bytes += s.unsent_logprobs[n].bytes.size();
    s.text_offset += openai_text_length(s.unsent_logprobs[n].bytes);
    ++n;
  }
  chunk.tokens.assign(std::make_move_iterator(s.unsent_logprobs.begin()),
                      std::make_move_iterator(s.unsent_logprobs.begin() + n));
  s.unsent_logprobs.erase(s.unsent_logprobs.begin(), s.unsent_logprobs.begin() + n);
  return chunk;
}

const LogprobsChunk* or_null(const std::optional<LogprobsChunk>& logprobs) {
  return logprobs ? &*logprobs : nullptr;
}

UsageCounts usage_of(const BlockingGeneration& generation) {
  UsageCounts usage;
  usage.prompt_tokens = static_cast<int>(generation.prompt_token_ids().size());
  usage.completion_tokens = generation.completion_tokens();
  usage.cached_prompt_tokens = generation.cached_prompt_tokens();
  return usage;
}

bool ended_normally(const StreamDelta& delta) {
  return *delta.finished == engine::FinishReason::kStop ||
         *delta.finished == engine::FinishReason::kLength;
}

absl::Status ended_early(const StreamDelta& delta) {
  if (*delta.finished == engine::FinishReason::kError) {
    return absl::InternalError(absl::StrCat("generation failed: ", delta.error));
  }
  return absl::UnavailableError("the request was aborted: the server is shutting down");
}

bool write(httplib::DataSink& sink, const std::string& data) {
  // An empty write would tell httplib the body is over.
  return data.empty() || sink.write(data.data(), data.size());
}

// One call of a streamed response's content provider.
bool stream_step(ResponseState& s, httplib::DataSink& sink) {
  const ResponseHeader& h = s.header;
  if (!s.started) {
    s.started = true;
    const std::string first =
        s.chat           ? chat_chunk(h, /*with_role=*/true, "", std::nullopt, s.include_usage)
        : s.echo.empty() ? ""
                         : completion_chunk(h, s.echo, std::nullopt, s.include_usage);
    if (!write(sink, first)) return false;
  }
  const StreamDelta delta = s.generation->next(kPollInterval);
  if (!sink.is_writable()) return false;  // the client went away
  add_logprobs(s, delta);
  std::string out;
  if (!delta.text.empty()) {
    const std::optional<LogprobsChunk> logprobs = take_logprobs(s, /*all=*/false);
    out = s.chat
              ? chat_chunk(h, false, delta.text, std::nullopt, s.include_usage, or_null(logprobs))
              : completion_chunk(h, delta.text, std::nullopt, s.include_usage, or_null(logprobs));
  }
  if (delta.finished) {
    if (ended_normally(delta)) {
      const std::string_view reason = engine::finish_reason_name(*delta.finished);
      std::optional<LogprobsChunk> rest = take_logprobs(s, /*all=*/true);
      if (rest && rest->tokens.empty()) rest.reset();
      out += s.chat ? chat_chunk(h, false, std::nullopt, reason, s.include_usage, or_null(rest))
                    : completion_chunk(h, "", reason, s.include_usage, or_null(rest));
      if (s.include_usage) out += usage_chunk(h, s.chat, usage_of(*s.generation));
    } else {
      out += error_event(ended_early(delta));
    }
    out += kDoneEvent;
  }
  if (!write(sink, out)) return false;
  if (delta.finished) sink.done();
  return true;
}

// One call of a whole response's content provider.
bool whole_step(ResponseState& s, httplib::DataSink& sink) {
  const StreamDelta delta = s.generation->next(kPollInterval);
  if (!sink.is_writable()) return false;  // the client went away
  s.text += delta.text;
  add_logprobs(s, delta);
  if (!delta.finished) return true;
  if (!ended_normally(delta)) {
    spdlog::warn("HTTP {} cut off after its 200: {}", s.header.id, ended_early(delta).ToString());
    return false;
  }
  const std::string_view reason = engine::finish_reason_name(*delta.finished);
  const UsageCounts usage = usage_of(*s.generation);
  const std::optional<LogprobsChunk> logprobs = take_logprobs(s, /*all=*/true);
  const std::string body =
      s.chat ? chat_response(s.header, s.text, reason, usage, or_null(logprobs))
             : completion_response(s.header, s.echo + s.text, reason, usage, or_null(logprobs));
  if (!write(sink, body)) return false;
  sink.done();
  return true;
}

class HttpApi {
 public:
  explicit HttpApi(ServingContext* context) : context_(context), started_(std::time(nullptr)) {}

  void models(httplib::Response& res) const {
    res.set_content(model_list(name(), started_, context_->model_info.max_model_len()),
                    "application/json");
  }

  void model(const std::string& id, httplib::Response& res) const {
    if (id != name()) {
      send_error(res, unknown_model(id));
      return;
    }
    res.set_content(model_object(name(), started_, context_->model_info.max_model_len()),
                    "application/json");
  }

  void generate(const httplib::Request& req, httplib::Response& res, bool chat) const {
    auto state = std::make_shared<ResponseState>();
    state->chat = chat;
    auto generate = admit(req.body, state.get());
    if (!generate.ok()) {
      record_rejected_request(context_, generate.status());
      send_error(res, generate.status());
      return;
    }
    auto generation = BlockingGeneration::start(context_, *generate, /*fill_context=*/chat);
    if (!generation.ok()) {
      send_error(res, with_openai_param(generation.status()));
      return;
    }
    state->generation = *std::move(generation);
    state->header.id = new_response_id(chat ? "chatcmpl-" : "cmpl-");
    state->header.created = std::time(nullptr);
    state->header.model = name();
    if (state->stream) res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(state->stream ? "text/event-stream" : "application/json",
                                     [state](size_t /*offset*/, httplib::DataSink& sink) {
                                       return state->stream ? stream_step(*state, sink)
                                                            : whole_step(*state, sink);
                                     });
  }

 private:
  const std::string& name() const { return context_->model_info.name(); }

  absl::Status unknown_model(const std::string& id) const {
    return openai_error(absl::StatusCode::kNotFound,
                        absl::StrCat("model \"", id, "\" does not exist; this server serves \"",
                                     name(), "\" (GET /v1/models)"),
                        "model", "model_not_found");
  }

  // Parses the body into the gRPC request it runs as (a chat's rendered through the model's
  // chat template), filling the response options of `state`.
  absl::StatusOr<v1::GenerateRequest> admit(const std::string& body, ResponseState* state) const {
    auto request = state->chat ? parse_chat_request(body) : parse_completion_request(body);
    if (!request.ok()) return request.status();
    if (!request->model.empty() && request->model != name()) return unknown_model(request->model);
    state->stream = request->stream;
    state->include_usage = request->include_usage;
    state->tokenizer = context_->tokenizer;
    if (!state->chat) {
      state->logprobs = request->generate.params().has_logprobs();
      if (request->echo) state->echo = prompt_text(request->generate);
      state->text_offset = openai_text_length(state->echo);
      return std::move(request->generate);
    }
    state->logprobs = request->chat.params().has_logprobs();
    if (context_->chat_template == nullptr) {
      return openai_error(
          absl::StatusCode::kInvalidArgument,
          absl::StrCat("model ", name(),
                       " has no chat template (GGUF tokenizer.chat_template or "
                       "tokenizer_config.json chat_template); use /v1/completions with a prompt"),
          "messages", "no_chat_template");
    }
    auto rendered = chat_to_generate_request(*context_, request->chat);
    if (!rendered.ok()) {
      return openai_error(rendered.status().code(), std::string(rendered.status().message()),
                          "messages");
    }
    return rendered;
  }

  std::string prompt_text(const v1::GenerateRequest& request) const {
    if (request.has_text()) return request.text();
    const std::vector<int32_t> ids(request.token_ids().ids().begin(),
                                   request.token_ids().ids().end());
    return context_->tokenizer->decode(ids).value_or("");
  }

  ServingContext* const context_;
  const int64_t started_;  // "created" of the model object
};

}  // namespace

absl::StatusOr<std::unique_ptr<HttpApiServer>> HttpApiServer::start(const std::string& address,
                                                                    ServingContext* context) {
  auto http = std::make_unique<httplib::Server>();
  auto api = std::make_shared<const HttpApi>(context);
  http->Post("/v1/completions", [api](const httplib::Request& req, httplib::Response& res) {
    api->generate(req, res, /*chat=*/false);
  });
  http->Post("/v1/chat/completions", [api](const httplib::Request& req, httplib::Response& res) {
    api->generate(req, res, /*chat=*/true);
  });
  http->Get("/v1/models",
            [api](const httplib::Request&, httplib::Response& res) { api->models(res); });
  http->Get("/v1/models/(.+)", [api](const httplib::Request& req, httplib::Response& res) {
    api->model(req.matches[1], res);
  });
  // Routes that do not exist (404), bodies too large (413) and requests httplib could not
  // parse (400) get OpenAI's error body too.
  http->set_error_handler(
      httplib::Server::HandlerWithResponse([](const httplib::Request& req, httplib::Response& res) {
        if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
        const absl::Status status =
            res.status == 404   ? absl::NotFoundError(absl::StrCat("no route ", req.method, " ",
                                                                   req.path, " (see /v1/models)"))
            : res.status == 413 ? absl::InvalidArgumentError(
                                      absl::StrCat("request body over ", kMaxBodyBytes, " bytes"))
            : res.status < 500 ? absl::InvalidArgumentError(absl::StrCat("HTTP ", res.status))
                               : absl::InternalError(absl::StrCat("HTTP ", res.status));
        const int http_status = res.status;
        send_error(res, status);
        res.status = http_status;  // 405 or 413 stay what they are
        return httplib::Server::HandlerResponse::Handled;
      }));
  http->set_exception_handler(
      [](const httplib::Request& req, httplib::Response& res, std::exception_ptr error) {
        std::string what = "unknown exception";
        try {
          std::rethrow_exception(error);
        } catch (const std::exception& e) {
          what = e.what();
        } catch (...) {
        }
        spdlog::error("HTTP {} {}: {}", req.method, req.path, what);
        send_error(res, absl::InternalError(absl::StrCat("internal error: ", what)));
      });
  http->set_payload_max_length(kMaxBodyBytes);
  http->new_task_queue = [] { return new httplib::ThreadPool(kWorkers); };
  // An idle kept-alive connection holds a worker this long; a stream's client that stops
  // reading holds one for the write timeout, then counts as gone.
  http->set_keep_alive_timeout(2);
  http->set_write_timeout(10, 0);
  auto listener = HttpListener::start(std::move(http), address, "http_address");
  if (!listener.ok()) return listener.status();
  std::unique_ptr<HttpApiServer> server(new HttpApiServer());
  server->listener_ = *std::move(listener);
  return server;
}

}  // namespace megaserve::server
