// The OpenAI-compatible API's JSON without sockets: request bodies into the gRPC request
// messages (every accepted form, every refusal naming its field), error bodies and their
// HTTP statuses, and the responses and stream chunks as OpenAI's clients read them.
#include "server/openai_json.h"

#include <limits>
#include <string>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace megaserve::server {
namespace {

using Json = nlohmann::json;

// The error's param, or "" when it has none.
std::string param_of(const absl::Status& status) { return openai_error_param(status).value_or(""); }

// Parses a completion request that must be refused, and returns its param.
std::string refused_completion(const std::string& body) {
  auto request = parse_completion_request(body);
  EXPECT_FALSE(request.ok()) << body;
  if (request.ok()) return "";
  EXPECT_EQ(request.status().code(), absl::StatusCode::kInvalidArgument) << body;
  return param_of(request.status());
}

std::string refused_chat(const std::string& body) {
  auto request = parse_chat_request(body);
  EXPECT_FALSE(request.ok()) << body;
  if (request.ok()) return "";
  EXPECT_EQ(request.status().code(), absl::StatusCode::kInvalidArgument) << body;
  return param_of(request.status());
}

// The JSON of one server-sent event "data: {json}\n\n".
Json event_json(const std::string& event) {
  EXPECT_EQ(event.rfind("data: ", 0), 0u) << event;
  EXPECT_EQ(event.substr(event.size() - 2), "\n\n") << event;
  return Json::parse(event.substr(6, event.size() - 8));
}

TEST(OpenAiJsonTest, CompletionPromptForms) {
  auto text = parse_completion_request(R"({"model": "m", "prompt": "Once upon a time"})");
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(text->model, "m");
  EXPECT_EQ(text->generate.text(), "Once upon a time");
  EXPECT_FALSE(text->generate.has_add_bos());  // BOS as the gRPC default: added
  EXPECT_FALSE(text->stream);

  auto ids = parse_completion_request(R"({"prompt": [1, 403, 407]})");
  ASSERT_TRUE(ids.ok()) << ids.status();
  ASSERT_TRUE(ids->generate.has_token_ids());
  EXPECT_EQ(ids->generate.token_ids().ids_size(), 3);
  EXPECT_EQ(ids->generate.token_ids().ids(1), 403);
  EXPECT_TRUE(ids->model.empty());

  auto one_text = parse_completion_request(R"({"prompt": ["Zoo"]})");
  ASSERT_TRUE(one_text.ok()) << one_text.status();
  EXPECT_EQ(one_text->generate.text(), "Zoo");
  auto one_list = parse_completion_request(R"({"prompt": [[1, 2]]})");
  ASSERT_TRUE(one_list.ok()) << one_list.status();
  EXPECT_EQ(one_list->generate.token_ids().ids_size(), 2);
}

TEST(OpenAiJsonTest, CompletionPromptRefusals) {
  EXPECT_EQ(refused_completion(R"({"model": "m"})"), "prompt");
  EXPECT_EQ(refused_completion(R"({"prompt": ""})"), "prompt");
  EXPECT_EQ(refused_completion(R"({"prompt": []})"), "prompt");
  EXPECT_EQ(refused_completion(R"({"prompt": ["a", "b"]})"), "prompt");  // one per request
  EXPECT_EQ(refused_completion(R"({"prompt": [[1], [2]]})"), "prompt");
  EXPECT_EQ(refused_completion(R"({"prompt": [1, "x"]})"), "prompt");
  EXPECT_EQ(refused_completion(R"({"prompt": [1.5]})"), "prompt");
  EXPECT_EQ(refused_completion(R"({"prompt": [4294967296]})"), "prompt");
  EXPECT_EQ(refused_completion(R"({"prompt": 7})"), "prompt");
}

TEST(OpenAiJsonTest, SamplingFieldsMapOntoTheGrpcParameters) {
  auto r = parse_completion_request(R"({
      "prompt": "x", "max_tokens": 32, "temperature": 0, "top_p": 0.5, "seed": 7,
      "stop": ["\n", "The end"], "presence_penalty": 0.25, "frequency_penalty": -0.5,
      "n": 1, "best_of": 1, "echo": true, "user": "someone", "logit_bias": {},
      "top_k": 4, "min_p": 0.1, "repetition_penalty": 1.2, "min_tokens": 2,
      "ignore_eos": true, "stop_token_ids": [5, 6], "suffix": ""})");
  ASSERT_TRUE(r.ok()) << r.status();
  const v1::SamplingParameters& p = r->generate.params();
  EXPECT_EQ(p.max_tokens(), 32);
  ASSERT_TRUE(p.has_temperature());
  EXPECT_EQ(p.temperature(), 0.0f);
  EXPECT_EQ(p.top_p(), 0.5f);
  EXPECT_EQ(p.seed(), 7u);
  ASSERT_EQ(p.stop_size(), 2);
  EXPECT_EQ(p.stop(1), "The end");
  EXPECT_EQ(p.presence_penalty(), 0.25f);
  EXPECT_EQ(p.frequency_penalty(), -0.5f);
  EXPECT_EQ(p.top_k(), 4);
  EXPECT_EQ(p.min_p(), 0.1f);
  EXPECT_EQ(p.repetition_penalty(), 1.2f);
  EXPECT_EQ(p.min_tokens(), 2);
  EXPECT_TRUE(p.ignore_eos());
  EXPECT_EQ(p.stop_token_ids_size(), 2);
  EXPECT_TRUE(r->echo);

