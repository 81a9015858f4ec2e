// The real `megaserve` binary as a subprocess: SIGTERM turns health NOT_SERVING, new
// requests get UNAVAILABLE, running requests finish within the grace period (or are
// aborted when it is over, or at a second SIGTERM), and the process exits 0. Also what the
// binary's flags refuse at start, and --help.
#include <signal.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <future>
#include <optional>
#include <regex>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/server/grpc_test_util.h"
#include "tests/server/subprocess.h"
#include "tests/support/assets.h"

namespace megaserve::server {
namespace {

using megaserve::testing::StreamResult;
using megaserve::testing::Subprocess;
using HealthStatus = grpc::health::v1::HealthCheckResponse;

constexpr char kModel[] = "models/stories260K-hf/config.json";

class SigtermTest : public ::testing::Test {
 protected:
  void SetUp() override { MEGASERVE_REQUIRE_ASSET(kModel); }

  // Starts megaserve and returns its gRPC port (0 on failure).
  int start(const std::string& grace_seconds, const std::vector<std::string>& extra_flags = {}) {
    const std::string log =
        (std::filesystem::path(::testing::TempDir()) /
         absl::StrCat("megaserve_sigterm_", getpid(), "_", grace_seconds, ".log"))
            .string();
    std::vector<std::string> argv = {
        MEGASERVE_BINARY,
        "--config=" MEGASERVE_SOURCE_DIR "/configs/default.textproto",
        absl::StrCat("--model=",
                     (megaserve::testing::assets_dir() / "models/stories260K-hf").string()),
        "--grpc_address=127.0.0.1:0",
        "--metrics_address=",
        "--backend=cpu",
        "--cpu_threads=1",
        "--num_kv_blocks=1024",
        absl::StrCat("--drain_grace_seconds=", grace_seconds)};
    argv.insert(argv.end(), extra_flags.begin(), extra_flags.end());
    server_ = std::make_unique<Subprocess>(argv, log);
    const auto port = server_->wait_for_log(std::regex(R"(serving gRPC on \S+ \(port (\d+)\))"),
                                            std::chrono::seconds(30));
    int value = 0;
    if (!port || !absl::SimpleAtoi(*port, &value)) {
      ADD_FAILURE() << "megaserve did not start:\n" << server_->log();
    }
    return value;
  }

