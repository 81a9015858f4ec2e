#include "server/blocking_generation.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/request_validation.h"
#include "server/status_code_name.h"
#include "spdlog/spdlog.h"

namespace megaserve::server {
namespace {

const char* status_name(const absl::Status& status) {
  // absl::StatusCode and grpc::StatusCode share their numbering.
  return status_code_name(static_cast<grpc::StatusCode>(status.code()));
}

// The most tokens a request of `prompt_tokens` may generate: what the context leaves, and no
// more than the whole KV cache holds (the engine refuses a request that could never fit).
int32_t tokens_that_fit(const ServingContext& context, int prompt_tokens) {
  int64_t room = int64_t{context.limits.max_model_len} - prompt_tokens;
  const int64_t block_size = context.model_info.kv_block_size();
  const int64_t blocks = context.engine->stats().kv_blocks_total;
  if (block_size > 0 && blocks > 0) room = std::min(room, blocks * block_size - prompt_tokens);
  return static_cast<int32_t>(std::max<int64_t>(room, 1));
}

}  // namespace

void record_rejected_request(ServingContext* context, const absl::Status& status) {
  RequestRecord record;
  record.status = status_name(status);
  context->metrics->record(record);
}

BlockingGeneration::BlockingGeneration(ServingContext* context, Clock::time_point received)
    : context_(context), received_(received) {}

absl::StatusOr<std::unique_ptr<BlockingGeneration>> BlockingGeneration::start(
    ServingContext* context, const v1::GenerateRequest& request, bool fill_context) {
  const Clock::time_point received = Clock::now();
  auto refuse = [context](absl::Status status) {
    record_rejected_request(context, status);
    return status;
  };
  if (context->draining.load()) {
    return refuse(
        absl::UnavailableError("the server is draining (shutting down); retry elsewhere"));
  }
  if (!context->engine->healthy()) {
    return refuse(absl::UnavailableError("the engine failed; the server is restarting"));
  }
  auto engine_request = to_engine_request(request, *context->tokenizer, context->limits);
  if (!engine_request.ok()) return refuse(engine_request.status());
  const int prompt_tokens = static_cast<int>(engine_request->prompt_token_ids.size());
  if (fill_context && !request.params().has_max_tokens()) {
    engine_request->sampling.max_tokens = tokens_that_fit(*context, prompt_tokens);
  }
  std::unique_ptr<BlockingGeneration> generation(new BlockingGeneration(context, received));
  generation->prompt_token_ids_ = engine_request->prompt_token_ids;
  generation->stream_ =
      std::make_unique<OutputStream>(*context->tokenizer, engine_request->sampling,
                                     context->eos_token_ids, request.params().has_logprobs());
  // The detokenizer's context: the prompt's last ids (DESIGN.md §9).
  const std::vector<int32_t>& ids = generation->prompt_token_ids_;
  generation->stream_->set_prompt(std::vector<int32_t>(
      ids.end() - std::min(ids.size(), engine::IncrementalDetokenizer::kPromptContextIds),
      ids.end()));
  auto output = context->engine->submit(*std::move(engine_request));
  if (!output.ok()) return refuse(output.status());
  generation->output_ = *std::move(output);
  context->active_streams.fetch_add(1);
  generation->output_->set_notify([wakeup = generation->wakeup_] {
    std::lock_guard<std::mutex> lock(wakeup->mu);
    wakeup->pending = true;
    wakeup->cv.notify_one();
  });
  return generation;
}

StreamDelta BlockingGeneration::next(std::chrono::milliseconds timeout) {
  StreamDelta delta;
  if (finished_) return delta;
  {
    std::unique_lock<std::mutex> lock(wakeup_->mu);
    wakeup_->cv.wait_for(lock, timeout, [this] { return wakeup_->pending; });
    wakeup_->pending = false;
  }
  for (const engine::RequestEvent& event : output_->take()) stream_->add(event, &delta);
  if (!delta.token_ids.empty()) {
    last_token_ = Clock::now();
    if (!first_token_) first_token_ = last_token_;
  }
  if (delta.finished) {
    finished_ = true;
    if (delta.stop_string_matched) {
      // The output side ended it: the engine still generates until told.
      context_->engine->finish(output_->request_id(), engine::FinishReason::kStop);
    }
    engine_done_ = true;
    if (*delta.finished == engine::FinishReason::kError) {
      final_status_ = "INTERNAL";
    } else {
      final_status_ = "OK";
      finish_reason_ = engine::finish_reason_name(*delta.finished);
    }
  }
  return delta;
}

void BlockingGeneration::record_metrics() {
  RequestRecord record;
  record.status = final_status_;
  if (final_status_ == "OK") record.finish_reason = finish_reason_;
  record.prompt_tokens = static_cast<int64_t>(prompt_token_ids_.size());
  record.completion_tokens = stream_->completion_tokens();
  set_latencies(record, received_, first_token_, last_token_);
  context_->metrics->record(record);
}

BlockingGeneration::~BlockingGeneration() {
  if (output_ == nullptr) return;  // never submitted
  if (!engine_done_) {
    context_->engine->finish(output_->request_id(), engine::FinishReason::kAbort);
    spdlog::debug("HTTP request {} abandoned by its client after {} tokens; aborted",
                  output_->request_id(), stream_->completion_tokens());
  }
  record_metrics();
  context_->active_streams.fetch_sub(1);
}

}  // namespace megaserve::server
