// The OpenAI-compatible HTTP API's mechanics over real loopback HTTP, with the fake engine
// (tests/server/fake_engine.h, known output) and stories260K's tokenizer: whole and streamed
// responses, a client's disconnect aborting its request, a full queue (429), a draining
// server (503, and an aborted stream's error event), a failed engine (500 in the stream,
// then 503), stop strings reaching the engine, and concurrent streams.
#include <algorithm>
#include <chrono>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "engine/model/tokenizer.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "nlohmann/json.hpp"
#include "server/server.h"
#include "tests/server/fake_engine.h"
#include "tests/support/assets.h"

namespace megaserve::server {
namespace {

using Json = nlohmann::json;
using megaserve::testing::FakeEngine;
using megaserve::testing::FakeEngineOptions;

constexpr char kTokenizer[] = "models/stories260K/tok512.model";

// What a streamed response brought: its status, the JSON of every event before [DONE], and
// whether [DONE] came.
struct Events {
  int status = 0;
  std::vector<Json> events;
  bool done = false;
  std::string text;  // the concatenated choices[0].text
};

class HttpApiTest : public ::testing::Test {
 protected:
  void SetUp() override { MEGASERVE_REQUIRE_ASSET(kTokenizer); }

  void start(FakeEngineOptions options = {}) {
    auto tokenizer = engine::Tokenizer::load(megaserve::testing::assets_dir() / kTokenizer);
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = tokenizer->get();
    auto engine = std::make_unique<FakeEngine>(options);
    engine_ = engine.get();
    ServedModel model =
        megaserve::testing::fake_served_model(std::move(engine), *std::move(tokenizer), 512);
    model.info.set_kv_block_size(16);
    ServerOptions server_options;
    server_options.grpc_address = "127.0.0.1:0";
    server_options.http_address = "127.0.0.1:0";
    auto server = Server::start(server_options, std::move(model));
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    ASSERT_GT(server_->http_port(), 0);
  }

  std::unique_ptr<httplib::Client> client(int read_timeout_seconds = 30) const {
    auto c = std::make_unique<httplib::Client>("127.0.0.1", server_->http_port());
    c->set_read_timeout(read_timeout_seconds, 0);
    return c;
  }

  // POST `body` to `path`; the status and the parsed body (null when it is not JSON).
  std::pair<int, Json> post(const std::string& path, const std::string& body) const {
    auto result = client()->Post(path.c_str(), body, "application/json");
    if (!result) return {0, nullptr};
    return {result->status, Json::parse(result->body, nullptr, false)};
  }

  // POST a streamed request; `keep_reading(events so far)` false closes the connection.
  Events stream(const std::string& path, const std::string& body,
                const std::function<bool(const Events&)>& keep_reading = nullptr) const {
    Events out;
    std::string buffer;
    httplib::Request req;
    req.method = "POST";
    req.path = path;
    req.body = body;
    req.set_header("Content-Type", "application/json");
    req.response_handler = [&out](const httplib::Response& res) {
      out.status = res.status;
      return true;
    };
    req.content_receiver = [&](const char* data, size_t size, uint64_t, uint64_t) {
      buffer.append(data, size);
      for (size_t end; (end = buffer.find("\n\n")) != std::string::npos;) {
        const std::string event = buffer.substr(0, end);
        buffer.erase(0, end + 2);
        EXPECT_EQ(event.rfind("data: ", 0), 0u) << event;
        if (event == "data: [DONE]") {
          out.done = true;
          continue;
        }
        out.events.push_back(Json::parse(event.substr(6)));
        const Json& e = out.events.back();
        if (e.contains("choices") && !e["choices"].empty() && e["choices"][0].contains("text")) {
          out.text += e["choices"][0]["text"].get<std::string>();
        }
      }
      return !keep_reading || keep_reading(out);
    };
    httplib::Response res;
    httplib::Error error = httplib::Error::Success;
    client()->send(req, res, error);
    return out;
  }

