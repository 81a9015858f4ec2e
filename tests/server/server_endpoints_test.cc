// The server's listeners, health and drain controls over real loopback gRPC with the fake
// engine (tests/server/fake_engine.h): defects of issue 18 that an outside client found.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <future>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/model/tokenizer.h"
#include "gtest/gtest.h"
#include "server/server.h"
#include "tests/server/fake_engine.h"
#include "tests/server/grpc_test_util.h"
#include "tests/support/assets.h"

namespace megaserve::server {
namespace {

using megaserve::testing::FakeEngine;
using megaserve::testing::FakeEngineOptions;
using megaserve::testing::StreamResult;
using HealthStatus = grpc::health::v1::HealthCheckResponse;

constexpr char kTokenizer[] = "models/stories260K/tok512.model";

struct Started {
  std::unique_ptr<Server> server;
  FakeEngine* engine = nullptr;
};

absl::StatusOr<Started> start(const std::string& grpc_address, const std::string& metrics_address,
                              FakeEngineOptions options = {}) {
  auto tokenizer = engine::Tokenizer::load(megaserve::testing::assets_dir() / kTokenizer);
  if (!tokenizer.ok()) return tokenizer.status();
  Started out;
  auto engine = std::make_unique<FakeEngine>(options);
  out.engine = engine.get();
  ServedModel model =
      megaserve::testing::fake_served_model(std::move(engine), *std::move(tokenizer), 256);
  ServerOptions server_options;
  server_options.grpc_address = grpc_address;
  server_options.metrics_address = metrics_address;
  auto server = Server::start(server_options, std::move(model));
  if (!server.ok()) return server.status();
  out.server = *std::move(server);
  return out;
}

v1::GenerateRequest long_request(int max_tokens) {
  v1::GenerateRequest request;
  request.set_text("Once upon a time");
  request.mutable_params()->set_max_tokens(max_tokens);
  return request;
}

// Scrapes until `key` appears (OnDone, which records, may trail the client) or 2 s pass.
std::map<std::string, double> scrape_until(int port, const std::string& key) {
  std::map<std::string, double> metrics;
  for (int i = 0; i < 2000; ++i) {
    metrics = megaserve::testing::scrape_metrics(port);
    if (metrics.count(key)) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return metrics;
}

class ServerEndpointsTest : public ::testing::Test {
 protected:
  void SetUp() override { MEGASERVE_REQUIRE_ASSET(kTokenizer); }
};

// Both listeners set SO_REUSEPORT: a second server started and took half the traffic.
TEST_F(ServerEndpointsTest, SecondServerOnTheSamePortFailsWithAddressInUse) {
  auto first = start("127.0.0.1:0", "127.0.0.1:0");
  ASSERT_TRUE(first.ok()) << first.status();
  const int grpc_port = first->server->grpc_port();
  const int metrics_port = first->server->metrics_port();

  auto second = start(absl::StrCat("127.0.0.1:", grpc_port), "127.0.0.1:0");
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(second.status().message().find(absl::StrCat("grpc_address 127.0.0.1:", grpc_port,
                                                        ": cannot listen: Address "
                                                        "already in use")),
            std::string::npos)
      << second.status().message();

  second = start("127.0.0.1:0", absl::StrCat("127.0.0.1:", metrics_port));
  ASSERT_FALSE(second.ok());
  EXPECT_NE(second.status().message().find(absl::StrCat("metrics_address 127.0.0.1:", metrics_port,
                                                        ": cannot listen: Address already in use")),
            std::string::npos)
      << second.status().message();

  // The first server still has all of its traffic.
  auto stub = megaserve::testing::connect(grpc_port);
  EXPECT_TRUE(megaserve::testing::generate(*stub, long_request(3)).status.ok());
  EXPECT_EQ(
      scrape_until(
          metrics_port,
          "megaserve_requests_total{status=\"OK\"}")["megaserve_requests_total{status=\"OK\"}"],
      1);
}

TEST_F(ServerEndpointsTest, PortOutOfRangeIsRefusedNotWrapped) {
  auto server = start("127.0.0.1:99999", "");
  ASSERT_FALSE(server.ok());
  EXPECT_EQ(server.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(server.status().message().find("grpc_address must be host:port"), std::string::npos)
      << server.status().message();
  server = start("127.0.0.1:0", "127.0.0.1:65536");
  ASSERT_FALSE(server.ok());
  EXPECT_NE(server.status().message().find("metrics_address"), std::string::npos);
}

TEST_F(ServerEndpointsTest, HealthAnswersForTheServiceNameToo) {
  FakeEngineOptions options;
  options.step_interval = std::chrono::milliseconds(5);
  auto started = start("127.0.0.1:0", "", options);
  ASSERT_TRUE(started.ok()) << started.status();
  Server& server = *started->server;
  EXPECT_EQ(server.metrics_port(), 0);  // metrics off
  EXPECT_EQ(megaserve::testing::health(server.grpc_port(), "megaserve.v1.Megaserve"),
            HealthStatus::SERVING);
  EXPECT_EQ(megaserve::testing::health(server.grpc_port(), "no.such.Service"),
            HealthStatus::UNKNOWN);  // NOT_FOUND
  // A running stream keeps the drain (and the gRPC server) going while health is asked.
  auto stub = megaserve::testing::connect(server.grpc_port());
  grpc::ClientContext context;
  auto reader = stub->Generate(&context, long_request(250));  // 1.25 s of steps
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  std::thread drain([&] { server.drain_and_stop(std::chrono::seconds(10)); });
  HealthStatus::ServingStatus status = HealthStatus::SERVING;
  for (int i = 0; i < 1000 && status == HealthStatus::SERVING; ++i) {
    status = megaserve::testing::health(server.grpc_port(), "megaserve.v1.Megaserve");
  }
  EXPECT_EQ(status, HealthStatus::NOT_SERVING);
  EXPECT_EQ(megaserve::testing::health(server.grpc_port()), HealthStatus::NOT_SERVING);
  while (reader->Read(&response)) {
  }
  EXPECT_TRUE(reader->Finish().ok());
  drain.join();
}

// A passed client deadline was counted as CANCELLED: the client cancels the call itself
// when its deadline passes, before the server's copy of the deadline does.
TEST_F(ServerEndpointsTest, DeadlinesAreCountedAsDeadlineExceeded) {
  FakeEngineOptions options;
  options.step_interval = std::chrono::milliseconds(5);
  auto started = start("127.0.0.1:0", "127.0.0.1:0", options);
  ASSERT_TRUE(started.ok()) << started.status();
  Server& server = *started->server;
  auto stub = megaserve::testing::connect(server.grpc_port());
  constexpr int kCalls = 4;
  for (int i = 0; i < kCalls; ++i) {
    // Waiting (paused engine) and streaming: both end by the deadline.
    started->engine->set_paused(i % 2 == 0);
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(100));
    const StreamResult r = megaserve::testing::generate(*stub, long_request(250), &context);
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  }
  started->engine->set_paused(false);
  const std::string deadline = "megaserve_requests_total{status=\"DEADLINE_EXCEEDED\"}";
  const std::string cancelled = "megaserve_requests_total{status=\"CANCELLED\"}";
  std::map<std::string, double> metrics;
  for (int i = 0; i < 2000; ++i) {
    metrics = megaserve::testing::scrape_metrics(server.metrics_port());
    const double ended = (metrics.count(deadline) ? metrics.at(deadline) : 0) +
                         (metrics.count(cancelled) ? metrics.at(cancelled) : 0);
    if (ended == kCalls) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(metrics[deadline], kCalls);
  EXPECT_EQ(metrics.count(cancelled), 0u);

  // A cancel well before the deadline is still a cancel.
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto reader = stub->Generate(&context, long_request(250));
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  context.TryCancel();
  while (reader->Read(&response)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  metrics = scrape_until(server.metrics_port(), "megaserve_requests_total{status=\"CANCELLED\"}");
  EXPECT_EQ(metrics["megaserve_requests_total{status=\"CANCELLED\"}"], 1);
}

// A second SIGTERM (main.cc) ends the grace period: what still runs is aborted at once.
TEST_F(ServerEndpointsTest, EndingTheGracePeriodAbortsTheDrainAtOnce) {
  FakeEngineOptions options;
  options.step_interval = std::chrono::milliseconds(5);
  auto started = start("127.0.0.1:0", "", options);
  ASSERT_TRUE(started.ok()) << started.status();
  Server& server = *started->server;
  auto stub = megaserve::testing::connect(server.grpc_port());
  grpc::ClientContext context;
  auto reader = stub->Generate(&context, long_request(250));  // 1.25 s of steps
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  const auto begin = std::chrono::steady_clock::now();
  auto drain =
      std::async(std::launch::async, [&] { server.drain_and_stop(std::chrono::seconds(60)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  server.end_grace_period();
  v1::FinishReason reason = v1::FINISH_REASON_UNSPECIFIED;
  while (reader->Read(&response)) {
    if (response.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
      reason = response.finish_reason();
    }
  }
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(reason, v1::FINISH_REASON_ABORT);
  ASSERT_EQ(drain.wait_for(std::chrono::seconds(5)), std::future_status::ready);
  EXPECT_LT(std::chrono::steady_clock::now() - begin, std::chrono::seconds(5));
}

// Issue 18 item 8: bytes gRPC could not parse got UNIMPLEMENTED with empty details, and the
// server logged protobuf's complaint as an unprefixed "[libprotobuf ERROR ...]" line.
TEST_F(ServerEndpointsTest, UnparsableRequestsGetInvalidArgumentSayingWhy) {
  auto started = start("127.0.0.1:0", "127.0.0.1:0");
  ASSERT_TRUE(started.ok()) << started.status();
  const int port = started->server->grpc_port();
  // A length-delimited field whose bytes are not UTF-8, for a proto3 string field.
  const auto string_field = [](const google::protobuf::Descriptor* type, const char* name) {
    const int number = type->FindFieldByName(name)->number();
    return absl::StrCat(std::string(1, static_cast<char>(number << 3 | 2)), "\x02\xc3\x28");
  };
  ::testing::internal::CaptureStderr();
  grpc::Status status = megaserve::testing::raw_call(port, "Generate", "\xff\xff\xff\xff");
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("the request is not a valid megaserve.v1.GenerateRequest"),
            std::string::npos)
      << status.error_message();
  status = megaserve::testing::raw_call(port, "Generate",
                                        string_field(v1::GenerateRequest::descriptor(), "text"));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find(
                "String field 'megaserve.v1.GenerateRequest.text' contains invalid UTF-8"),
            std::string::npos)
      << status.error_message();
  status = megaserve::testing::raw_call(port, "Tokenize",
                                        string_field(v1::TokenizeRequest::descriptor(), "text"));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("megaserve.v1.TokenizeRequest.text"), std::string::npos)
      << status.error_message();
  status = megaserve::testing::raw_call(port, "Detokenize", "\x0a\xff");
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  status = megaserve::testing::raw_call(port, "GetModelInfo",
                                        "\x0a\x05"
                                        "ab");
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  const std::string logged = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(logged.find("libprotobuf"), std::string::npos) << logged;

  // Well-formed bytes still work, on the raw path and the typed one.
  v1::TokenizeRequest tokenize;
  tokenize.set_text("Once upon a time");
  EXPECT_TRUE(megaserve::testing::raw_call(port, "Tokenize", tokenize.SerializeAsString()).ok());
  auto stub = megaserve::testing::connect(port);
  const StreamResult r = megaserve::testing::generate(*stub, long_request(3));
  EXPECT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.token_ids.size(), 3u);
  // The rejected Generate calls count as INVALID_ARGUMENT.
  const auto metrics = scrape_until(started->server->metrics_port(),
                                    "megaserve_requests_total{status=\"INVALID_ARGUMENT\"}");
  EXPECT_EQ(metrics.at("megaserve_requests_total{status=\"INVALID_ARGUMENT\"}"), 2);
}

// Issue 18 item 5: 8 idle or half-sent connections made a scrape wait ~10 s, 16 made it
// time out. Now 48 of them (more than the old pool on machines below 49 cores) leave the
// scrapes fast.
TEST_F(ServerEndpointsTest, IdleMetricsConnectionsDoNotStarveScrapes) {
  auto started = start("127.0.0.1:0", "127.0.0.1:0");
  ASSERT_TRUE(started.ok()) << started.status();
  const int port = started->server->metrics_port();
  std::vector<int> idle;
  for (int i = 0; i < 48; ++i) {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    ASSERT_GE(fd, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<uint16_t>(port));
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
    if (i % 2 == 0) {  // half a request; the rest say nothing at all
      const std::string half = "GET /metrics HTTP/1.1\r\nHost: x\r\n";
      ASSERT_EQ(write(fd, half.data(), half.size()), static_cast<ssize_t>(half.size()));
    }
    idle.push_back(fd);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // all accepted
  for (int i = 0; i < 3; ++i) {
    const auto begin = std::chrono::steady_clock::now();
    const auto metrics = megaserve::testing::scrape_metrics(port);
    EXPECT_TRUE(metrics.count("megaserve_kv_blocks_total"));
    EXPECT_LT(std::chrono::steady_clock::now() - begin, std::chrono::milliseconds(500)) << i;
  }
  for (int fd : idle) close(fd);
}

}  // namespace
}  // namespace megaserve::server