  std::unique_ptr<Subprocess> server_;
};

v1::GenerateRequest long_request() {
  v1::GenerateRequest request;
  request.set_text("Once upon a time");
  request.mutable_params()->set_temperature(0.0f);
  request.mutable_params()->set_max_tokens(480);
  request.mutable_params()->set_ignore_eos(true);
  return request;
}

TEST_F(SigtermTest, DrainsRunningRequestsThenExitsZero) {
  const int port = start("30");
  ASSERT_GT(port, 0);
  EXPECT_EQ(megaserve::testing::health(port), HealthStatus::SERVING);
  // Several long streams keep the engine busy well past the checks below.
  constexpr int kStreams = 12;
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>>> readers;
  auto stub = megaserve::testing::connect(port);
  std::vector<int> tokens(kStreams, 0);
  for (int i = 0; i < kStreams; ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    readers.push_back(stub->Generate(contexts.back().get(), long_request()));
  }
  v1::GenerateResponse response;
  for (int i = 0; i < kStreams; ++i) {
    ASSERT_TRUE(readers[i]->Read(&response));
    tokens[i] += response.token_ids_size();
  }
  server_->signal(SIGTERM);
  HealthStatus::ServingStatus status = HealthStatus::SERVING;
  for (int i = 0; i < 200 && status == HealthStatus::SERVING; ++i) {
    status = megaserve::testing::health(port);
  }
  EXPECT_EQ(status, HealthStatus::NOT_SERVING);
  const StreamResult rejected = megaserve::testing::generate(*stub, long_request());
  EXPECT_EQ(rejected.status.error_code(), grpc::StatusCode::UNAVAILABLE)
      << rejected.status.error_message();
  for (int i = 0; i < kStreams; ++i) {
    v1::FinishReason reason = v1::FINISH_REASON_UNSPECIFIED;
    while (readers[i]->Read(&response)) {
      tokens[i] += response.token_ids_size();
      if (response.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
        reason = response.finish_reason();
      }
    }
    EXPECT_TRUE(readers[i]->Finish().ok()) << i;
    EXPECT_EQ(reason, v1::FINISH_REASON_LENGTH) << i;
    EXPECT_EQ(tokens[i], 480) << i;
  }
  EXPECT_EQ(server_->wait(std::chrono::seconds(20)), 0) << server_->log();
  EXPECT_NE(server_->log().find("SIGTERM: draining"), std::string::npos);
  // "--metrics_address=" (empty) turned metrics off (issue 18: it was read as unset).
  EXPECT_NE(server_->log().find(", metrics off"), std::string::npos) << server_->log();
}

TEST_F(SigtermTest, AbortsWhatOutlivesTheGracePeriodThenExitsZero) {
  const int port = start("0");
  ASSERT_GT(port, 0);
  auto stub = megaserve::testing::connect(port);
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>>> readers;
  v1::GenerateResponse response;
  for (int i = 0; i < 8; ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    readers.push_back(stub->Generate(contexts.back().get(), long_request()));
    ASSERT_TRUE(readers.back()->Read(&response));
  }
  server_->signal(SIGTERM);
  int aborted = 0;
  for (auto& reader : readers) {
    int tokens = 0;
    v1::FinishReason reason = v1::FINISH_REASON_UNSPECIFIED;
    while (reader->Read(&response)) {
      tokens += response.token_ids_size();
      if (response.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
        reason = response.finish_reason();
      }
    }
    const grpc::Status status = reader->Finish();
    // An aborted request ends normally with FINISH_REASON_ABORT (or, if its last message
    // could not be delivered before shutdown, with CANCELLED/UNAVAILABLE).
    if (status.ok()) {
      EXPECT_NE(reason, v1::FINISH_REASON_UNSPECIFIED);
      aborted += reason == v1::FINISH_REASON_ABORT;
    }
  }
  EXPECT_GT(aborted, 0);
  EXPECT_EQ(server_->wait(std::chrono::seconds(20)), 0) << server_->log();
}

// Issue 18: a second SIGTERM during the drain waited out the whole grace period.
TEST_F(SigtermTest, SecondSigtermAbortsTheDrainAtOnce) {
  const int port = start("600", {"--max_num_seqs=1"});  // one at a time: long to drain
  ASSERT_GT(port, 0);
  auto stub = megaserve::testing::connect(port);
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>>> readers;
  v1::GenerateResponse response;
  for (int i = 0; i < 8; ++i) {  // one runs, seven wait
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    readers.push_back(stub->Generate(contexts.back().get(), long_request()));
  }
  ASSERT_TRUE(readers.front()->Read(&response));
  server_->signal(SIGTERM);
  // Signals do not queue: the second must come after the first was taken.
  ASSERT_TRUE(server_->wait_for_log(std::regex("(SIGTERM): draining"), std::chrono::seconds(10)));
  server_->signal(SIGTERM);
  const auto signalled = std::chrono::steady_clock::now();
  for (auto& reader : readers) {
    while (reader->Read(&response)) {
    }
    reader->Finish();
  }
  EXPECT_EQ(server_->wait(std::chrono::seconds(20)), 0) << server_->log();
  EXPECT_LT(std::chrono::steady_clock::now() - signalled, std::chrono::seconds(20));
  EXPECT_NE(server_->log().find("SIGTERM again: aborting running requests now"), std::string::npos)
      << server_->log();
}

// Runs megaserve with `flags` (and the test model, CPU backend) until it exits; its code.
// With `address_space_kb`, under `ulimit -v` of that many KiB.
int run_to_exit(const std::vector<std::string>& flags, std::string* log,
                int64_t address_space_kb = 0) {
  static int runs = 0;
  std::vector<std::string> argv;
  if (address_space_kb > 0) {
    argv = {"/bin/sh", "-c",
            absl::StrCat("ulimit -v ", address_space_kb, " && exec \"$0\" \"$@\"")};
  }
  argv.insert(argv.end(),
              {MEGASERVE_BINARY,
               absl::StrCat("--model=",
                            (megaserve::testing::assets_dir() / "models/stories260K-hf").string()),
               "--backend=cpu", "--cpu_threads=1", "--num_kv_blocks=64", "--metrics_address="});
  argv.insert(argv.end(), flags.begin(), flags.end());
  Subprocess process(argv, (std::filesystem::path(::testing::TempDir()) /
                            absl::StrCat("megaserve_flags_", getpid(), "_", ++runs, ".log"))
                               .string());
  const std::optional<int> code = process.wait(std::chrono::seconds(30));
  *log = process.log();
  return code.value_or(-1000);
}

// Issue 18: these started anyway (an empty gRPC address as 0.0.0.0:50051, port 99999 as
// 34463, a context the model was never trained for).
TEST_F(SigtermTest, BadEndpointsAndContextLengthFailAtStart) {
  std::string log;
  EXPECT_EQ(run_to_exit({"--grpc_address="}, &log), 2);
  EXPECT_NE(log.find("endpoints.grpc_address is empty"), std::string::npos) << log;
  EXPECT_EQ(run_to_exit({"--grpc-address=127.0.0.1:99999"}, &log), 2);
  EXPECT_NE(log.find("port in [0, 65535]"), std::string::npos) << log;
  EXPECT_EQ(run_to_exit({"--grpc_address=127.0.0.1:0", "--max_model_len=513"}, &log), 1);
  EXPECT_NE(log.find("engine.max_model_len 513 exceeds the model's max_position_embeddings 512"),
            std::string::npos)
      << log;
}

// Issue 18 item 6: both ended in std::bad_alloc and SIGABRT.
TEST_F(SigtermTest, ImpossibleSizesFailAtStartWithAMessage) {
  const std::filesystem::path config = std::filesystem::path(::testing::TempDir()) /
                                       absl::StrCat("megaserve_huge_layers_", getpid(), ".json");
  std::ofstream(config) << R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
    "intermediate_size": 172, "num_hidden_layers": 2147483647, "num_attention_heads": 8,
    "vocab_size": 512, "max_position_embeddings": 512})";
  std::string log;
  EXPECT_EQ(
      run_to_exit({"--load_format=dummy", absl::StrCat("--model_config_file=", config.string())},
                  &log),
      1);
  EXPECT_NE(log.find("field 'num_hidden_layers' must be an integer in [1, 1024], got 2147483647"),
            std::string::npos)
      << log;
  std::filesystem::remove(config);

