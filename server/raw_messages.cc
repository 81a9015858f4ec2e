#include "server/raw_messages.h"

#include <mutex>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/stubs/logging.h"
#include "spdlog/spdlog.h"

namespace megaserve::server {
namespace {

// Set while this thread parses a request: protobuf's complaints go into the reply instead
// of the log (any client could otherwise fill the log).
thread_local std::string* parse_complaints = nullptr;

void log_to_spdlog(google::protobuf::LogLevel level, const char* file, int line,
                   const std::string& message) {
  if (parse_complaints != nullptr) {
    absl::StrAppend(parse_complaints, parse_complaints->empty() ? "" : "; ",
                    absl::StripAsciiWhitespace(message));
    return;
  }
  const spdlog::level::level_enum spd =
      level == google::protobuf::LOGLEVEL_INFO      ? spdlog::level::info
      : level == google::protobuf::LOGLEVEL_WARNING ? spdlog::level::warn
                                                    : spdlog::level::err;
  spdlog::log(spd, "protobuf: {}:{}: {}", file, line, message);
}

}  // namespace

absl::Status parse_request(const grpc::ByteBuffer& bytes, google::protobuf::Message* message) {
  std::vector<grpc::Slice> slices;
  std::string data;
  if (bytes.Valid() && bytes.Dump(&slices).ok()) {
    for (const grpc::Slice& slice : slices) {
      data.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
    }
  }
  std::string complaints;
  parse_complaints = &complaints;
  const bool parsed = message->ParseFromString(data);
  parse_complaints = nullptr;
  if (parsed) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "the request is not a valid ", message->GetTypeName(), ": ",
      complaints.empty() ? "its bytes are not a protobuf message of that type" : complaints));
}

grpc::ByteBuffer serialize_response(const google::protobuf::Message& message) {
  grpc::Slice slice(message.SerializeAsString());
  return grpc::ByteBuffer(&slice, 1);
}

void route_protobuf_log_to_spdlog() {
  static std::once_flag once;
  std::call_once(once, [] { google::protobuf::SetLogHandler(&log_to_spdlog); });
}

}  // namespace megaserve::server
