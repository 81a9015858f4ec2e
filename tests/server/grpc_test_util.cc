#include "tests/server/grpc_test_util.h"

#include <regex>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "google/protobuf/unknown_field_set.h"
#include "grpcpp/impl/codegen/client_unary_call.h"
#include "grpcpp/impl/codegen/sync_stream.h"
#include "gtest/gtest.h"
#include "httplib.h"

namespace megaserve::testing {

StreamResult generate(v1::Megaserve::Stub& stub, const v1::GenerateRequest& request,
                      grpc::ClientContext* context) {
  grpc::ClientContext local;
  if (context == nullptr) context = &local;
  StreamResult result;
  auto reader = stub.Generate(context, request);
  v1::GenerateResponse response;
  while (reader->Read(&response)) {
    result.token_ids.insert(result.token_ids.end(), response.token_ids().begin(),
                            response.token_ids().end());
    result.text += response.text();
    if (response.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) result.last = response;
    result.messages.push_back(response);
  }
  result.status = reader->Finish();
  return result;
}

std::unique_ptr<v1::Megaserve::Stub> connect(int port) {
  return v1::Megaserve::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
}

std::map<std::string, double> scrape_metrics(int port) {
  httplib::Client client("127.0.0.1", port);
  auto response = client.Get("/metrics");
  std::map<std::string, double> values;
  if (!response || response->status != 200) {
    ADD_FAILURE() << "GET /metrics on port " << port << " failed";
    return values;
  }
  EXPECT_NE(response->get_header_value("Content-Type").find("text/plain"), std::string::npos);
  // name{label="value",...} number
  static const std::regex kSample(
      R"(^([a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"]*",?)*\})?) (\S+)$)");
  static const std::regex kComment(R"(^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+$)");
  for (absl::string_view line : absl::StrSplit(response->body, '\n', absl::SkipEmpty())) {
    const std::string text(line);
    std::smatch match;
    if (std::regex_match(text, kComment)) continue;
    if (!std::regex_match(text, match, kSample)) {
      ADD_FAILURE() << "not a Prometheus sample line: " << text;
      continue;
    }
    double value = 0;
    if (match[4] == "+Inf") {
      value = INFINITY;
    } else if (!absl::SimpleAtod(match[4].str(), &value)) {
      ADD_FAILURE() << "bad value in: " << text;
    }
    values[match[1]] = value;
  }
  return values;
}

grpc::health::v1::HealthCheckResponse::ServingStatus health(int port, const std::string& service) {
  auto stub = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) return grpc::health::v1::HealthCheckResponse::UNKNOWN;
  return response.status();
}

grpc::Status raw_call(int port, const std::string& method, const std::string& bytes) {
  auto channel =
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials());
  const std::string path = absl::StrCat("/megaserve.v1.Megaserve/", method);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::Slice slice(bytes);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  if (method != "Generate") {
    grpc::internal::RpcMethod rpc(path.c_str(), grpc::internal::RpcMethod::NORMAL_RPC, channel);
    return grpc::internal::BlockingUnaryCall<grpc::ByteBuffer, grpc::ByteBuffer>(
        channel.get(), rpc, &context, request, &response);
  }
  grpc::internal::RpcMethod rpc(path.c_str(), grpc::internal::RpcMethod::SERVER_STREAMING, channel);
  std::unique_ptr<grpc::ClientReader<grpc::ByteBuffer>> reader(
      grpc::internal::ClientReaderFactory<grpc::ByteBuffer>::Create(channel.get(), rpc, &context,
                                                                    request));
  while (reader->Read(&response)) {
  }
  return reader->Finish();
}

namespace {

// One request/response exchange on the reflection stream, as raw protobuf bytes (the
// reflection protos' generated code is not installed, only their wire format is needed).
std::string reflection_call(int port, const std::string& request_bytes) {
  auto channel =
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials());
  grpc::internal::RpcMethod method("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                   grpc::internal::RpcMethod::BIDI_STREAMING, channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  std::unique_ptr<grpc::ClientReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>> stream(
      grpc::internal::ClientReaderWriterFactory<grpc::ByteBuffer, grpc::ByteBuffer>::Create(
          channel.get(), method, &context));
  grpc::Slice slice(request_bytes);
  grpc::ByteBuffer request(&slice, 1);
  stream->Write(request);
  stream->WritesDone();
  grpc::ByteBuffer response;
  std::string out;
  if (stream->Read(&response)) {
    std::vector<grpc::Slice> slices;
    (void)response.Dump(&slices);
    for (const grpc::Slice& s : slices) {
      out.append(reinterpret_cast<const char*>(s.begin()), s.size());
    }
  }
  (void)stream->Finish();
  return out;
}

// A length-delimited string field (length < 128).
std::string string_field(int number, const std::string& value) {
  return std::string{static_cast<char>((number << 3) | 2), static_cast<char>(value.size())} + value;
}

}  // namespace

// The length-delimited fields numbered `number` of a serialized message.
std::vector<std::string> submessages(const std::string& bytes, int number) {
  google::protobuf::UnknownFieldSet fields;
  std::vector<std::string> out;
  if (!fields.ParseFromString(bytes)) return out;
  for (int i = 0; i < fields.field_count(); ++i) {
    const google::protobuf::UnknownField& f = fields.field(i);
    if (f.number() == number && f.type() == google::protobuf::UnknownField::TYPE_LENGTH_DELIMITED) {
      out.push_back(f.length_delimited());
    }
  }
  return out;
}

std::vector<std::string> reflection_services(int port) {
  // ServerReflectionRequest.list_services = 7; ServerReflectionResponse.list_services_response
  // = 6 { repeated ServiceResponse service = 1 { string name = 1 } }
  const std::string bytes = reflection_call(port, string_field(7, "*"));
  std::vector<std::string> names;
  for (const std::string& list : submessages(bytes, 6)) {
    for (const std::string& service : submessages(list, 1)) {
      for (const std::string& name : submessages(service, 1)) names.push_back(name);
    }
  }
  return names;
}

bool reflection_describes(int port, const std::string& symbol) {
  // ServerReflectionRequest.file_containing_symbol = 4; the answer is
  // file_descriptor_response = 4 { repeated bytes file_descriptor_proto = 1 }, or
  // error_response = 7.
  const std::string bytes = reflection_call(port, string_field(4, symbol));
  if (!submessages(bytes, 7).empty()) return false;
  const std::string last = symbol.substr(symbol.rfind('.') + 1);
  for (const std::string& files : submessages(bytes, 4)) {
    for (const std::string& file : submessages(files, 1)) {
      if (file.find(last) != std::string::npos) return true;
    }
  }
  return false;
}

}  // namespace megaserve::testing
