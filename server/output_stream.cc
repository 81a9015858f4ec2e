#include "server/output_stream.h"

#include <algorithm>
#include <utility>

namespace megaserve::server {

size_t stop_prefix_holdback(std::string_view text, const std::vector<std::string>& stops) {
  size_t best = 0;
  for (const std::string& stop : stops) {
    // Suffixes of `text` no longer than stop.size() - 1 (a whole stop string is not held
    // back: the caller has already cut it out).
    const size_t max_len = std::min(text.size(), stop.size() - 1);
    for (size_t len = max_len; len > best; --len) {
      if (text.substr(text.size() - len) == std::string_view(stop).substr(0, len)) {
        best = len;
        break;
      }
    }
  }
  return best;
}

OutputStream::OutputStream(const engine::Tokenizer& tokenizer,
                           const scheduler::SamplingParams& params,
                           std::vector<int32_t> eos_token_ids, bool report_logprobs)
    : detokenizer_(tokenizer),
      params_(params),
      eos_token_ids_(std::move(eos_token_ids)),
      report_logprobs_(report_logprobs) {}

bool OutputStream::is_stop_token(int32_t id) const {
  const auto contains = [id](const std::vector<int32_t>& ids) {
    return std::find(ids.begin(), ids.end(), id) != ids.end();
  };
  return (!params_.ignore_eos && contains(eos_token_ids_)) || contains(params_.stop_token_ids);
}

void OutputStream::release_text(StreamDelta* delta, bool at_end) {
  // Earliest stop string occurrence wins; pending_ held no whole stop string before the
  // newest text was appended, so any match ends inside the new text.
  size_t cut = std::string::npos;
  for (const std::string& stop : params_.stop_strings) {
    cut = std::min(cut, pending_.find(stop));
  }
  if (cut != std::string::npos) {
    delta->text += pending_.substr(0, cut);
    pending_.clear();
    delta->finished = engine::FinishReason::kStop;
    delta->stop_string_matched = true;
    finished_ = true;
    return;
  }
  const size_t hold = at_end ? 0 : stop_prefix_holdback(pending_, params_.stop_strings);
  delta->text += pending_.substr(0, pending_.size() - hold);
  pending_.erase(0, pending_.size() - hold);
}

void OutputStream::add(const engine::RequestEvent& event, StreamDelta* delta) {
  if (finished_) return;
  cached_prompt_tokens_ = std::max(cached_prompt_tokens_, event.num_cached_prompt_tokens);
  for (const scheduler::SampledToken& token : event.tokens) {
    ++completion_tokens_;
    delta->token_ids.push_back(token.token_id);
    if (report_logprobs_) delta->logprobs.push_back(token);
    // The token that stopped generation contributes no text. Before min_tokens the engine
    // bans stop tokens, so one seen here does stop the request.
    if (is_stop_token(token.token_id)) continue;
    pending_ += detokenizer_.push(token.token_id);
    release_text(delta, /*at_end=*/false);
    if (finished_) return;
  }
  if (event.finished) {
    pending_ += detokenizer_.flush();
    release_text(delta, /*at_end=*/true);
    if (finished_) return;  // the flushed tail completed a stop string
    delta->finished = *event.finished;
    delta->error = event.error;
    finished_ = true;
  }
}

}  // namespace megaserve::server