  // Llama-3.1-8B's shape, fp32 on the CPU: 32 GB of weights under a 3 GB address space.
  const std::string llama_8b =
      (std::filesystem::path(MEGASERVE_SOURCE_DIR) / "configs/models/llama-3.1-8b.json").string();
  EXPECT_EQ(
      run_to_exit({"--load_format=dummy", "--model_config_file=" + llama_8b}, &log, 3'000'000), 1);
  const std::regex needs(R"(dummy weights \(8030261248 parameters in F32\) and the CPU KV cache )"
                         R"(\(\d+ bytes\): needs \d+ bytes \([0-9.]+ GiB\), \d+ available)");
  EXPECT_TRUE(std::regex_search(log, needs)) << log;
  EXPECT_NE(log.find("RLIMIT_AS"), std::string::npos) << log;
}

// Issue 18: every server flag showed "default: ;".
TEST_F(SigtermTest, HelpShowsTheDefaults) {
  std::string log;
  run_to_exit({"--help"}, &log);
  EXPECT_EQ(log.find("default: ;"), std::string::npos) << log;
  EXPECT_NE(log.find("default: \"0.0.0.0:50051\";"), std::string::npos) << log;
  EXPECT_NE(log.find("default: 30;"), std::string::npos) << log;
}

}  // namespace
}  // namespace megaserve::server
