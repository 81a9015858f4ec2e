// megaserve-cli (the real binary) against an in-process server with the real engine on
// stories260K-hf: streamed text, --json chunks, --info, --tokenize, --health.
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/config.h"
#include "server/model_setup.h"
#include "server/server.h"
#include "tests/server/subprocess.h"
#include "tests/support/assets.h"

namespace megaserve::server {
namespace {

constexpr char kModel[] = "models/stories260K-hf/config.json";

class CliTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!std::filesystem::exists(megaserve::testing::assets_dir() / kModel)) return;
    config::ServerConfig config = default_server_config();
    config.mutable_model()->set_path(
        (megaserve::testing::assets_dir() / "models/stories260K-hf").string());
    config.mutable_engine()->set_backend("cpu");
    config.mutable_engine()->set_cpu_threads(1);
    config.mutable_engine()->set_num_kv_blocks(256);
    auto model = setup_model(config);
    ASSERT_TRUE(model.ok()) << model.status();
    ServerOptions options;  // 127.0.0.1:0, no metrics
    auto server = Server::start(options, *std::move(model));
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override {
    MEGASERVE_REQUIRE_ASSET(kModel);
    ASSERT_NE(server_, nullptr);
  }

  // Runs the client with `args`; returns its exit code and fills `output` (stdout+stderr).
  int cli(std::vector<std::string> args, std::string* output) {
    args.insert(args.begin(),
                {MEGASERVE_CLI_BINARY, absl::StrCat("--server=127.0.0.1:", server_->grpc_port())});
    const std::string log = (std::filesystem::path(::testing::TempDir()) /
                             absl::StrCat("megaserve_cli_", getpid(), "_", ++runs_, ".log"))
                                .string();
    megaserve::testing::Subprocess process(args, log);
    const std::optional<int> code = process.wait(std::chrono::seconds(30));
    *output = process.log();
    return code.value_or(-1000);
  }

  static Server* server_;
  int runs_ = 0;
};
Server* CliTest::server_ = nullptr;

TEST_F(CliTest, StreamsTheOracleText) {
  std::string oracle = megaserve::testing::read_file(
      megaserve::testing::assets_dir() / "models/stories260K/oracle/onceupon_t0_n64.txt");
  oracle.pop_back();  // the reference's trailing newline
  std::string out;
  ASSERT_EQ(cli({"--temperature=0", "--max-tokens=60", "Once", "upon", "a", "time"}, &out), 0)
      << out;
  // stdout: the text and a newline; stderr: a summary line in brackets.
  EXPECT_EQ(out.rfind(oracle.substr(std::string("Once upon a time").size()) + "\n", 0), 0u) << out;
  EXPECT_NE(out.find("[FINISH_REASON_LENGTH, 5 prompt + 60 generated tokens"), std::string::npos)
      << out;
}

TEST_F(CliTest, JsonPrintsEveryChunk) {
  std::string out;
  ASSERT_EQ(cli({"--json", "--temperature=0", "--max_tokens=8", "--logprobs=2", "Zoo"}, &out), 0)
      << out;
  int tokens = 0;
  std::string finish;
  for (absl::string_view line : absl::StrSplit(out, '\n', absl::SkipEmpty())) {
    const nlohmann::json chunk = nlohmann::json::parse(line);
    if (chunk.contains("token_ids")) tokens += static_cast<int>(chunk["token_ids"].size());
    if (chunk.contains("finish_reason")) finish = chunk["finish_reason"];
  }
  EXPECT_EQ(tokens, 8);
  EXPECT_EQ(finish, "FINISH_REASON_LENGTH");
}

TEST_F(CliTest, InfoTokenizeHealth) {
  std::string out;
  ASSERT_EQ(cli({"--info"}, &out), 0) << out;
  const nlohmann::json info = nlohmann::json::parse(out);
  EXPECT_EQ(info["name"], "stories260K-hf");
  EXPECT_EQ(info["vocab_size"], 512);

  ASSERT_EQ(cli({"--tokenize", "Once upon a time"}, &out), 0) << out;
  EXPECT_EQ(out, "1 403 407 261 378\n");  // the assets README's encoding

  ASSERT_EQ(cli({"--health"}, &out), 0) << out;
  EXPECT_EQ(out, "SERVING\n");
}

TEST_F(CliTest, ErrorsExitNonZeroWithTheStatus) {
  std::string out;
  EXPECT_EQ(cli({"--temperature=-1", "hi"}, &out), 1);
  EXPECT_NE(out.find("temperature"), std::string::npos) << out;
  // Status codes by name, not number (issue 18).
  EXPECT_NE(out.find("megaserve-cli: INVALID_ARGUMENT: temperature"), std::string::npos) << out;
  EXPECT_EQ(cli({"--server=127.0.0.1:1", "--health"}, &out), 1);  // nothing listens there
  EXPECT_NE(out.find("megaserve-cli: UNAVAILABLE: "), std::string::npos) << out;
}

// --chat goes through the Chat RPC: stories260K has no chat template, so the server's
// FAILED_PRECONDITION comes back by name (SmolLM2's answer is in server_gguf_test).
TEST_F(CliTest, ChatOnAModelWithoutATemplateExitsWithTheStatus) {
  std::string out;
  EXPECT_EQ(cli({"--chat", "Hello there"}, &out), 1);
  EXPECT_NE(out.find("megaserve-cli: FAILED_PRECONDITION: "), std::string::npos) << out;
  EXPECT_NE(out.find("no chat template"), std::string::npos) << out;
}

}  // namespace
}  // namespace megaserve::server
