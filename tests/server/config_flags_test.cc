// The command-line flags over the default config (server/config_flags.cc), set through
// Abseil's own parser as the command line would set them.
#include "server/config_flags.h"

#include <string>

#include "absl/flags/reflection.h"
#include "gtest/gtest.h"
#include "server/config.h"

namespace megaserve::server {
namespace {

// Parses `value` into flag `name` exactly as --name=value on the command line would.
void set_flag(const std::string& name, const std::string& value) {
  absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
  ASSERT_NE(flag, nullptr) << name;
  std::string error;
  ASSERT_TRUE(flag->ParseFrom(value, &error)) << name << ": " << error;
}

config::ServerConfig with_flags() {
  config::ServerConfig config = default_server_config();
  apply_flag_overrides(&config);
  return config;
}

TEST(ConfigFlagsTest, UnsetFlagsLeaveTheConfigAlone) {
  absl::FlagSaver saver;
  const config::ServerConfig config = with_flags();
  EXPECT_EQ(config.SerializeAsString(), default_server_config().SerializeAsString());
}

TEST(ConfigFlagsTest, GivenFlagsOverrideTheirFields) {
  absl::FlagSaver saver;
  set_flag("grpc_address", "127.0.0.1:7000");
  set_flag("max_model_len", "256");
  set_flag("enable_prefix_caching", "false");
  set_flag("max_prefill_tokens_with_decodes", "256");
  const config::ServerConfig config = with_flags();
  EXPECT_EQ(config.endpoints().grpc_address(), "127.0.0.1:7000");
  EXPECT_EQ(config.engine().max_model_len(), 256u);
  EXPECT_EQ(config.engine().max_prefill_tokens_with_decodes(), 256u);
  EXPECT_FALSE(config.engine().enable_prefix_caching());
  EXPECT_EQ(config.endpoints().metrics_address(), "0.0.0.0:9090");
  EXPECT_EQ(config.endpoints().http_address(), "");  // the HTTP API is off by default
}

TEST(ConfigFlagsTest, HttpAddressTurnsTheHttpApiOn) {
  absl::FlagSaver saver;
  set_flag("http_address", "127.0.0.1:8000");
  const config::ServerConfig config = with_flags();
  EXPECT_EQ(config.endpoints().http_address(), "127.0.0.1:8000");
  EXPECT_TRUE(validate_server_config(config).ok());
}

// Issue 18: an empty value was read as "unset", so the config's 0.0.0.0:9090 applied.
TEST(ConfigFlagsTest, EmptyMetricsAddressTurnsMetricsOff) {
  absl::FlagSaver saver;
  set_flag("metrics_address", "");
  const config::ServerConfig config = with_flags();
  EXPECT_EQ(config.endpoints().metrics_address(), "");
  EXPECT_TRUE(validate_server_config(config).ok());
}

// ... and an empty --grpc_address= silently served on 0.0.0.0:50051.
TEST(ConfigFlagsTest, EmptyGrpcAddressIsAnError) {
  absl::FlagSaver saver;
  set_flag("grpc_address", "");
  const config::ServerConfig config = with_flags();
  EXPECT_EQ(config.endpoints().grpc_address(), "");
  const absl::Status status = validate_server_config(config);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("endpoints.grpc_address is empty: the server needs a gRPC "
                                  "address"),
            std::string::npos)
      << status.message();
}

TEST(ConfigFlagsTest, AutoLeavesOverlapSchedulingToTheBackend) {
  absl::FlagSaver saver;
  set_flag("overlap_scheduling", "true");
  EXPECT_TRUE(with_flags().engine().overlap_scheduling());
  set_flag("overlap_scheduling", "auto");
  EXPECT_FALSE(with_flags().engine().has_overlap_scheduling());
}

TEST(ConfigFlagsTest, NumbersMustParse) {
  absl::FlagSaver saver;
  std::string error;
  EXPECT_FALSE(absl::FindCommandLineFlag("max_model_len")->ParseFrom("", &error));
  EXPECT_FALSE(absl::FindCommandLineFlag("max_model_len")->ParseFrom("-1", &error));
}

TEST(ConfigFlagsTest, TraceFlagsSetTheEngineFields) {
  absl::FlagSaver saver;
  set_flag("trace_steps", "8");
  set_flag("trace_dir", "/tmp/megaserve-traces");
  const config::ServerConfig config = with_flags();
  EXPECT_EQ(config.engine().trace_steps(), 8u);
  EXPECT_EQ(config.engine().trace_dir(), "/tmp/megaserve-traces");
  std::string error;
  EXPECT_FALSE(absl::FindCommandLineFlag("trace_steps")->ParseFrom("-1", &error));
  set_flag("trace_steps", "100");
  const absl::Status status = validate_server_config(with_flags());
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("engine.trace_steps must be at most 64, got 100"),
            std::string::npos)
      << status.message();
}

// Issue 18: --help printed "default: ;" for every flag.
TEST(ConfigFlagsTest, HelpShowsTheDefaultConfigValues) {
  const auto shown = [](const std::string& name) {
    const absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    return flag == nullptr ? std::string("(no such flag)") : flag->DefaultValue();
  };
  EXPECT_EQ(shown("grpc_address"), "\"0.0.0.0:50051\"");
  EXPECT_EQ(shown("metrics_address"), "\"0.0.0.0:9090\"");
  EXPECT_EQ(shown("http_address"), "\"\"");
  EXPECT_EQ(shown("backend"), "\"auto\"");
  EXPECT_EQ(shown("kv_block_size"), "16");
  EXPECT_EQ(shown("max_num_seqs"), "256");
  EXPECT_EQ(shown("gpu_memory_fraction"), "0.9");
  EXPECT_EQ(shown("enable_prefix_caching"), "true");
  EXPECT_EQ(shown("drain_grace_seconds"), "30");
  EXPECT_EQ(shown("model"), "\"\"");
  EXPECT_EQ(shown("overlap_scheduling"), "auto");
  EXPECT_EQ(shown("trace_steps"), "0");
  EXPECT_EQ(shown("trace_dir"), "\"\"");
  // Every shown default parses back (Abseil aborts at startup otherwise).
  for (const char* name : {"grpc_address", "kv_block_size", "gpu_memory_fraction",
                           "enable_prefix_caching", "overlap_scheduling", "model"}) {
    absl::FlagSaver saver;
    absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    std::string error;
    EXPECT_TRUE(flag->ParseFrom(flag->DefaultValue(), &error)) << name << ": " << error;
  }
}

}  // namespace
}  // namespace megaserve::server
