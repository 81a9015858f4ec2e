// The Generate call: validation, admission, then a write loop driven from two sides. The
// engine thread calls pump() through the RequestOutput notify hook when tokens arrive;
// OnWriteDone calls it when the previous write left. pump() takes every queued event, folds
// them into one message, and starts a write only when none is in flight, so a slow client
// gets fewer, larger messages instead of an unbounded queue.
//
// Lifetime [reactor-link]: the engine may push events after the call ended (a stop string
// matched, the client went away). Its hook holds a shared ReactorLink, never the reactor
// itself; OnDone cuts the link, and when a pump() is running at that moment the reactor is
// deleted by that pump() when it returns (`busy` counts them), never under its feet. The
// tokenizer pool's job that admits a text prompt reaches the reactor the same way.
//
// A text prompt is checked by its byte length on the gRPC thread (cheap: one that can never
// fit is refused at once) and tokenized and submitted by the tokenizer pool, so that a long
// prompt never holds up gRPC's threads, which every other call waits on. A client may cancel
// while the job is queued or running: admit() then submits nothing, or aborts what it
// submitted.
#include <algorithm>
#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/output_stream.h"
#include "server/raw_messages.h"
#include "server/service.h"
#include "server/status_code_name.h"
#include "spdlog/spdlog.h"

namespace megaserve::server {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_between(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

v1::FinishReason to_proto(engine::FinishReason reason) {
  switch (reason) {
    case engine::FinishReason::kStop:
      return v1::FINISH_REASON_STOP;
    case engine::FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case engine::FinishReason::kAbort:
      return v1::FINISH_REASON_ABORT;
    case engine::FinishReason::kError:
      break;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

class GenerateReactor;

struct ReactorLink {
  std::mutex mu;
  GenerateReactor* reactor = nullptr;
  int busy = 0;       // calls from the engine hook or the tokenizer pool in progress
  bool done = false;  // OnDone ran
};

// Runs `fn(reactor)` from a thread of the engine or the tokenizer pool, unless the call is
// done; the reactor is deleted here if OnDone ran meanwhile [reactor-link].
template <typename Fn>
void with_reactor(const std::shared_ptr<ReactorLink>& link, Fn fn);

class GenerateReactor final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  GenerateReactor(ServingContext* context, grpc::CallbackServerContext* call,
                  v1::GenerateRequest request, const absl::Status& parsed);

  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

  // Takes the queued engine events and starts the next write when none is in flight.
  void pump();
  // Tokenizes (or checks) the prompt and submits it to the engine; nothing when the call
  // already ended.
  void admit(const v1::GenerateRequest& request);

 private:
  void reject(const absl::Status& status);
  void record_metrics();
  // "DEADLINE_EXCEEDED" or "CANCELLED" for a call that ended early, see the definition.
  const char* cancel_status_name() const;

  ServingContext* const context_;
  grpc::CallbackServerContext* const call_;
  const std::string client_request_id_;
  const Clock::time_point received_ = Clock::now();
  const std::chrono::system_clock::time_point received_wall_ = std::chrono::system_clock::now();
  std::shared_ptr<ReactorLink> link_ = std::make_shared<ReactorLink>();

  std::mutex mu_;
  std::shared_ptr<engine::RequestOutput> output_;  // null when rejected before admission
  std::unique_ptr<OutputStream> stream_;
  int prompt_tokens_ = 0;
  Clock::time_point admitted_;
  std::optional<Clock::time_point> first_token_;
  std::optional<Clock::time_point> last_token_;
  v1::GenerateResponse pending_;  // accumulates while a write is in flight
  bool pending_final_ = false;    // pending_ is the last message
  grpc::ByteBuffer in_flight_;    // the message gRPC is writing (serialized); untouched until done
  bool write_in_flight_ = false;
  bool finish_called_ = false;
  bool engine_done_ = false;  // the engine finished it, or was told to
  // A stop string ended the stream; the engine is told in OnDone (never from pump(), which
  // may run inside the engine's push).
  bool stop_string_matched_ = false;
  std::string final_status_ = "OK";
  std::optional<std::string> finish_reason_;
};

GenerateReactor::GenerateReactor(ServingContext* context, grpc::CallbackServerContext* call,
                                 v1::GenerateRequest request, const absl::Status& parsed)
    : context_(context), call_(call), client_request_id_(request.request_id()) {
  context_->active_streams.fetch_add(1);
  link_->reactor = this;
  if (!parsed.ok()) {
    reject(parsed);
    return;
  }
  if (context_->draining.load()) {
    reject(absl::UnavailableError("the server is draining (shutting down); retry elsewhere"));
    return;
  }
  if (absl::Status size = check_text_size(request, *context_->tokenizer, context_->limits);
      !size.ok()) {
    reject(size);
    return;
  }
  if (request.input_case() != v1::GenerateRequest::kText || context_->tokenizer_pool == nullptr) {
    admit(request);  // token ids are checked in one pass, no tokenizing
    return;
  }
  const size_t text_bytes = request.text().size();
  const bool queued =
      context_->tokenizer_pool->post(text_bytes, [link = link_, request = std::move(request)] {
        with_reactor(link, [&request](GenerateReactor* reactor) { reactor->admit(request); });
      });
  if (!queued) {
    reject(absl::ResourceExhaustedError("the tokenizer's queue is full; retry later"));
  }
}

void GenerateReactor::admit(const v1::GenerateRequest& request) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (finish_called_) return;  // cancelled while queued
  }
  auto engine_request = to_engine_request(request, *context_->tokenizer, context_->limits);
  if (!engine_request.ok()) {
    reject(engine_request.status());
    return;
  }
  const int prompt_tokens = static_cast<int>(engine_request->prompt_token_ids.size());
  // The prompt's last ids, the detokenizer's context (the request moves into the engine).
  const std::vector<int32_t>& prompt_ids = engine_request->prompt_token_ids;
  const std::vector<int32_t> prompt_tail(
      prompt_ids.end() -
          std::min(prompt_ids.size(), engine::IncrementalDetokenizer::kPromptContextIds),
      prompt_ids.end());
  const scheduler::SamplingParams sampling = engine_request->sampling;
  auto output = context_->engine->submit(*std::move(engine_request));
  if (!output.ok()) {
    reject(output.status());
    return;
  }
  bool cancelled = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    prompt_tokens_ = prompt_tokens;
    admitted_ = Clock::now();
    stream_ = std::make_unique<OutputStream>(
        *context_->tokenizer, sampling, context_->eos_token_ids, request.params().has_logprobs());
    stream_->set_prompt(prompt_tail);
    output_ = *std::move(output);
    pending_.set_request_id(client_request_id_);
    // OnCancel ran while the prompt was tokenized or submitted: it could not tell the
    // engine, which had no such request yet.
    cancelled = finish_called_;
    if (cancelled) engine_done_ = true;
  }
  if (cancelled) {
    context_->engine->finish(output_->request_id(), engine::FinishReason::kAbort);
    return;
  }
  output_->set_notify(
      [link = link_] { with_reactor(link, [](GenerateReactor* reactor) { reactor->pump(); }); });
  pump();  // events pushed before the hook was set
}

