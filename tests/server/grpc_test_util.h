// Client-side helpers shared by the server suites: run a Generate stream to its end,
// scrape and parse the metrics page, ask the health and reflection services.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "grpcpp/grpcpp.h"
#include "proto/health.grpc.pb.h"
#include "proto/megaserve.grpc.pb.h"

namespace megaserve::testing {

struct StreamResult {
  grpc::Status status;
  std::vector<int32_t> token_ids;
  std::string text;
  std::vector<v1::GenerateResponse> messages;
  v1::GenerateResponse last;  // the message with finish_reason, if any
};

// Reads the whole stream; `context` may carry a deadline.
StreamResult generate(v1::Megaserve::Stub& stub, const v1::GenerateRequest& request,
                      grpc::ClientContext* context = nullptr);

std::unique_ptr<v1::Megaserve::Stub> connect(int port);

// GET /metrics on 127.0.0.1:`port`, parsed into "name{labels}" -> value. Fails the test
// (ADD_FAILURE) on a line that is not valid Prometheus text.
std::map<std::string, double> scrape_metrics(int port);

// grpc.health.v1.Health/Check(`service`) on 127.0.0.1:`port`; UNKNOWN when the call fails
// (NOT_FOUND for a service the server does not know).
grpc::health::v1::HealthCheckResponse::ServingStatus health(int port,
                                                            const std::string& service = "");

// Calls /megaserve.v1.Megaserve/`method` with `bytes` as the request, as they are (a client
// that sends what it likes); reads a Generate stream to its end. The call's final status.
grpc::Status raw_call(int port, const std::string& method, const std::string& bytes);

// The service names grpc.reflection.v1alpha.ServerReflection lists (list_services), and
// whether it can return the file that defines `symbol` (file_containing_symbol).
std::vector<std::string> reflection_services(int port);
bool reflection_describes(int port, const std::string& symbol);

}  // namespace megaserve::testing