  // The fake's completion of a text prompt (with BOS): the prompt's own ids, cyclically, as
  // the text they add after the prompt.
  std::string completion_text(const std::string& prompt, int n) const {
    const std::vector<int32_t> script = tokenizer_->encode(prompt, false);
    std::vector<int32_t> all = tokenizer_->encode(prompt, true);
    const std::string prompt_text = *tokenizer_->decode(all);
    for (int i = 0; i < n; ++i) all.push_back(script[i % script.size()]);
    return tokenizer_->decode(all)->substr(prompt_text.size());
  }

  void expect_engine_idle() const {
    for (int i = 0; i < 5000; ++i) {
      const engine::EngineStats s = engine_->stats();
      if (s.waiting == 0 && s.running == 0 && s.kv_blocks_used == 0) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ADD_FAILURE() << "engine not idle";
  }

  // Whether the engine was told to finish a request with `reason`.
  bool finished_with(engine::FinishReason reason) const {
    for (const auto& [id, r] : engine_->finish_calls()) {
      if (r == reason) return true;
    }
    return false;
  }

  const engine::Tokenizer* tokenizer_ = nullptr;
  FakeEngine* engine_ = nullptr;
  std::unique_ptr<Server> server_;
};

TEST_F(HttpApiTest, WholeAndStreamedCompletionsCarryTheFakesText) {
  start();
  const std::string expected = completion_text("Once upon a time", 10);
  const auto [status, whole] = post(
      "/v1/completions", R"({"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0})");
  ASSERT_EQ(status, 200) << whole.dump();
  EXPECT_EQ(whole["choices"][0]["text"], expected);
  EXPECT_EQ(whole["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(whole["usage"]["prompt_tokens"], 5);
  EXPECT_EQ(whole["usage"]["completion_tokens"], 10);
  EXPECT_EQ(whole["model"], "fake");

  const Events streamed = stream("/v1/completions",
                                 R"({"prompt": "Once upon a time", "max_tokens": 10, "stream": true,
                 "stream_options": {"include_usage": true}})");
  EXPECT_EQ(streamed.status, 200);
  EXPECT_TRUE(streamed.done);
  EXPECT_EQ(streamed.text, expected);
  EXPECT_GT(streamed.events.size(), 3u);  // one event per engine step, not one lump
  ASSERT_GE(streamed.events.size(), 2u);
  const Json& last_choice = streamed.events[streamed.events.size() - 2]["choices"][0];
  EXPECT_EQ(last_choice["finish_reason"], "length");
  EXPECT_EQ(streamed.events.back()["usage"]["completion_tokens"], 10);
  expect_engine_idle();
}

// The fake's logprobs: -0.5 * (i % 4) for output token i; alternatives ids 100, 101, ... at
// logprobs 0, -1, ...
TEST_F(HttpApiTest, WholeCompletionWithLogprobs) {
  start();
  const auto [status, whole] =
      post("/v1/completions",
           R"({"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0, "logprobs": 2})");
  ASSERT_EQ(status, 200) << whole.dump();
  const std::string text = whole["choices"][0]["text"];
  const Json& l = whole["choices"][0]["logprobs"];
  ASSERT_EQ(l["tokens"].size(), 10u) << l.dump();
  std::string joined;
  for (size_t i = 0; i < 10; ++i) {
    EXPECT_EQ(l["text_offset"][i], joined.size());  // stories260K's pieces are ASCII
    joined += l["tokens"][i].get<std::string>();
    EXPECT_EQ(l["token_logprobs"][i], -0.5 * (i % 4));
    const Json& top = l["top_logprobs"][i];
    std::vector<double> values;
    for (const auto& [token, logprob] : top.items()) values.push_back(logprob);
    EXPECT_EQ(top.size(), 3u) << top.dump();  // two alternatives and the chosen token
    EXPECT_NE(std::find(values.begin(), values.end(), 0.0), values.end()) << top.dump();
    EXPECT_NE(std::find(values.begin(), values.end(), -1.0), values.end()) << top.dump();
    EXPECT_EQ(top[l["tokens"][i].get<std::string>()], -0.5 * (i % 4));
  }
  EXPECT_EQ(joined, text);  // the detokenized pieces, leading spaces included
}

TEST_F(HttpApiTest, StreamedLogprobsFollowTheTextThatBecameFinal) {
  start();
  // The fake repeats the prompt: the text stops before the second "cat", whose token's
  // logprobs come with the finish reason's chunk (its text is never sent).
  const Events streamed = stream("/v1/completions",
                                 R"({"prompt": "Once upon a time there was a cat", "stop": ["cat"],
                 "max_tokens": 50, "ignore_eos": true, "logprobs": 1, "stream": true,
                 "stream_options": {"include_usage": true}})");
  ASSERT_EQ(streamed.status, 200);
  ASSERT_TRUE(streamed.done);
  ASSERT_GE(streamed.events.size(), 3u);
  std::string text, tokens;
  size_t count = 0;
  for (size_t e = 0; e + 1 < streamed.events.size(); ++e) {
    const Json& choice = streamed.events[e]["choices"][0];
    text += choice["text"].get<std::string>();
    if (choice["logprobs"].is_null()) {
      EXPECT_EQ(e + 2, streamed.events.size());  // only the finish chunk may carry none
      continue;
    }
    const Json& l = choice["logprobs"];
    ASSERT_EQ(l["tokens"].size(), l["token_logprobs"].size());
    for (size_t i = 0; i < l["tokens"].size(); ++i) {
      EXPECT_EQ(l["text_offset"][i], tokens.size());
      tokens += l["tokens"][i].get<std::string>();
      EXPECT_EQ(l["token_logprobs"][i], -0.5 * (count++ % 4));
      EXPECT_EQ(l["top_logprobs"][i].size(), 2u);
    }
    if (choice["finish_reason"].is_null()) {
      // A chunk's tokens never run ahead of the text sent so far.
      EXPECT_EQ(text.substr(0, tokens.size()), tokens) << e;
    }
  }
  const std::string unstopped = completion_text("Once upon a time there was a cat", 50);
  EXPECT_EQ(text, unstopped.substr(0, unstopped.find("cat")));
  // Every token's logprobs came, those of the tokens that spell "cat" too.
  EXPECT_GT(tokens.size(), text.size());
  EXPECT_EQ(tokens.substr(0, text.size()), text);
  EXPECT_EQ(tokens.find("cat"), text.size()) << tokens;
  EXPECT_EQ(streamed.events[streamed.events.size() - 2]["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(streamed.events.back()["usage"]["completion_tokens"], count);
  expect_engine_idle();
}

TEST_F(HttpApiTest, ClosingAStreamAbortsTheRequest) {
  FakeEngineOptions options;
  options.step_interval = std::chrono::milliseconds(5);  // 400 tokens take 2 s
  start(options);
  const Events streamed = stream(
      "/v1/completions",
      R"({"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": true, "stream": true})",
      [](const Events& events) { return events.events.size() < 3; });
  EXPECT_EQ(streamed.status, 200);
  EXPECT_FALSE(streamed.done);
  expect_engine_idle();
  EXPECT_TRUE(finished_with(engine::FinishReason::kAbort));
}

TEST_F(HttpApiTest, AClientGivingUpOnAWholeResponseAbortsTheRequest) {
  FakeEngineOptions options;
  options.step_interval = std::chrono::milliseconds(5);
  start(options);
  auto c = client();
  c->set_read_timeout(0, 300'000);  // 0.3 s of the 2 s it would take
  auto result = c->Post("/v1/completions",
                        R"({"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": true})",
                        "application/json");
  EXPECT_FALSE(result && !result->body.empty());
  expect_engine_idle();
  EXPECT_TRUE(finished_with(engine::FinishReason::kAbort));
}

TEST_F(HttpApiTest, AFullQueueIs429) {
  FakeEngineOptions options;
  options.max_waiting = 0;  // every submit finds the queue full
  start(options);
  const auto [status, body] = post("/v1/completions", R"({"prompt": "Zoo"})");
  EXPECT_EQ(status, 429);
  EXPECT_EQ(body["error"]["type"], "rate_limit_error");
}

TEST_F(HttpApiTest, DrainingIs503AndAbortsRunningStreamsWithAnErrorEvent) {
  start();
  engine_->set_paused(true);  // the stream stays admitted, without tokens
  auto running = std::async(std::launch::async, [this] {
    return stream("/v1/completions", R"({"prompt": "Zoo", "max_tokens": 50, "stream": true})");
  });
  while (engine_->submitted() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  auto drained =
      std::async(std::launch::async, [this] { server_->drain_and_stop(std::chrono::seconds(30)); });
  // A probe sent before the drain has begun is admitted and waits on the paused engine: each
  // gives up after 0.2 s (status 0) and the next one is sent, until one is refused with 503.
  // (Probes without that timeout blocked for the whole 30 s grace on a loaded machine.)
  int status = 0;
  for (int i = 0; i < 2000 && status != 503; ++i) {
    auto c = client();
    c->set_read_timeout(0, 200'000);
    auto result = c->Post("/v1/completions", R"({"prompt": "Zoo"})", "application/json");
    status = result ? result->status : 0;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(status, 503);
  server_->end_grace_period();
  const Events aborted = running.get();
  drained.get();
  EXPECT_EQ(aborted.status, 200);
  EXPECT_TRUE(aborted.done);
  ASSERT_FALSE(aborted.events.empty());
  EXPECT_EQ(aborted.events.back()["error"]["type"], "service_unavailable_error");
}

TEST_F(HttpApiTest, AFailedEngineEndsStreamsWithAnErrorThenRefusesWith503) {
  start();
  engine_->set_paused(true);
  auto running = std::async(std::launch::async, [this] {
    return stream("/v1/completions", R"({"prompt": "Zoo", "max_tokens": 50, "stream": true})");
  });
  while (engine_->submitted() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  engine_->fail_all("device lost");
  const Events failed = running.get();
  EXPECT_TRUE(failed.done);
  ASSERT_FALSE(failed.events.empty());
  EXPECT_EQ(failed.events.back()["error"]["message"], "generation failed: device lost");
  EXPECT_EQ(failed.events.back()["error"]["type"], "internal_server_error");
  const auto [status, body] = post("/v1/completions", R"({"prompt": "Zoo"})");
  EXPECT_EQ(status, 503);
  EXPECT_EQ(body["error"]["type"], "service_unavailable_error");
}

TEST_F(HttpApiTest, AStopStringEndsTheTextAndTheEnginesRequest) {
  start();
  // The fake repeats the prompt: "Zoo Zoo Zoo ..." stops at the second "Zoo".
  const auto [status, body] =
      post("/v1/completions",
           R"({"prompt": "Zoo", "max_tokens": 50, "stop": ["Zoo"], "ignore_eos": true})");
  ASSERT_EQ(status, 200) << body.dump();
  EXPECT_EQ(body["choices"][0]["finish_reason"], "stop");
  const std::string text = body["choices"][0]["text"];
  EXPECT_EQ(text.find("Zoo"), std::string::npos) << text;
  expect_engine_idle();
  EXPECT_TRUE(finished_with(engine::FinishReason::kStop));
}

TEST_F(HttpApiTest, ConcurrentStreamsEachGetTheirOwnText) {
  FakeEngineOptions options;
  options.step_interval = std::chrono::milliseconds(1);
  start(options);
  const std::vector<std::string> prompts = {
      "Once upon a time", "Zoo",     "The cat sat",     "Lily and Tom",
      "A big red ball",   "One day", "The sun was hot", "Bob"};
  std::vector<std::future<Events>> streams;
  for (const std::string& prompt : prompts) {
    streams.push_back(std::async(std::launch::async, [this, prompt] {
      return stream("/v1/completions",
                    Json({{"prompt", prompt}, {"max_tokens", 30}, {"stream", true}}).dump());
    }));
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    const Events e = streams[i].get();
    EXPECT_TRUE(e.done) << prompts[i];
    EXPECT_EQ(e.text, completion_text(prompts[i], 30)) << prompts[i];
  }
  expect_engine_idle();
}

}  // namespace
}  // namespace megaserve::server