  auto single_stop = parse_completion_request(R"({"prompt": "x", "stop": "."})");
  ASSERT_TRUE(single_stop.ok());
  ASSERT_EQ(single_stop->generate.params().stop_size(), 1);
  EXPECT_EQ(single_stop->generate.params().stop(0), ".");
  // A negative seed keeps its bits.
  auto negative_seed = parse_completion_request(R"({"prompt": "x", "seed": -1})");
  ASSERT_TRUE(negative_seed.ok());
  EXPECT_EQ(negative_seed->generate.params().seed(), ~uint64_t{0});
}

TEST(OpenAiJsonTest, NullMeansUnset) {
  auto r = parse_completion_request(
      R"({"prompt": "x", "max_tokens": null, "temperature": null, "stop": null, "n": null,
          "stream": null, "stream_options": null, "logprobs": null, "seed": null})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(r->generate.params().has_max_tokens());
  EXPECT_FALSE(r->generate.params().has_temperature());
  EXPECT_FALSE(r->generate.params().has_seed());
  EXPECT_EQ(r->generate.params().stop_size(), 0);
}

TEST(OpenAiJsonTest, UnsupportedOrMistypedFieldsAreRefusedByName) {
  EXPECT_EQ(refused_completion(R"({"prompt": "x", "n": 2})"), "n");
  EXPECT_EQ(refused_completion(R"({"prompt": "x", "n": "1"})"), "n");
  EXPECT_EQ(refused_completion(R"({"prompt": "x", "best_of": 3})"), "best_of");
  EXPECT_EQ(refused_completion(R"({"prompt": "x", "logprobs": 6})"), "logprobs");
  EXPECT_EQ(refused_completion(R"({"prompt": "x", "suffix": "end"})"), "suffix");
  EXPECT_EQ(refused_completion(R"({"prompt": "x", "logit_bias": {"5": 100}})"), "logit_bias");
  EXPECT_EQ(refused_completion(R"({"prompt": "x", "temperature": "hot"})"), "temperature");
  EXPECT_EQ(refused_completion(R"({"prompt": "x", "max_tokens": 1.5})"), "max_tokens");
  EXPECT_EQ(refused_completion(R"({"prompt": "x", "max_tokens": 99999999999})"), "max_tokens");
  EXPECT_EQ(refused_completion(R"({"prompt": "x", "max_tokens": 0})"), "max_tokens");
  EXPECT_EQ(refused_completion(R"({"prompt": "x", "top_k": -1})"), "top_k");
  EXPECT_EQ(refused_completion(R"({"prompt": "x", "stop": [1]})"), "stop");
  EXPECT_EQ(refused_completion(R"({"prompt": "x", "stop": 1})"), "stop");
  EXPECT_EQ(refused_completion(R"({"prompt": "x", "seed": "7"})"), "seed");
  EXPECT_EQ(refused_completion(R"({"prompt": "x", "stream": "yes"})"), "stream");
  EXPECT_EQ(refused_completion(R"({"prompt": "x", "echo": 1})"), "echo");
  EXPECT_EQ(refused_completion(R"({"prompt": "x", "model": 5})"), "model");
  EXPECT_EQ(refused_completion(R"({"prompt": "x", "stop_token_ids": [-1]})"), "stop_token_ids");
  auto r = parse_completion_request(R"({"prompt": "x", "n": 3})");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message(), "only n = 1 is supported, got 3");
}

