#include "server/config.h"

#include <filesystem>
#include <fstream>
#include <string>

#include "gtest/gtest.h"

namespace megaserve::server {
namespace {

std::filesystem::path write_temp(const std::string& name, const std::string& text) {
  const auto path = std::filesystem::path(::testing::TempDir()) / name;
  std::ofstream(path) << text;
  return path;
}

TEST(ServerConfig, DefaultsAreValid) {
  const config::ServerConfig c = default_server_config();
  EXPECT_TRUE(validate_server_config(c).ok());
  EXPECT_EQ(c.endpoints().grpc_address(), "0.0.0.0:50051");
  EXPECT_EQ(c.endpoints().metrics_address(), "0.0.0.0:9090");
  EXPECT_EQ(c.engine().backend(), "auto");
  EXPECT_EQ(c.engine().kv_block_size(), 16u);
  EXPECT_TRUE(c.engine().enable_prefix_caching());
}

TEST(ServerConfig, FileIsMergedOverTheDefaults) {
  const auto path = write_temp("merge.textproto", R"(
    model { path: "/models/x" }
    engine { kv_block_size: 32 enable_prefix_caching: false }
    drain_grace_seconds: 5
  )");
  auto c = load_server_config(path);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model().path(), "/models/x");
  EXPECT_EQ(c->model().load_format(), "auto");  // default kept
  EXPECT_EQ(c->engine().kv_block_size(), 32u);
  EXPECT_FALSE(c->engine().enable_prefix_caching());  // an explicit false overrides
  EXPECT_EQ(c->engine().max_num_seqs(), default_server_config().engine().max_num_seqs());
  EXPECT_EQ(c->drain_grace_seconds(), 5u);
}

TEST(ServerConfig, ParseErrorsNameTheFileAndLine) {
  const auto path = write_temp("bad.textproto", "engine {\n  kv_blok_size: 32\n}\n");
  auto c = load_server_config(path);
  ASSERT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find("bad.textproto"), std::string::npos);
  EXPECT_NE(c.status().message().find("line 2"), std::string::npos) << c.status().message();
  EXPECT_EQ(load_server_config("/nonexistent/x.textproto").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(ServerConfig, ShippedDefaultConfigLoads) {
  const auto path = std::filesystem::path(MEGASERVE_SOURCE_DIR) / "configs/default.textproto";
  auto c = load_server_config(path);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(validate_server_config(*c).ok());
  EXPECT_EQ(c->endpoints().grpc_address(), "0.0.0.0:50051");
  EXPECT_EQ(c->endpoints().metrics_address(), "0.0.0.0:9090");
  EXPECT_EQ(c->engine().backend(), "auto");
  EXPECT_EQ(c->engine().kv_block_size(), 16u);
}

TEST(ServerConfig, EndpointsAcceptPortsZeroToMaxAndMetricsOff) {
  config::ServerConfig c = default_server_config();
  for (const char* address : {"127.0.0.1:0", "[::1]:65535", "localhost:1", "0.0.0.0:50051"}) {
    c.mutable_endpoints()->set_grpc_address(address);
    EXPECT_TRUE(validate_server_config(c).ok()) << address;
  }
  c.mutable_endpoints()->set_metrics_address("");  // metrics off
  EXPECT_TRUE(validate_server_config(c).ok());
}

TEST(ServerConfig, ValidationNamesTheField) {
  const auto expect_bad = [](auto mutate, const std::string& field) {
    config::ServerConfig c = default_server_config();
    mutate(&c);
    const absl::Status s = validate_server_config(c);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_NE(s.message().find(field), std::string::npos) << s.message();
  };
  expect_bad([](config::ServerConfig* c) { c->mutable_engine()->set_kv_block_size(24); },
             "engine.kv_block_size");
  expect_bad([](config::ServerConfig* c) { c->mutable_engine()->set_kv_block_size(256); },
             "engine.kv_block_size");
  expect_bad([](config::ServerConfig* c) { c->mutable_engine()->set_backend("tpu"); },
             "engine.backend");
  expect_bad([](config::ServerConfig* c) { c->mutable_model()->set_load_format("pt"); },
             "model.load_format");
  expect_bad([](config::ServerConfig* c) { c->mutable_logging()->set_level("loud"); },
             "logging.level");
  expect_bad([](config::ServerConfig* c) { c->mutable_engine()->set_max_num_seqs(0); },
             "engine.max_num_seqs");
  expect_bad([](config::ServerConfig* c) { c->mutable_endpoints()->clear_grpc_address(); },
             "endpoints.grpc_address");
  // Issue 18: gRPC wrapped port 99999 to 34463 and bound it.
  expect_bad(
      [](config::ServerConfig* c) { c->mutable_endpoints()->set_grpc_address("127.0.0.1:99999"); },
      "endpoints.grpc_address must be host:port with a port in [0, 65535]");
  expect_bad([](config::ServerConfig* c) { c->mutable_endpoints()->set_grpc_address("[::1]:-1"); },
             "endpoints.grpc_address");
  expect_bad([](config::ServerConfig* c) { c->mutable_endpoints()->set_grpc_address("50051"); },
             "endpoints.grpc_address");
  expect_bad(
      [](config::ServerConfig* c) { c->mutable_endpoints()->set_metrics_address("0.0.0.0:70000"); },
      "endpoints.metrics_address");
  expect_bad([](config::ServerConfig* c) { c->mutable_endpoints()->set_http_address("8000"); },
             "endpoints.http_address");
  expect_bad([](config::ServerConfig* c) { c->mutable_endpoints()->set_grpc_address(""); },
             "the server needs a gRPC address");
  expect_bad([](config::ServerConfig* c) { c->mutable_engine()->set_max_model_len(1u << 31); },
             "engine.max_model_len must be at most 2147483647, got 2147483648");
}

TEST(ServerConfig, TraceStepsAreBoundedAndNeedAWritableFolder) {
  config::ServerConfig c = default_server_config();
  EXPECT_EQ(c.engine().trace_steps(), 0u);
  c.mutable_engine()->set_trace_dir("/proc/no/such/folder");  // unused while trace_steps is 0
  EXPECT_TRUE(validate_server_config(c).ok());
  const auto expect_error = [&](const std::string& part) {
    const absl::Status s = validate_server_config(c);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << part;
    EXPECT_NE(s.message().find(part), std::string::npos) << s.message();
  };
  c.mutable_engine()->set_trace_steps(65);
  expect_error("engine.trace_steps must be at most 64");
  c.mutable_engine()->set_trace_steps(4);
  c.mutable_engine()->clear_trace_dir();
  expect_error("engine.trace_steps 4 needs engine.trace_dir (--trace_dir=DIR)");
  // Nothing can be made under a regular file, not even by root.
  const auto file = write_temp("trace_dir_parent", "x");
  c.mutable_engine()->set_trace_dir((file / "traces").string());
  expect_error("engine.trace_dir \"" + (file / "traces").string() + "\": cannot create it");
  // A folder that is missing is made.
  const auto dir = std::filesystem::path(::testing::TempDir()) / "config_trace" / "dir";
  std::filesystem::remove_all(dir);
  c.mutable_engine()->set_trace_dir(dir.string());
  EXPECT_TRUE(validate_server_config(c).ok());
  EXPECT_TRUE(std::filesystem::is_directory(dir));
  c.mutable_engine()->set_trace_steps(64);
  EXPECT_TRUE(validate_server_config(c).ok());
}

}  // namespace
}  // namespace megaserve::server
