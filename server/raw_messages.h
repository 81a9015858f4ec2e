// Request bytes parsed by the service itself, not by gRPC. When gRPC's own deserialization
// fails (bytes that are not protobuf, a proto3 string that is not UTF-8), the callback API
// answers UNIMPLEMENTED with no details and protobuf logs an unprefixed error line; parsing
// here turns that into INVALID_ARGUMENT saying what is wrong. Also routes protobuf's log
// through spdlog.
#pragma once

#include "absl/status/status.h"
#include "google/protobuf/message.h"
#include "grpcpp/support/byte_buffer.h"

namespace megaserve::server {

// Parses `bytes` into `message`. InvalidArgument naming the message type, and protobuf's
// own complaint when it has one (e.g. "String field 'megaserve.v1.TokenizeRequest.text'
// contains invalid UTF-8 data ..."); that complaint is not logged.
absl::Status parse_request(const grpc::ByteBuffer& bytes, google::protobuf::Message* message);

grpc::ByteBuffer serialize_response(const google::protobuf::Message& message);

// Sends protobuf's log lines to spdlog (with a "protobuf:" prefix) instead of stderr.
// Idempotent; the first call must precede concurrent parsing (protobuf's rule).
void route_protobuf_log_to_spdlog();

}  // namespace megaserve::server