TEST(OpenAiJsonTest, CompletionLogprobsAreTheTopNOfTheGrpcRequest) {
  for (int n : {0, 1, 5}) {
    auto r = parse_completion_request(R"({"prompt": "x", "logprobs": )" + std::to_string(n) + "}");
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_TRUE(r->generate.params().has_logprobs());
    EXPECT_EQ(r->generate.params().logprobs(), n);
  }
  auto off = parse_completion_request(R"({"prompt": "x", "logprobs": null})");
  ASSERT_TRUE(off.ok()) << off.status();
  EXPECT_FALSE(off->generate.params().has_logprobs());
  EXPECT_EQ(refused_completion(R"({"prompt": "x", "logprobs": -1})"), "logprobs");
  EXPECT_EQ(refused_completion(R"({"prompt": "x", "logprobs": 6})"), "logprobs");
  EXPECT_EQ(refused_completion(R"({"prompt": "x", "logprobs": true})"), "logprobs");
  EXPECT_EQ(refused_completion(R"({"prompt": "x", "logprobs": 2.5})"), "logprobs");
  // The prompt's logprobs are not computed: echo with logprobs is refused, not half-answered.
  auto status = parse_completion_request(R"({"prompt": "x", "echo": true, "logprobs": 0})");
  ASSERT_FALSE(status.ok());
  EXPECT_EQ(param_of(status.status()), "logprobs");
  EXPECT_NE(status.status().message().find("echo"), std::string::npos);
  EXPECT_TRUE(parse_completion_request(R"({"prompt": "x", "echo": true, "logprobs": null})").ok());
}

TEST(OpenAiJsonTest, ChatLogprobsAndTopLogprobs) {
  const std::string user = R"({"messages": [{"role": "user", "content": "hi"}])";
  auto plain = parse_chat_request(user + R"(, "logprobs": true})");
  ASSERT_TRUE(plain.ok()) << plain.status();
  ASSERT_TRUE(plain->chat.params().has_logprobs());
  EXPECT_EQ(plain->chat.params().logprobs(), 0);
  for (int n : {0, 7, 20}) {
    auto r = parse_chat_request(user + R"(, "logprobs": true, "top_logprobs": )" +
                                std::to_string(n) + "}");
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->chat.params().logprobs(), n);
  }
  auto off = parse_chat_request(user + R"(, "logprobs": false, "top_logprobs": null})");
  ASSERT_TRUE(off.ok()) << off.status();
  EXPECT_FALSE(off->chat.params().has_logprobs());
  EXPECT_EQ(refused_chat(user + R"(, "top_logprobs": 3})"), "top_logprobs");
  EXPECT_EQ(refused_chat(user + R"(, "logprobs": false, "top_logprobs": 0})"), "top_logprobs");
  EXPECT_EQ(refused_chat(user + R"(, "logprobs": true, "top_logprobs": 21})"), "top_logprobs");
  EXPECT_EQ(refused_chat(user + R"(, "logprobs": true, "top_logprobs": -1})"), "top_logprobs");
  EXPECT_EQ(refused_chat(user + R"(, "logprobs": 1})"), "logprobs");
}