template <typename Fn>
void with_reactor(const std::shared_ptr<ReactorLink>& link, Fn fn) {
  GenerateReactor* reactor = nullptr;
  {
    std::lock_guard<std::mutex> lock(link->mu);
    if (link->done || link->reactor == nullptr) return;
    reactor = link->reactor;
    ++link->busy;
  }
  fn(reactor);
  bool delete_reactor = false;
  {
    std::lock_guard<std::mutex> lock(link->mu);
    delete_reactor = --link->busy == 0 && link->done;
    if (delete_reactor) link->reactor = nullptr;
  }
  if (delete_reactor) delete reactor;
}

void GenerateReactor::reject(const absl::Status& status) {
  const grpc::Status grpc_status = to_grpc_status(status);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (finish_called_) return;  // OnCancel finished the call first
    final_status_ = status_code_name(grpc_status.error_code());
    finish_called_ = true;
    engine_done_ = true;
  }
  spdlog::debug("Generate {} rejected: {}", client_request_id_, status.ToString());
  Finish(grpc_status);
}

const char* GenerateReactor::cancel_status_name() const {
  // A client whose deadline passes cancels the call itself, and the server sees that as an
  // ordinary cancel, a little before its own copy of the deadline: that copy starts when the
  // request arrives (one network latency late), and the grpc-timeout header rounds the
  // timeout up. So a cancel this close to the deadline is the deadline: 50 ms of latency
  // plus 2% of the timeout, but never more than half of it.
  const auto deadline = call_->deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return "CANCELLED";
  const auto timeout = deadline - received_wall_;
  const auto slack = std::min<std::chrono::system_clock::duration>(
      std::chrono::milliseconds(50) + timeout / 50, timeout / 2);
  return deadline - std::chrono::system_clock::now() <= slack ? "DEADLINE_EXCEEDED" : "CANCELLED";
}

