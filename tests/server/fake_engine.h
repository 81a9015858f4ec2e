// A stand-in for engine::Engine with known output, for testing the server's streaming,
// validation, cancellation and drain mechanics without a model. A stepping thread gives
// every running request one token per step: output token i is script[i % script.size()],
// where the script is the request's prompt without its first token (or a fixed script).
// EOS (unless ignore_eos) and stop token ids finish with kStop, max_tokens with kLength.
// KV usage is modelled as ceil(tokens / block_size) blocks per running request.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "engine/engine.h"
#include "engine/model/tokenizer.h"
#include "server/server.h"

namespace megaserve::testing {

struct FakeEngineOptions {
  int max_running = 64;
  int max_waiting = 1024;
  int kv_block_size = 16;
  int kv_blocks_total = 4096;
  std::chrono::microseconds step_interval{500};
  std::vector<int32_t> script;  // empty: echo the prompt (less its first token)
  std::vector<int32_t> eos_token_ids = {2};
  int top_logprobs_base = 100;  // top alternatives reported: ids base, base + 1, ...
};

class FakeEngine final : public engine::Engine {
 public:
  explicit FakeEngine(FakeEngineOptions options);
  ~FakeEngine() override;

  absl::StatusOr<std::shared_ptr<engine::RequestOutput>> submit(
      engine::GenerateRequest request) override;
  void finish(uint64_t request_id, engine::FinishReason reason) override;
  engine::EngineStats stats() const override;
  void drain(bool abort_all) override;
  bool healthy() const override;
  void set_step_observer(std::function<void(double seconds)> observer) override;

  // While paused, no step runs: requests stay waiting or running where they are.
  void set_paused(bool paused);
  // A failed step: every request finishes with kError and `error`, and healthy() turns false.
  void fail_all(const std::string& error);
  // Every finish() call seen, in order.
  std::vector<std::pair<uint64_t, engine::FinishReason>> finish_calls() const;
  int64_t submitted() const;

 private:
  struct Request {
    uint64_t id = 0;
    engine::GenerateRequest request;
    std::shared_ptr<engine::RequestOutput> output;
    int generated = 0;
    bool first_event_sent = false;
  };
  void loop();
  void step();  // under mu_
  void finish_locked(std::map<uint64_t, Request>::iterator it, engine::FinishReason reason);

  const FakeEngineOptions options_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<uint64_t> waiting_;
  std::map<uint64_t, Request> requests_;  // waiting and running
  std::vector<uint64_t> running_;
  std::vector<std::pair<uint64_t, engine::FinishReason>> pending_finishes_;
  std::vector<std::pair<uint64_t, engine::FinishReason>> finish_calls_;
  uint64_t next_id_ = 1;
  int64_t submitted_ = 0;
  int64_t steps_ = 0;
  std::function<void(double seconds)> step_observer_;
  bool paused_ = false;
  bool failed_ = false;
  bool draining_ = false;
  bool stopping_ = false;
  std::thread thread_;
};

// The model a server over `engine` serves, for the stories260K tokenizer the fake tests use:
// named "fake", vocabulary 512, EOS 2, at most `max_model_len` tokens.
server::ServedModel fake_served_model(std::unique_ptr<FakeEngine> engine,
                                      std::unique_ptr<engine::Tokenizer> tokenizer,
                                      int max_model_len);

}  // namespace megaserve::testing