TEST(OpenAiJsonTest, StreamOptions) {
  auto r = parse_completion_request(
      R"({"prompt": "x", "stream": true, "stream_options": {"include_usage": true}})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->stream);
  EXPECT_TRUE(r->include_usage);
  auto no_usage = parse_completion_request(R"({"prompt": "x", "stream": true})");
  ASSERT_TRUE(no_usage.ok());
  EXPECT_FALSE(no_usage->include_usage);
  EXPECT_EQ(refused_completion(R"({"prompt": "x", "stream_options": {"include_usage": true}})"),
            "stream_options");
  EXPECT_EQ(refused_completion(
                R"({"prompt": "x", "stream": true, "stream_options": {"include_usage": 1}})"),
            "stream_options.include_usage");
}

TEST(OpenAiJsonTest, BodiesThatAreNotAJsonObject) {
  for (const std::string body : {"", "{", "{\"prompt\": \"x\",}", "[1, 2]", "\"text\"", "null",
                                 "{\"prompt\": \"\xff\xfe\"}"}) {
    auto r = parse_completion_request(body);
    ASSERT_FALSE(r.ok()) << body;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(param_of(r.status()), "") << body;
    EXPECT_EQ(openai_http_status(r.status()), 400);
  }
}

TEST(OpenAiJsonTest, ChatMessages) {
  auto r = parse_chat_request(R"({
      "model": "m",
      "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello, "},
                                     {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": null}],
      "max_completion_tokens": 9, "temperature": 0, "stream": true,
      "tools": [], "response_format": {"type": "text"}, "logprobs": false})");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->chat.messages_size(), 3);
  EXPECT_EQ(r->chat.messages(0).role(), "system");
  EXPECT_EQ(r->chat.messages(0).content(), "Be brief.");
  EXPECT_EQ(r->chat.messages(1).content(), "Hello, there");
  EXPECT_EQ(r->chat.messages(2).content(), "");
  EXPECT_EQ(r->chat.params().max_tokens(), 9);
  EXPECT_EQ(r->chat.params().temperature(), 0.0f);
  EXPECT_TRUE(r->stream);
  EXPECT_FALSE(r->generate.has_text());  // rendered later, by the chat template
}

TEST(OpenAiJsonTest, ChatRefusals) {
  EXPECT_EQ(refused_chat(R"({"model": "m"})"), "messages");
  EXPECT_EQ(refused_chat(R"({"messages": []})"), "messages");
  EXPECT_EQ(refused_chat(R"({"messages": "hi"})"), "messages");
  EXPECT_EQ(refused_chat(R"({"messages": [{"content": "hi"}]})"), "messages[0].role");
  EXPECT_EQ(refused_chat(R"({"messages": [{"role": "user", "content": 5}]})"),
            "messages[0].content");
  EXPECT_EQ(refused_chat(R"({"messages": [{"role": "user", "content": "a"},
                                          {"role": "user", "content": [{"type": "image_url",
                                           "image_url": {"url": "x"}}]}]})"),
            "messages[1].content");
  const std::string user = R"("messages": [{"role": "user", "content": "hi"}])";
  EXPECT_EQ(refused_chat("{" + user + R"(, "n": 2})"), "n");
  EXPECT_EQ(refused_chat("{" + user + R"(, "tools": [{"type": "function"}]})"), "tools");
  EXPECT_EQ(refused_chat("{" + user + R"(, "response_format": {"type": "json_object"}})"),
            "response_format");
}

TEST(OpenAiJsonTest, ErrorBodiesAndStatuses) {
  const absl::Status bad = openai_error(absl::StatusCode::kInvalidArgument, "n must be 1", "n");
  EXPECT_EQ(openai_http_status(bad), 400);
  const Json body = Json::parse(openai_error_body(bad));
  EXPECT_EQ(body["error"]["message"], "n must be 1");
  EXPECT_EQ(body["error"]["type"], "invalid_request_error");
  EXPECT_EQ(body["error"]["param"], "n");
  EXPECT_TRUE(body["error"]["code"].is_null());

  const absl::Status unknown =
      openai_error(absl::StatusCode::kNotFound, "no such model", "model", "model_not_found");
  EXPECT_EQ(openai_http_status(unknown), 404);
  EXPECT_EQ(Json::parse(openai_error_body(unknown))["error"]["code"], "model_not_found");

  EXPECT_EQ(openai_http_status(absl::FailedPreconditionError("x")), 400);
  EXPECT_EQ(openai_http_status(absl::ResourceExhaustedError("queue full")), 429);
  EXPECT_EQ(openai_http_status(absl::UnavailableError("draining")), 503);
  EXPECT_EQ(openai_http_status(absl::InternalError("step failed")), 500);
  const Json internal = Json::parse(openai_error_body(absl::InternalError("step failed")));
  EXPECT_TRUE(internal["error"]["param"].is_null());
  EXPECT_EQ(internal["error"]["type"], "internal_server_error");
  EXPECT_EQ(Json::parse(openai_error_body(absl::UnavailableError("d")))["error"]["type"],
            "service_unavailable_error");

  const Json event = event_json(error_event(absl::InternalError("step failed")));
  EXPECT_EQ(event["error"]["message"], "step failed");
}

