#include "server/service.h"

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/raw_messages.h"

namespace megaserve::server {
namespace {

// A unary call on raw bytes: parse the request, run `handle(request, &response)`, send the
// response's bytes.
template <typename Request, typename Response, typename Handle>
grpc::ServerUnaryReactor* unary(grpc::CallbackServerContext* call, const grpc::ByteBuffer* in,
                                grpc::ByteBuffer* out, Handle handle) {
  grpc::ServerUnaryReactor* reactor = call->DefaultReactor();
  Request request;
  if (absl::Status parsed = parse_request(*in, &request); !parsed.ok()) {
    reactor->Finish(to_grpc_status(parsed));
    return reactor;
  }
  Response response;
  const grpc::Status status = handle(request, &response);
  if (status.ok()) *out = serialize_response(response);
  reactor->Finish(status);
  return reactor;
}

}  // namespace

grpc::Status to_grpc_status(const absl::Status& status) {
  // absl::StatusCode and grpc::StatusCode share their numbering (both follow
  // google.rpc.Code).
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* MegaserveService::Generate(
    grpc::CallbackServerContext* call, const grpc::ByteBuffer* request) {
  v1::GenerateRequest parsed_request;
  const absl::Status parsed = parse_request(*request, &parsed_request);
  return new_generate_reactor(context_, call, std::move(parsed_request), parsed);
}

absl::StatusOr<v1::GenerateRequest> chat_to_generate_request(const ServingContext& context,
                                                             const v1::ChatRequest& request) {
  if (context.chat_template == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("model ", context.model_info.name(),
                     " has no chat template (GGUF tokenizer.chat_template or tokenizer_config.json "
                     "chat_template); use Generate with a text prompt"));
  }
  if (request.messages().empty()) {
    return absl::InvalidArgumentError("messages: at least one message is required");
  }
  engine::ChatTemplateInputs inputs;
  for (const v1::ChatMessage& m : request.messages()) {
    inputs.messages.push_back({m.role(), m.content()});
  }
  inputs.add_generation_prompt = true;
  inputs.bos_token = context.bos_token;
  inputs.eos_token = context.eos_token;
  auto prompt = context.chat_template->render(inputs);
  if (!prompt.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("messages: the chat template refused them: ", prompt.status().message()));
  }
  v1::GenerateRequest out;
  out.set_text(*std::move(prompt));
  // The template writes the special tokens the model needs, as transformers'
  // apply_chat_template(tokenize=True) does, which adds none.
  out.set_add_bos(false);
  *out.mutable_params() = request.params();
  out.set_request_id(request.request_id());
  out.set_priority(request.priority());
  return out;
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* MegaserveService::Chat(
    grpc::CallbackServerContext* call, const grpc::ByteBuffer* request) {
  v1::ChatRequest chat;
  absl::Status status = parse_request(*request, &chat);
  v1::GenerateRequest generate;
  if (status.ok()) {
    auto rendered = chat_to_generate_request(*context_, chat);
    if (rendered.ok()) {
      generate = *std::move(rendered);
    } else {
      status = rendered.status();
      generate.set_request_id(chat.request_id());
    }
  }
  return new_generate_reactor(context_, call, std::move(generate), status);
}

grpc::ServerUnaryReactor* MegaserveService::GetModelInfo(grpc::CallbackServerContext* call,
                                                         const grpc::ByteBuffer* request,
                                                         grpc::ByteBuffer* response) {
  return unary<v1::GetModelInfoRequest, v1::ModelInfo>(
      call, request, response, [this](const v1::GetModelInfoRequest&, v1::ModelInfo* info) {
        *info = context_->model_info;
        const engine::EngineStats stats = context_->engine->stats();
        if (stats.kv_blocks_total > 0) info->set_num_kv_blocks(stats.kv_blocks_total);
        return grpc::Status::OK;
      });
}

grpc::ServerUnaryReactor* MegaserveService::Tokenize(grpc::CallbackServerContext* call,
                                                     const grpc::ByteBuffer* request,
                                                     grpc::ByteBuffer* response) {
  grpc::ServerUnaryReactor* reactor = call->DefaultReactor();
  auto in = std::make_shared<v1::TokenizeRequest>();
  if (absl::Status parsed = parse_request(*request, in.get()); !parsed.ok()) {
    reactor->Finish(to_grpc_status(parsed));
    return reactor;
  }
  // `response` lives until Finish, which the job calls.
  auto tokenize = [tokenizer = context_->tokenizer, in, reactor, response] {
    v1::TokenizeResponse out;
    const bool add_bos = in->has_add_bos() ? in->add_bos() : true;
    for (int32_t id : tokenizer->encode(in->text(), add_bos)) out.add_token_ids(id);
    *response = serialize_response(out);
    reactor->Finish(grpc::Status::OK);
  };
  if (context_->tokenizer_pool == nullptr) {
    tokenize();
  } else if (!context_->tokenizer_pool->post(in->text().size(), tokenize)) {
    reactor->Finish(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                 "the tokenizer's queue is full; retry later"));
  }
  return reactor;
}

grpc::ServerUnaryReactor* MegaserveService::Detokenize(grpc::CallbackServerContext* call,
                                                       const grpc::ByteBuffer* request,
                                                       grpc::ByteBuffer* response) {
  return unary<v1::DetokenizeRequest, v1::DetokenizeResponse>(
      call, request, response,
      [this](const v1::DetokenizeRequest& in, v1::DetokenizeResponse* out) {
        const std::vector<int32_t> ids(in.token_ids().begin(), in.token_ids().end());
        auto text = context_->tokenizer->decode(ids);
        if (!text.ok()) return to_grpc_status(text.status());
        out->set_text(*std::move(text));
        return grpc::Status::OK;
      });
}

}  // namespace megaserve::server
