#include "bench/sharegpt_runner.h"

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "bench/sharegpt_arrivals.h"
#include "grpcpp/grpcpp.h"

namespace megaserve::bench {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_between(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

// One Generate stream. Reactions run on gRPC's threads; `on_done` is called once, after
// `result` is complete, and the call deletes itself.
class StreamCall final : public grpc::ClientReadReactor<v1::GenerateResponse> {
 public:
  // Times in `result` count from `run_start`.
  StreamCall(const BenchRequest& request, RequestResult* result, Clock::time_point run_start,
             std::function<void()> on_done)
      : request_(make_generate_request(request)),
        result_(result),
        on_done_(std::move(on_done)),
        run_start_(run_start) {
    result_->prompt_len = request.prompt_len;
  }

  void start(v1::Megaserve::Stub* stub) {
    sent_ = Clock::now();
    last_ = sent_;
    result_->send_time = seconds_between(run_start_, sent_);
    stub->async()->Generate(&context_, &request_, this);
    StartRead(&response_);
    StartCall();
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // the stream ended; OnDone follows
    const Clock::time_point now = Clock::now();
    if (response_.token_ids_size() > 0) {
      if (result_->output_tokens == 0) {
        result_->ttft = seconds_between(sent_, now);
      } else {
        result_->itl.push_back(seconds_between(last_, now));
      }
      last_ = now;
      result_->output_tokens += response_.token_ids_size();
      result_->token_times.insert(result_->token_times.end(), response_.token_ids_size(),
                                  seconds_between(run_start_, now));
    }
    if (response_.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
      finish_reason_ = response_.finish_reason();
      result_->usage_prompt_tokens = response_.usage().prompt_tokens();
      result_->usage_completion_tokens = response_.usage().completion_tokens();
    }
    StartRead(&response_);
  }

  void OnDone(const grpc::Status& status) override {
    result_->latency = seconds_between(sent_, last_);
    if (!status.ok()) {
      result_->error = absl::StrCat("status ", status.error_code(), ": ", status.error_message());
    } else if (finish_reason_ == v1::FINISH_REASON_UNSPECIFIED) {
      result_->error = "the stream ended without a finish reason";
    } else if (finish_reason_ == v1::FINISH_REASON_ABORT) {
      result_->error = "aborted by the server";
    } else {
      result_->success = true;
    }
    std::function<void()> on_done = std::move(on_done_);
    delete this;
    on_done();
  }

 private:
  grpc::ClientContext context_;
  v1::GenerateRequest request_;
  v1::GenerateResponse response_;
  RequestResult* result_;
  std::function<void()> on_done_;
  Clock::time_point run_start_;
  Clock::time_point sent_;
  Clock::time_point last_;
  v1::FinishReason finish_reason_ = v1::FINISH_REASON_UNSPECIFIED;
};

void draw_progress(int done, int failed, int total) {
  const int width = 40;
  const int filled = total > 0 ? done * width / total : width;
  std::fprintf(stderr, "\r[%s%s] %d/%d%s", std::string(filled, '#').c_str(),
               std::string(width - filled, ' ').c_str(), done, total,
               failed > 0 ? absl::StrCat(" (", failed, " failed)").c_str() : "");
  if (done == total) std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

}  // namespace

v1::GenerateRequest make_generate_request(const BenchRequest& request) {
  v1::GenerateRequest out;
  out.set_text(request.prompt);
  out.set_add_bos(true);
  v1::SamplingParameters* params = out.mutable_params();
  params->set_temperature(0.0f);
  params->set_max_tokens(request.output_len);
  params->set_ignore_eos(true);
  return out;
}

RequestResult run_one(v1::Megaserve::Stub* stub, const BenchRequest& request) {
  RunOptions options;
  options.progress = false;
  return run_benchmark(stub, {request}, options).results.front();
}

RunResult run_benchmark(v1::Megaserve::Stub* stub, const std::vector<BenchRequest>& requests,
                        const RunOptions& options) {
  RunResult run;
  run.results.resize(requests.size());
  const int total = static_cast<int>(requests.size());
  const std::vector<double> arrivals =
      arrival_times(total, options.request_rate, options.burstiness, options.seed);

  // Shared with the completion callbacks, which may still be returning when the last one
  // has woken this thread.
  struct Progress {
    std::mutex mu;
    std::condition_variable cv;
    int in_flight = 0;
    int done = 0;
    int failed = 0;
    Clock::time_point last_done;
  };
  auto progress = std::make_shared<Progress>();
  if (options.progress) draw_progress(0, 0, total);

  const Clock::time_point start = Clock::now();
  run.start = start;
  for (int i = 0; i < total; ++i) {
    std::this_thread::sleep_until(start + std::chrono::duration_cast<Clock::duration>(
                                              std::chrono::duration<double>(arrivals[i])));
    {
      std::unique_lock<std::mutex> lock(progress->mu);
      progress->cv.wait(lock, [&] {
        return options.max_concurrency <= 0 || progress->in_flight < options.max_concurrency;
      });
      ++progress->in_flight;
    }
    RequestResult* result = &run.results[i];
    const bool show = options.progress;
    auto* call = new StreamCall(requests[i], result, start, [progress, result, show, total] {
      std::lock_guard<std::mutex> lock(progress->mu);
      --progress->in_flight;
      ++progress->done;
      if (!result->success) ++progress->failed;
      progress->last_done = Clock::now();
      if (show) draw_progress(progress->done, progress->failed, total);
      progress->cv.notify_all();
    });
    call->start(stub);
  }
  std::unique_lock<std::mutex> lock(progress->mu);
  progress->cv.wait(lock, [&] { return progress->done == total; });
  run.duration_s = total > 0 ? seconds_between(start, progress->last_done) : 0;
  return run;
}

}  // namespace megaserve::bench