TEST(OpenAiJsonTest, SharedValidationErrorsSpeakOfThePrompt) {
  const absl::Status empty =
      with_openai_param(absl::InvalidArgumentError("text is empty: the prompt needs a token"));
  EXPECT_EQ(empty.message(), "prompt is empty: the prompt needs a token");
  EXPECT_EQ(param_of(empty), "prompt");
  const absl::Status vocab = with_openai_param(
      absl::InvalidArgumentError("token_ids[2] = 600 is outside the vocabulary [0, 512)"));
  EXPECT_EQ(vocab.message(), "prompt[2] = 600 is outside the vocabulary [0, 512)");
  EXPECT_EQ(param_of(vocab), "prompt");
  EXPECT_EQ(param_of(with_openai_param(absl::InvalidArgumentError("temperature must be >= 0"))),
            "temperature");
  EXPECT_EQ(param_of(with_openai_param(absl::InvalidArgumentError("stop[0] is an empty string"))),
            "stop");
  EXPECT_EQ(param_of(with_openai_param(absl::InvalidArgumentError(
                "prompt has 5 tokens and max_tokens is 2000: 2005 tokens exceed the model's "
                "context of 512 tokens"))),
            "max_tokens");
  EXPECT_EQ(param_of(with_openai_param(absl::InvalidArgumentError(
                "prompt has 600 tokens; the model's context is 512 tokens"))),
            "prompt");
  EXPECT_EQ(param_of(with_openai_param(absl::ResourceExhaustedError("the queue is full"))), "");
  // A param already set stays.
  EXPECT_EQ(param_of(with_openai_param(
                openai_error(absl::StatusCode::kInvalidArgument, "text is bad", "messages"))),
            "messages");
}

const ResponseHeader kHeader{"cmpl-abc", 1700000000, "stories260K-hf"};

