#include "server/service.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace megaserve::server {

grpc::Status to_grpc_status(const absl::Status& status) {
  // absl::StatusCode and grpc::StatusCode share their numbering (both follow
  // google.rpc.Code).
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

grpc::ServerWriteReactor<v1::GenerateResponse>* MegaserveService::Generate(
    grpc::CallbackServerContext* call, const v1::GenerateRequest* request) {
  return new_generate_reactor(context_, call, *request);
}

grpc::ServerUnaryReactor* MegaserveService::GetModelInfo(grpc::CallbackServerContext* call,
                                                         const v1::GetModelInfoRequest*,
                                                         v1::ModelInfo* response) {
  *response = context_->model_info;
  const engine::EngineStats stats = context_->engine->stats();
  if (stats.kv_blocks_total > 0) response->set_num_kv_blocks(stats.kv_blocks_total);
  auto* reactor = call->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* MegaserveService::Tokenize(grpc::CallbackServerContext* call,
                                                     const v1::TokenizeRequest* request,
                                                     v1::TokenizeResponse* response) {
  const bool add_bos = request->has_add_bos() ? request->add_bos() : true;
  for (int32_t id : context_->tokenizer->encode(request->text(), add_bos)) {
    response->add_token_ids(id);
  }
  auto* reactor = call->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* MegaserveService::Detokenize(grpc::CallbackServerContext* call,
                                                       const v1::DetokenizeRequest* request,
                                                       v1::DetokenizeResponse* response) {
  auto* reactor = call->DefaultReactor();
  const std::vector<int32_t> ids(request->token_ids().begin(), request->token_ids().end());
  auto text = context_->tokenizer->decode(ids);
  if (!text.ok()) {
    reactor->Finish(to_grpc_status(text.status()));
    return reactor;
  }
  response->set_text(*std::move(text));
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace megaserve::server
