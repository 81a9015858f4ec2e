// The megaserve.v1.Megaserve gRPC service on the callback API: one reactor per call, never
// blocking inside a reaction. Generate's reactor (GenerateReactor, generate_reactor.cc) is
// reached by the engine through its RequestOutput's notify hook.
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

#include "engine/engine.h"
#include "engine/model/tokenizer.h"
#include "grpcpp/grpcpp.h"
#include "proto/megaserve.grpc.pb.h"
#include "server/metrics.h"
#include "server/request_validation.h"

namespace megaserve::server {

// What every call needs; outlives the gRPC server.
struct ServingContext {
  engine::Engine* engine = nullptr;
  const engine::Tokenizer* tokenizer = nullptr;
  Metrics* metrics = nullptr;
  v1::ModelInfo model_info;
  RequestLimits limits;
  std::vector<int32_t> eos_token_ids;
  // Set on SIGTERM: new Generate calls get UNAVAILABLE.
  std::atomic<bool> draining{false};
  // Generate reactors alive (created, not yet OnDone).
  std::atomic<int64_t> active_streams{0};
};

grpc::Status to_grpc_status(const absl::Status& status);

class MegaserveService final : public v1::Megaserve::CallbackService {
 public:
  explicit MegaserveService(ServingContext* context) : context_(context) {}

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* call, const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* call,
                                         const v1::GetModelInfoRequest* request,
                                         v1::ModelInfo* response) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* call,
                                     const v1::TokenizeRequest* request,
                                     v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* call,
                                       const v1::DetokenizeRequest* request,
                                       v1::DetokenizeResponse* response) override;

 private:
  ServingContext* context_;
};

// Defined in generate_reactor.cc.
grpc::ServerWriteReactor<v1::GenerateResponse>* new_generate_reactor(
    ServingContext* context, grpc::CallbackServerContext* call, const v1::GenerateRequest& request);

}  // namespace megaserve::server