TEST(OpenAiJsonTest, WholeResponses) {
  const UsageCounts usage{5, 7, 3};
  const Json completion = Json::parse(completion_response(kHeader, " there was", "length", usage));
  EXPECT_EQ(completion["id"], "cmpl-abc");
  EXPECT_EQ(completion["object"], "text_completion");
  EXPECT_EQ(completion["created"], 1700000000);
  EXPECT_EQ(completion["model"], "stories260K-hf");
  ASSERT_EQ(completion["choices"].size(), 1u);
  EXPECT_EQ(completion["choices"][0]["index"], 0);
  EXPECT_EQ(completion["choices"][0]["text"], " there was");
  EXPECT_EQ(completion["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(completion["usage"]["prompt_tokens"], 5);
  EXPECT_EQ(completion["usage"]["completion_tokens"], 7);
  EXPECT_EQ(completion["usage"]["total_tokens"], 12);
  EXPECT_EQ(completion["usage"]["prompt_tokens_details"]["cached_tokens"], 3);

  const Json chat = Json::parse(chat_response(kHeader, "Hi!", "stop", usage));
  EXPECT_EQ(chat["object"], "chat.completion");
  EXPECT_EQ(chat["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(chat["choices"][0]["message"]["content"], "Hi!");
  EXPECT_EQ(chat["choices"][0]["finish_reason"], "stop");
}

TEST(OpenAiJsonTest, StreamChunks) {
  const Json text = event_json(completion_chunk(kHeader, " once", std::nullopt, false));
  EXPECT_EQ(text["object"], "text_completion");
  EXPECT_EQ(text["choices"][0]["text"], " once");
  EXPECT_TRUE(text["choices"][0]["finish_reason"].is_null());
  EXPECT_FALSE(text.contains("usage"));

  const Json last = event_json(completion_chunk(kHeader, "", "stop", true));
  EXPECT_EQ(last["choices"][0]["finish_reason"], "stop");
  EXPECT_TRUE(last.contains("usage") && last["usage"].is_null());

  const Json usage = event_json(usage_chunk(kHeader, false, UsageCounts{4, 2, 0}));
  EXPECT_TRUE(usage["choices"].empty());
  EXPECT_EQ(usage["usage"]["total_tokens"], 6);

  const Json role = event_json(chat_chunk(kHeader, true, "", std::nullopt, false));
  EXPECT_EQ(role["object"], "chat.completion.chunk");
  EXPECT_EQ(role["choices"][0]["delta"]["role"], "assistant");
  const Json content = event_json(chat_chunk(kHeader, false, "Hel", std::nullopt, false));
  EXPECT_FALSE(content["choices"][0]["delta"].contains("role"));
  EXPECT_EQ(content["choices"][0]["delta"]["content"], "Hel");
  const Json end = event_json(chat_chunk(kHeader, false, std::nullopt, "length", false));
  EXPECT_TRUE(end["choices"][0]["delta"].empty());
  EXPECT_EQ(end["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(event_json(usage_chunk(kHeader, true, UsageCounts{}))["object"],
            "chat.completion.chunk");
  EXPECT_EQ(kDoneEvent, "data: [DONE]\n\n");
}

TEST(OpenAiJsonTest, TextThatIsNotUtf8BecomesReplacementCharacters) {
  const Json chunk = event_json(completion_chunk(kHeader, "a\xe2\x82", std::nullopt, false));
  EXPECT_EQ(chunk["choices"][0]["text"], "a\xef\xbf\xbd");
}

// Tokens " the" (best), " a" and "\xe2\x82" (the start of "€", cut by a byte-level token).
LogprobsChunk sample_logprobs(int64_t text_offset) {
  LogprobsChunk chunk;
  chunk.text_offset = text_offset;
  chunk.tokens.push_back({" the", -0.25f, {{" the", -0.25f}, {" a", -1.5f}}});
  chunk.tokens.push_back({"\xe2\x82", -2.0f, {{" once", -1.0f}, {"\xe2\x82", -2.0f}}});
  chunk.tokens.push_back({"\xac\xc3\xa9", -3.0f, {}});  // the end of "€", then "é"
  return chunk;
}

TEST(OpenAiJsonTest, CompletionLogprobs) {
  const LogprobsChunk logprobs = sample_logprobs(4);
  const Json whole =
      Json::parse(completion_response(kHeader, "x", "length", UsageCounts{}, &logprobs));
  const Json& l = whole["choices"][0]["logprobs"];
  EXPECT_EQ(l["tokens"], Json({" the", "\xef\xbf\xbd\xef\xbf\xbd", "\xef\xbf\xbd\xc3\xa9"}));
  EXPECT_EQ(l["token_logprobs"], Json({-0.25, -2.0, -3.0}));
  // Characters as the client reads them: a U+FFFD per stray byte.
  EXPECT_EQ(l["text_offset"], Json({4, 8, 10}));
  ASSERT_EQ(l["top_logprobs"].size(), 3u);
  EXPECT_EQ(l["top_logprobs"][0], Json({{" the", -0.25}, {" a", -1.5}}));
  // The chosen token is in its position's object even when not among the alternatives.
  EXPECT_EQ(l["top_logprobs"][1], Json({{" once", -1.0}, {"\xef\xbf\xbd\xef\xbf\xbd", -2.0}}));
  EXPECT_EQ(l["top_logprobs"][2], Json({{"\xef\xbf\xbd\xc3\xa9", -3.0}}));
  EXPECT_TRUE(Json::parse(completion_response(kHeader, "x", "length",
                                              UsageCounts{}))["choices"][0]["logprobs"]
                  .is_null());
  const Json chunk = event_json(completion_chunk(kHeader, " the", std::nullopt, false, &logprobs));
  EXPECT_EQ(chunk["choices"][0]["logprobs"]["token_logprobs"].size(), 3u);
  const LogprobsChunk empty;
  const Json none = event_json(completion_chunk(kHeader, "", "stop", false, &empty));
  EXPECT_TRUE(none["choices"][0]["logprobs"]["tokens"].empty());
}

TEST(OpenAiJsonTest, ChatLogprobs) {
  const LogprobsChunk logprobs = sample_logprobs(0);
  const Json whole = Json::parse(chat_response(kHeader, "x", "stop", UsageCounts{}, &logprobs));
  const Json& content = whole["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), 3u);
  EXPECT_EQ(content[0]["token"], " the");
  EXPECT_EQ(content[0]["logprob"], -0.25);
  EXPECT_EQ(content[0]["bytes"], Json({32, 116, 104, 101}));
  ASSERT_EQ(content[0]["top_logprobs"].size(), 2u);
  EXPECT_EQ(content[0]["top_logprobs"][1],
            Json({{"token", " a"}, {"logprob", -1.5}, {"bytes", {32, 97}}}));
  // A token that splits a character: the string shows U+FFFD, the bytes are exact.
  EXPECT_EQ(content[1]["token"], "\xef\xbf\xbd\xef\xbf\xbd");
  EXPECT_EQ(content[1]["bytes"], Json({0xe2, 0x82}));
  EXPECT_EQ(content[2]["bytes"], Json({0xac, 0xc3, 0xa9}));
  EXPECT_TRUE(content[2]["top_logprobs"].empty());
  const Json chunk = event_json(chat_chunk(kHeader, false, "x", std::nullopt, false, &logprobs));
  EXPECT_EQ(chunk["choices"][0]["logprobs"]["content"].size(), 3u);
  EXPECT_TRUE(
      event_json(chat_chunk(kHeader, false, "x", std::nullopt, false))["choices"][0]["logprobs"]
          .is_null());
  LogprobsChunk infinite;
  infinite.tokens.push_back({"a", -std::numeric_limits<float>::infinity(), {}});
  EXPECT_EQ(
      Json::parse(chat_response(kHeader, "a", "stop", UsageCounts{},
                                &infinite))["choices"][0]["logprobs"]["content"][0]["logprob"],
      -9999.0);
}

TEST(OpenAiJsonTest, TextLengthCountsCharacters) {
  EXPECT_EQ(openai_text_length(""), 0);
  EXPECT_EQ(openai_text_length("abc"), 3);
  EXPECT_EQ(openai_text_length("\xe2\x82\xac\xc3\xa9"), 2);  // "€é"
  EXPECT_EQ(openai_text_length("\xe2\x82"), 2);              // two stray bytes
  EXPECT_EQ(openai_text_length("\xf0\x9f\x98\x80!"), 2);     // an emoji and "!"
  EXPECT_EQ(openai_text_length("\xed\xa0\x80"), 3);          // a surrogate is not UTF-8
}

TEST(OpenAiJsonTest, ModelsAndIds) {
  const Json list = Json::parse(model_list("stories260K-hf", 1700000000, 512));
  EXPECT_EQ(list["object"], "list");
  ASSERT_EQ(list["data"].size(), 1u);
  EXPECT_EQ(list["data"][0]["id"], "stories260K-hf");
  EXPECT_EQ(list["data"][0]["object"], "model");
  EXPECT_EQ(list["data"][0]["max_model_len"], 512);
  EXPECT_EQ(Json::parse(model_object("m", 1, 2))["id"], "m");

  const std::string a = new_response_id("cmpl-");
  const std::string b = new_response_id("cmpl-");
  EXPECT_EQ(a.rfind("cmpl-", 0), 0u);
  EXPECT_EQ(a.size(), 5u + 24u);
  EXPECT_NE(a, b);
}

}  // namespace
}  // namespace megaserve::server
