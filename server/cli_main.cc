// megaserve-cli: a command-line client for a megaserve server.
//   megaserve-cli "Once upon a time" --max_tokens=64 --temperature=0   stream the text
//   echo "prompt" | megaserve-cli --json                              print every chunk as JSON
//   megaserve-cli --chat "What is the capital of France?"            one user message, through
//                                                                     the model's chat template
//   megaserve-cli --info | --tokenize "text" | --health
// --health exits 0 when the server reports SERVING, 1 otherwise (for container health checks).
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <iostream>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "google/protobuf/util/json_util.h"
#include "grpcpp/grpcpp.h"
#include "proto/health.grpc.pb.h"
#include "proto/megaserve.grpc.pb.h"
#include "server/flag_spelling.h"
#include "server/status_code_name.h"

ABSL_FLAG(std::string, server, "localhost:50051", "the megaserve gRPC address");
ABSL_FLAG(bool, json, false, "print each streamed message as one JSON line");
ABSL_FLAG(bool, info, false, "print the model information and exit");
ABSL_FLAG(bool, chat, false,
          "send the prompt as one user message through the Chat RPC (the model's chat "
          "template); --add_bos does not apply");
ABSL_FLAG(bool, tokenize, false, "print the prompt's token ids and exit");
ABSL_FLAG(bool, health, false, "check grpc.health.v1; exit 0 when SERVING");
ABSL_FLAG(double, timeout_seconds, 0, "deadline of the call; 0 is none");
ABSL_FLAG(bool, add_bos, true, "prepend BOS to the prompt");
ABSL_FLAG(std::optional<float>, temperature, std::nullopt, "0 is greedy; server default 1");
ABSL_FLAG(std::optional<float>, top_p, std::nullopt, "nucleus sampling mass, (0, 1]");
ABSL_FLAG(std::optional<int32_t>, top_k, std::nullopt, "keep the k most likely tokens; 0 off");
ABSL_FLAG(std::optional<float>, min_p, std::nullopt, "drop tokens below min_p x the best");
ABSL_FLAG(std::optional<float>, repetition_penalty, std::nullopt, "(0, 10], 1 is off");
ABSL_FLAG(std::optional<float>, frequency_penalty, std::nullopt, "[-2, 2]");
ABSL_FLAG(std::optional<float>, presence_penalty, std::nullopt, "[-2, 2]");
ABSL_FLAG(std::optional<uint64_t>, seed, std::nullopt, "sampling seed");
ABSL_FLAG(int32_t, max_tokens, 128, "tokens to generate at most");
ABSL_FLAG(std::optional<int32_t>, min_tokens, std::nullopt, "tokens before EOS may end it");
ABSL_FLAG(std::vector<std::string>, stop, {}, "stop strings, comma-separated");
ABSL_FLAG(std::vector<std::string>, stop_token_ids, {}, "stop token ids, comma-separated");
ABSL_FLAG(bool, ignore_eos, false, "keep generating after EOS");
ABSL_FLAG(std::optional<int32_t>, logprobs, std::nullopt, "top-N logprobs per token (JSON)");
ABSL_FLAG(std::string, request_id, "", "a client request id, echoed back");

namespace megaserve::server {
namespace {

template <typename T, typename Setter>
void set_if(const absl::Flag<std::optional<T>>& flag, Setter set) {
  if (const std::optional<T> value = absl::GetFlag(flag)) set(*value);
}

void set_deadline(grpc::ClientContext* context) {
  if (const double t = absl::GetFlag(FLAGS_timeout_seconds); t > 0) {
    context->set_deadline(std::chrono::system_clock::now() +
                          std::chrono::milliseconds(static_cast<int64_t>(t * 1000)));
  }
}

int report(const grpc::Status& status) {
  std::cerr << "megaserve-cli: " << megaserve::server::status_code_name(status.error_code()) << ": "
            << status.error_message() << "\n";
  return 1;
}

std::string to_json(const google::protobuf::Message& message) {
  std::string out;
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(message, &out, options);
  return out;
}

int run(int argc, char** argv) {
  // --help lists this program's flags (Abseil's default matches the program's file name).
  absl::FlagsUsageConfig usage_config;
  usage_config.contains_help_flags = [](absl::string_view file) {
    return absl::StrContains(file, "server/cli_main");
  };
  usage_config.contains_helpshort_flags = usage_config.contains_help_flags;
  absl::SetFlagsUsageConfig(usage_config);
  absl::SetProgramUsageMessage(
      "[--chat] [PROMPT...] [--max_tokens=N --temperature=T ...] | --info | --tokenize "
      "PROMPT | --health");
  FlagSpelling spelling(argc, argv);
  std::vector<char*> positional = absl::ParseCommandLine(spelling.argc(), spelling.argv());
  auto channel =
      grpc::CreateChannel(absl::GetFlag(FLAGS_server), grpc::InsecureChannelCredentials());

  if (absl::GetFlag(FLAGS_health)) {
    auto stub = grpc::health::v1::Health::NewStub(channel);
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    grpc::health::v1::HealthCheckResponse response;
    const grpc::Status status =
        stub->Check(&context, grpc::health::v1::HealthCheckRequest(), &response);
    if (!status.ok()) return report(status);
    std::cout << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status())
              << "\n";
    return response.status() == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 1;
  }

