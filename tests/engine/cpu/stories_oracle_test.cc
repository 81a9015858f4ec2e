// stories260K through the whole instruction stream (builder + CPU interpreter): greedy
// generation reproduces the llama2.c oracles in every execution mode, SM count, tensor-parallel
// degree, prefill chunking, and with three requests sharing steps (prefills next to decodes).
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/model/model_config.h"
#include "engine/model/tokenizer.h"
#include "engine/model/weights.h"
#include "engine/step_runner.h"
#include "gtest/gtest.h"
#include "tests/engine/cpu/cpu_test_driver.h"
#include "tests/support/assets.h"

namespace megaserve::engine {
namespace {

using testing::DriverRequest;
using testing::GreedyDriver;

constexpr const char* kModel = "models/stories260K-hf/config.json";
constexpr int32_t kBos = 1;

struct Oracle {
  std::vector<int32_t> bos_ids;  // 200 ids after a lone BOS
  std::string onceupon_text;     // prompt + 60 generated, decoded
  std::string zoo_text;          // prompt + 57 generated, decoded
};

std::string strip_newline(std::string s) {
  if (!s.empty() && s.back() == '\n') s.pop_back();  // printed by the reference, not a token
  return s;
}

class StoriesFixture {
 public:
  static StoriesFixture& get() {
    static StoriesFixture* f = new StoriesFixture();
    return *f;
  }
  ModelConfig config;
  ModelWeights weights;
  std::unique_ptr<Tokenizer> tokenizer;
  Oracle oracle;
  std::string error;