void GenerateReactor::pump() {
  enum class Action { kNone, kWrite, kWriteAndFinish, kFinishError };
  Action action = Action::kNone;
  grpc::Status error;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (finish_called_ || output_ == nullptr) return;
    std::vector<engine::RequestEvent> events = output_->take();
    const Clock::time_point now = Clock::now();
    StreamDelta delta;
    for (const engine::RequestEvent& event : events) stream_->add(event, &delta);
    if (!delta.token_ids.empty()) {
      if (!first_token_) first_token_ = now;
      last_token_ = now;
    }
    for (int32_t id : delta.token_ids) pending_.add_token_ids(id);
    pending_.mutable_text()->append(delta.text);
    for (const scheduler::SampledToken& token : delta.logprobs) {
      v1::TokenLogprob* logprob = pending_.add_logprobs();
      logprob->set_token_id(token.token_id);
      logprob->set_logprob(token.logprob);
      for (const auto& [id, value] : token.top_logprobs) {
        v1::TopLogprob* top = logprob->add_top();
        top->set_token_id(id);
        top->set_logprob(value);
      }
    }
    if (delta.finished) {
      stop_string_matched_ = delta.stop_string_matched;
      engine_done_ = !delta.stop_string_matched;
      if (*delta.finished == engine::FinishReason::kError) {
        error = grpc::Status(grpc::StatusCode::INTERNAL,
                             absl::StrCat("generation failed: ", delta.error));
        final_status_ = "INTERNAL";
        finish_called_ = true;
        action = Action::kFinishError;
      } else {
        finish_reason_ = engine::finish_reason_name(*delta.finished);
        pending_.set_finish_reason(to_proto(*delta.finished));
        v1::Usage* usage = pending_.mutable_usage();
        usage->set_prompt_tokens(prompt_tokens_);
        usage->set_completion_tokens(stream_->completion_tokens());
        usage->set_cached_prompt_tokens(stream_->cached_prompt_tokens());
        v1::Timings* timings = pending_.mutable_timings();
        timings->set_queue_seconds(seconds_between(received_, admitted_));
        if (first_token_) {
          timings->set_first_token_seconds(seconds_between(received_, *first_token_));
        }
        timings->set_total_seconds(seconds_between(received_, last_token_.value_or(now)));
        pending_final_ = true;
      }
    }
    const bool has_content = pending_.token_ids_size() > 0 || !pending_.text().empty();
    if (action == Action::kNone && !write_in_flight_ && (has_content || pending_final_)) {
      in_flight_ = serialize_response(pending_);
      pending_.Clear();
      pending_.set_request_id(client_request_id_);
      write_in_flight_ = true;
      if (pending_final_) {
        finish_called_ = true;
        action = Action::kWriteAndFinish;
      } else {
        action = Action::kWrite;
      }
    }
  }
  switch (action) {
    case Action::kNone:
      break;
    case Action::kWrite:
      StartWrite(&in_flight_);
      break;
    case Action::kWriteAndFinish:
      StartWriteAndFinish(&in_flight_, grpc::WriteOptions(), grpc::Status::OK);
      break;
    case Action::kFinishError:
      Finish(error);
      break;
  }
}

void GenerateReactor::OnWriteDone(bool ok) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    write_in_flight_ = false;
    if (!ok) {
      // The stream broke (client gone); OnCancel normally says so too.
      if (finish_called_) return;
      finish_called_ = true;
      final_status_ = cancel_status_name();
    }
  }
  if (!ok) {
    Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the stream to the client broke"));
    return;
  }
  pump();
}

void GenerateReactor::OnCancel() {
  bool finish_now = false;
  bool abort_engine = false;
  uint64_t request_id = 0;
  const char* status = cancel_status_name();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!finish_called_) final_status_ = status;
    finish_now = !finish_called_ && !write_in_flight_;
    if (finish_now) finish_called_ = true;
    // Not admitted yet (the prompt is with the tokenizer pool): admit() sees finish_called_.
    abort_engine = !engine_done_ && output_ != nullptr;
    if (abort_engine) request_id = output_->request_id();
    if (output_ != nullptr) engine_done_ = true;
  }
  // Frees the request's KV blocks at the next step boundary.
  if (abort_engine) context_->engine->finish(request_id, engine::FinishReason::kAbort);
  if (finish_now) {
    Finish(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client or its deadline"));
  }
}

void GenerateReactor::record_metrics() {
  RequestRecord record;
  record.status = final_status_;
  if (final_status_ == "OK") record.finish_reason = finish_reason_;
  if (output_ != nullptr) {
    record.prompt_tokens = prompt_tokens_;
    record.completion_tokens = stream_->completion_tokens();
  }
  set_latencies(record, received_, first_token_, last_token_);
  context_->metrics->record(record);
}

void GenerateReactor::OnDone() {
  bool tell_engine = false;
  engine::FinishReason reason = engine::FinishReason::kAbort;
  {
    std::lock_guard<std::mutex> lock(mu_);
    tell_engine = !engine_done_ && output_ != nullptr;
    if (stop_string_matched_) reason = engine::FinishReason::kStop;
    engine_done_ = true;
    record_metrics();
    spdlog::debug("Generate {} done: {} {} ({} prompt, {} generated tokens)", client_request_id_,
                  final_status_, finish_reason_.value_or("-"), prompt_tokens_,
                  stream_ ? stream_->completion_tokens() : 0);
  }
  if (tell_engine) context_->engine->finish(output_->request_id(), reason);
  context_->active_streams.fetch_sub(1);
  bool delete_now = false;
  {
    std::lock_guard<std::mutex> lock(link_->mu);
    link_->done = true;
    delete_now = link_->busy == 0;
    if (delete_now) link_->reactor = nullptr;
  }
  if (delete_now) delete this;
}

}  // namespace

grpc::ServerWriteReactor<grpc::ByteBuffer>* new_generate_reactor(ServingContext* context,
                                                                 grpc::CallbackServerContext* call,
                                                                 v1::GenerateRequest request,
                                                                 const absl::Status& parsed) {
  return new GenerateReactor(context, call, std::move(request), parsed);
}

}  // namespace megaserve::server