  auto stub = v1::Megaserve::NewStub(channel);
  if (absl::GetFlag(FLAGS_info)) {
    grpc::ClientContext context;
    set_deadline(&context);
    v1::ModelInfo info;
    const grpc::Status status = stub->GetModelInfo(&context, v1::GetModelInfoRequest(), &info);
    if (!status.ok()) return report(status);
    std::cout << to_json(info) << "\n";
    return 0;
  }

  std::string prompt;
  if (positional.size() > 1) {
    std::vector<std::string> words(positional.begin() + 1, positional.end());
    prompt = absl::StrJoin(words, " ");
  } else if (!isatty(STDIN_FILENO)) {
    prompt.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
  }
  if (prompt.empty()) {
    std::cerr << "megaserve-cli: give a prompt as arguments or on stdin (--help for more)\n";
    return 2;
  }

  if (absl::GetFlag(FLAGS_tokenize)) {
    grpc::ClientContext context;
    set_deadline(&context);
    v1::TokenizeRequest request;
    request.set_text(prompt);
    request.set_add_bos(absl::GetFlag(FLAGS_add_bos));
    v1::TokenizeResponse response;
    const grpc::Status status = stub->Tokenize(&context, request, &response);
    if (!status.ok()) return report(status);
    std::cout << absl::StrJoin(response.token_ids(), " ") << "\n";
    return 0;
  }

  v1::GenerateRequest request;
  request.set_text(prompt);
  request.set_add_bos(absl::GetFlag(FLAGS_add_bos));
  request.set_request_id(absl::GetFlag(FLAGS_request_id));
  v1::SamplingParameters* p = request.mutable_params();
  set_if(FLAGS_temperature, [p](float v) { p->set_temperature(v); });
  set_if(FLAGS_top_p, [p](float v) { p->set_top_p(v); });
  set_if(FLAGS_top_k, [p](int32_t v) { p->set_top_k(v); });
  set_if(FLAGS_min_p, [p](float v) { p->set_min_p(v); });
  set_if(FLAGS_repetition_penalty, [p](float v) { p->set_repetition_penalty(v); });
  set_if(FLAGS_frequency_penalty, [p](float v) { p->set_frequency_penalty(v); });
  set_if(FLAGS_presence_penalty, [p](float v) { p->set_presence_penalty(v); });
  set_if(FLAGS_seed, [p](uint64_t v) { p->set_seed(v); });
  set_if(FLAGS_min_tokens, [p](int32_t v) { p->set_min_tokens(v); });
  set_if(FLAGS_logprobs, [p](int32_t v) { p->set_logprobs(v); });
  p->set_max_tokens(absl::GetFlag(FLAGS_max_tokens));
  for (const std::string& s : absl::GetFlag(FLAGS_stop)) p->add_stop(s);
  for (const std::string& s : absl::GetFlag(FLAGS_stop_token_ids)) {
    int32_t id = 0;
    if (!absl::SimpleAtoi(s, &id)) {
      std::cerr << "megaserve-cli: --stop_token_ids: \"" << s << "\" is not an integer\n";
      return 2;
    }
    p->add_stop_token_ids(id);
  }
  if (absl::GetFlag(FLAGS_ignore_eos)) p->set_ignore_eos(true);

  grpc::ClientContext context;
  set_deadline(&context);
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader;
  if (absl::GetFlag(FLAGS_chat)) {
    v1::ChatRequest chat;
    v1::ChatMessage* message = chat.add_messages();
    message->set_role("user");
    message->set_content(prompt);
    *chat.mutable_params() = request.params();
    chat.set_request_id(request.request_id());
    reader = stub->Chat(&context, chat);
  } else {
    reader = stub->Generate(&context, request);
  }
  v1::GenerateResponse response;
  const bool json = absl::GetFlag(FLAGS_json);
  v1::GenerateResponse last;
  while (reader->Read(&response)) {
    if (json) {
      std::cout << to_json(response) << std::endl;
    } else {
      std::cout << response.text() << std::flush;
    }
    if (response.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) last = response;
  }
  const grpc::Status status = reader->Finish();
  if (!json) std::cout << "\n";
  if (!status.ok()) return report(status);
  if (!json) {
    std::cerr << "[" << v1::FinishReason_Name(last.finish_reason()) << ", "
              << last.usage().prompt_tokens() << " prompt + " << last.usage().completion_tokens()
              << " generated tokens, " << last.timings().total_seconds() << " s]\n";
  }
  return 0;
}

}  // namespace
}  // namespace megaserve::server

int main(int argc, char** argv) { return megaserve::server::run(argc, argv); }