 private:
  StoriesFixture() {
    const auto dir = megaserve::testing::assets_dir() / "models/stories260K-hf";
    auto c = load_model_config(dir);
    if (!c.ok()) {
      error = c.status().ToString();
      return;
    }
    config = *c;
    auto w = load_weights(dir, config, DType::kF32);
    if (!w.ok()) {
      error = w.status().ToString();
      return;
    }
    weights = std::move(*w);
    auto t = Tokenizer::load(dir / "tokenizer.model");
    if (!t.ok()) {
      error = t.status().ToString();
      return;
    }
    tokenizer = std::move(*t);
    const auto oracle_dir = megaserve::testing::assets_dir() / "models/stories260K/oracle";
    std::istringstream ids(megaserve::testing::read_file(oracle_dir / "bos_t0_n200_ids.txt"));
    for (int32_t id; ids >> id;) oracle.bos_ids.push_back(id);
    oracle.onceupon_text =
        strip_newline(megaserve::testing::read_file(oracle_dir / "onceupon_t0_n64.txt"));
    oracle.zoo_text = strip_newline(megaserve::testing::read_file(oracle_dir / "zoo_t0_n60.txt"));
  }
};

struct Case {
  ExecutionMode mode;
  int num_sms;
  int tp;
  int chunk;   // prefill chunk (0: whole prompt)
  bool mixed;  // the three requests share steps, joining at different steps
};

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  const Case& c = info.param;
  const char* mode = c.mode == ExecutionMode::kSequential ? "Sequential"
                     : c.mode == ExecutionMode::kShuffled ? "Shuffled"
                                                          : "Threaded";
  return absl::StrCat(mode, "_sms", c.num_sms, "_tp", c.tp, "_chunk", c.chunk,
                      c.mixed ? "_mixed" : "_alone");
}

class StoriesOracleTest : public ::testing::TestWithParam<Case> {};

TEST_P(StoriesOracleTest, GreedyMatchesLlama2cOracles) {
  MEGASERVE_REQUIRE_ASSET(kModel);
  MEGASERVE_REQUIRE_ASSET("models/stories260K/oracle/bos_t0_n200_ids.txt");
  StoriesFixture& f = StoriesFixture::get();
  ASSERT_EQ(f.error, "");
  ASSERT_EQ(f.oracle.bos_ids.size(), 200u);
  const Case c = GetParam();

  CpuBackendOptions options;
  options.tensor_parallel = c.tp;
  options.num_sms = c.num_sms;
  options.num_kv_blocks = 64;
  options.kv_block_size = 16;
  options.execution.mode = c.mode;
  options.execution.seed = 1234 + c.num_sms * 7 + c.tp;
  options.execution.poison_workspace = true;
  // Static proof on the shuffled cases with several SMs (the verifier is the slow part).
  options.verify = c.mode == ExecutionMode::kShuffled && c.num_sms > 1;
  auto backend = CpuBackend::create(f.config, f.weights, options);
  ASSERT_TRUE(backend.ok()) << backend.status();
  StepRunner runner(f.config, **backend);

  const std::vector<int32_t> onceupon = f.tokenizer->encode("Once upon a time", true);
  ASSERT_EQ(onceupon, (std::vector<int32_t>{1, 403, 407, 261, 378}));
  const std::vector<int32_t> zoo = f.tokenizer->encode("Zoo", true);
  ASSERT_EQ(zoo.size(), 4u);  // BOS + 3 tokens

  std::vector<DriverRequest> requests(3);
  requests[0] = {.id = 11, .prompt = {kBos}, .max_new_tokens = 200};
  requests[1] = {.id = 22, .prompt = onceupon, .max_new_tokens = 60, .stop_id = kBos};
  requests[2] = {.id = 33, .prompt = zoo, .max_new_tokens = 57, .stop_id = kBos};
  for (auto& r : requests) r.chunk = c.chunk;
  std::vector<DriverRequest> done;
  if (c.mixed) {
    requests[1].start_step = 3;  // joins while request 11 decodes
    requests[2].start_step = 4;  // prefills next to 22's prefill chunks and 11's decodes
    GreedyDriver driver(runner, options.num_kv_blocks);
    for (auto& r : requests) driver.add(r);
    ASSERT_TRUE(driver.run().ok());
    done = driver.requests();
  } else {
    for (auto& r : requests) {
      GreedyDriver driver(runner, options.num_kv_blocks);
      driver.add(r);
      absl::Status s = driver.run();
      ASSERT_TRUE(s.ok()) << s;
      done.push_back(driver.requests()[0]);
    }
  }
  EXPECT_EQ(done[0].generated, f.oracle.bos_ids);
  for (int i : {1, 2}) {
    std::vector<int32_t> ids(done[i].prompt.begin() + 1, done[i].prompt.end());  // drop BOS
    ids.insert(ids.end(), done[i].generated.begin(), done[i].generated.end());
    if (!ids.empty() && ids.back() == kBos) ids.pop_back();
    auto text = f.tokenizer->decode(ids);
    ASSERT_TRUE(text.ok());
    EXPECT_EQ(*text, i == 1 ? f.oracle.onceupon_text : f.oracle.zoo_text) << "request " << i;
  }
}

// The 132-SM GPU tile configuration runs on the interpreter too (one queue per SM; most are
// short or empty for so small a model), statically verified, under tensor parallelism.
TEST(StoriesGpuTilesTest, GpuTileConfigRunsOnTheInterpreter) {
  MEGASERVE_REQUIRE_ASSET(kModel);
  StoriesFixture& f = StoriesFixture::get();
  ASSERT_EQ(f.error, "");
  for (ExecutionMode mode : {ExecutionMode::kSequential, ExecutionMode::kShuffled}) {
    CpuBackendOptions options;
    options.tensor_parallel = 2;
    options.num_sms = 132;
    options.default_tiles = false;
    options.tiles = gpu_tile_config(132);
    options.tiles.kv_split_tokens = 64;  // split the longer contexts here too
    options.num_kv_blocks = 32;
    options.kv_block_size = 16;
    options.execution.mode = mode;
    options.execution.poison_workspace = true;
    options.verify = true;
    auto backend = CpuBackend::create(f.config, f.weights, options);
    ASSERT_TRUE(backend.ok()) << backend.status();
    StepRunner runner(f.config, **backend);
    GreedyDriver driver(runner, options.num_kv_blocks);
    driver.add({.id = 1, .prompt = {kBos}, .max_new_tokens = 200});
    driver.add({.id = 2,
                .prompt = f.tokenizer->encode("Zoo", true),
                .max_new_tokens = 57,
                .start_step = 5,
                .stop_id = kBos});
    absl::Status s = driver.run();
    ASSERT_TRUE(s.ok()) << s;
    EXPECT_EQ(driver.requests()[0].generated, f.oracle.bos_ids);
    std::vector<int32_t> ids = {f.tokenizer->encode("Zoo", false)};
    ids.insert(ids.end(), driver.requests()[1].generated.begin(),
               driver.requests()[1].generated.end());
    if (ids.back() == kBos) ids.pop_back();
    EXPECT_EQ(*f.tokenizer->decode(ids), f.oracle.zoo_text);
  }
}

// The full matrix in mixed steps (each request also prefills in chunks next to the others'
// decodes), and each request alone with every chunking in two configurations.
std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (ExecutionMode mode :
       {ExecutionMode::kSequential, ExecutionMode::kShuffled, ExecutionMode::kThreaded}) {
    for (int sms : {1, 3, 8}) {
      for (int tp : {1, 2, 4}) {
        for (int chunk : {0, 1, 2, 3}) cases.push_back({mode, sms, tp, chunk, true});
      }
    }
  }
  for (int chunk : {0, 1, 2, 3}) {
    cases.push_back({ExecutionMode::kSequential, 1, 1, chunk, false});
    cases.push_back({ExecutionMode::kShuffled, 3, 2, chunk, false});
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Matrix, StoriesOracleTest, ::testing::ValuesIn(all_cases()), case_name);

}  // namespace
}  // namespace megaserve::engine
