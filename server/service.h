// The megaserve.v1.Megaserve gRPC service on the callback API: one reactor per call, never
// blocking inside a reaction. Generate's reactor (GenerateReactor, generate_reactor.cc) is
// reached by the engine through its RequestOutput's notify hook.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/model/chat_template.h"
#include "engine/model/tokenizer.h"
#include "grpcpp/grpcpp.h"
#include "proto/megaserve.grpc.pb.h"
#include "server/metrics.h"
#include "server/request_validation.h"
#include "server/tokenizer_pool.h"

namespace megaserve::server {

// What every call needs; outlives the gRPC server.
struct ServingContext {
  engine::Engine* engine = nullptr;
  const engine::Tokenizer* tokenizer = nullptr;
  // Generate's text prompts and Tokenize run here, off gRPC's threads; null: inline.
  TokenizerPool* tokenizer_pool = nullptr;
  Metrics* metrics = nullptr;
  v1::ModelInfo model_info;
  RequestLimits limits;
  std::vector<int32_t> eos_token_ids;
  // Chat's template (null: Chat gets FAILED_PRECONDITION) and its bos_token / eos_token.
  std::shared_ptr<const engine::ChatTemplate> chat_template;
  std::optional<std::string> bos_token;
  std::optional<std::string> eos_token;
  // Set on SIGTERM: new Generate calls get UNAVAILABLE.
  std::atomic<bool> draining{false};
  // Generate reactors alive (created, not yet OnDone).
  std::atomic<int64_t> active_streams{0};
};

grpc::Status to_grpc_status(const absl::Status& status);

// Every method takes and returns raw bytes and parses them itself (server/raw_messages.h):
// a request gRPC could not parse would otherwise get UNIMPLEMENTED with no details.
using RawMegaserveService = v1::Megaserve::WithRawCallbackMethod_Generate<
    v1::Megaserve::WithRawCallbackMethod_Chat<v1::Megaserve::WithRawCallbackMethod_GetModelInfo<
        v1::Megaserve::WithRawCallbackMethod_Tokenize<
            v1::Megaserve::WithRawCallbackMethod_Detokenize<v1::Megaserve::Service>>>>>;

class MegaserveService final : public RawMegaserveService {
 public:
  explicit MegaserveService(ServingContext* context) : context_(context) {}

  // Responses: serialized v1::GenerateResponse.
  grpc::ServerWriteReactor<grpc::ByteBuffer>* Generate(grpc::CallbackServerContext* call,
                                                       const grpc::ByteBuffer* request) override;
  // Renders the chat template, then runs as Generate on the text (no BOS added).
  grpc::ServerWriteReactor<grpc::ByteBuffer>* Chat(grpc::CallbackServerContext* call,
                                                   const grpc::ByteBuffer* request) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* call,
                                         const grpc::ByteBuffer* request,
                                         grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* call,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* call,
                                       const grpc::ByteBuffer* request,
                                       grpc::ByteBuffer* response) override;

 private:
  ServingContext* context_;
};

// Defined in generate_reactor.cc. A request that did not parse (`parsed` not OK) is
// rejected with that status, and counted in the metrics like any other rejection.
grpc::ServerWriteReactor<grpc::ByteBuffer>* new_generate_reactor(ServingContext* context,
                                                                 grpc::CallbackServerContext* call,
                                                                 v1::GenerateRequest request,
                                                                 const absl::Status& parsed);

// Chat's request as the Generate request it runs: the template rendered with the generation
// prompt, as text without an added BOS. FailedPrecondition when `context` has no template,
// InvalidArgument for no messages or a list the template rejects.
absl::StatusOr<v1::GenerateRequest> chat_to_generate_request(const ServingContext& context,
                                                             const v1::ChatRequest& request);

}  // namespace megaserve::server
