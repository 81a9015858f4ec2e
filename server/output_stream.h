// The output side of one request: turns the engine's token events into what the client
// receives. It detokenizes incrementally, applies stop strings (the text before a stop
// string is delivered, the stop string itself is not; a stop string may span tokens, so
// text that could still become one is held back), hides the text of the token that
// stopped generation (EOS or a stop token id), and counts usage. No gRPC, no threads:
// the reactor owns one and feeds it under its lock.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/model/tokenizer.h"
#include "scheduler/sampling_params.h"
#include "scheduler/step_plan.h"

namespace megaserve::server {

// What to send for a batch of events. `finished` is set once, on the delta that ends the
// stream; events after it are ignored.
struct StreamDelta {
  std::vector<int32_t> token_ids;
  std::string text;
  std::vector<scheduler::SampledToken> logprobs;  // one per token id when logprobs requested
  std::optional<engine::FinishReason> finished;
  std::string error;  // with FinishReason::kError
  // A stop string ended the stream here, not the engine: the caller must tell the engine
  // to stop generating (Engine::finish with kStop).
  bool stop_string_matched = false;
};

class OutputStream {
 public:
  // `report_logprobs`: the client asked for logprobs (even with 0 alternatives: then each
  // token's own logprob).
  OutputStream(const engine::Tokenizer& tokenizer, const scheduler::SamplingParams& params,
               std::vector<int32_t> eos_token_ids, bool report_logprobs);

  // The request's prompt, as context for detokenizing (call before the first add): the
  // text is then what the generated tokens add after the prompt (DESIGN.md §9), keeping,
  // with sentencepiece, the first token's leading space.
  void set_prompt(const std::vector<int32_t>& prompt_token_ids) {
    detokenizer_.set_prompt_context(prompt_token_ids);
  }

  // Appends the effect of `event` to `delta`.
  void add(const engine::RequestEvent& event, StreamDelta* delta);

  bool finished() const { return finished_; }
  int completion_tokens() const { return completion_tokens_; }
  int cached_prompt_tokens() const { return cached_prompt_tokens_; }

 private:
  bool is_stop_token(int32_t id) const;
  // Moves the text of pending_ that can no longer start a stop string into `delta`;
  // ends the stream when pending_ contains a whole stop string.
  void release_text(StreamDelta* delta, bool at_end);

  engine::IncrementalDetokenizer detokenizer_;
  const scheduler::SamplingParams params_;
  const std::vector<int32_t> eos_token_ids_;
  const bool report_logprobs_;
  std::string pending_;  // text not yet sent: never contains a whole stop string
  bool finished_ = false;
  int completion_tokens_ = 0;
  int cached_prompt_tokens_ = 0;
};

// The length of the longest suffix of `text` that is a proper prefix of one of `stops`
// (what must be held back because the next token may complete a stop string).
size_t stop_prefix_holdback(std::string_view text, const std::vector<std::string>& stops);

}  // namespace megaserve::server
