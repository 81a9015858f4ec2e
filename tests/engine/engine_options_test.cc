// check_engine_options: issue 18 item 9, engine side (Engine::create took any max_model_len).
#include "engine/engine_options.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace megaserve::engine {
namespace {

using ::testing::HasSubstr;

ModelConfig model_with_positions(int positions) {
  ModelConfig model;
  model.max_position_embeddings = positions;
  return model;
}

TEST(EngineOptionsTest, MaxModelLenUpToTheModelsPositions) {
  const ModelConfig model = model_with_positions(512);
  EngineOptions options;
  for (int32_t len : {0, 1, 511, 512}) {
    options.max_model_len = len;
    EXPECT_TRUE(check_engine_options(model, options).ok()) << len;
  }
  for (int32_t len : {513, 2147483647}) {
    options.max_model_len = len;
    const absl::Status status = check_engine_options(model, options);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << len;
    EXPECT_THAT(std::string(status.message()),
                HasSubstr("max_model_len " + std::to_string(len) +
                          " exceeds the model's max_position_embeddings 512"));
  }
  options.max_model_len = -1;
  EXPECT_THAT(std::string(check_engine_options(model, options).message()),
              HasSubstr("max_model_len must be >= 0"));
}

TEST(EngineOptionsTest, CountsMustBePositive) {
  const ModelConfig model = model_with_positions(512);
  EngineOptions options;
  options.max_num_seqs = 0;
  EXPECT_THAT(std::string(check_engine_options(model, options).message()),
              HasSubstr("max_num_seqs must be >= 1, got 0"));
  options = {};
  options.max_num_batched_tokens = -3;
  EXPECT_THAT(std::string(check_engine_options(model, options).message()),
              HasSubstr("max_num_batched_tokens must be >= 1, got -3"));
  options = {};
  options.max_waiting_requests = 0;
  EXPECT_THAT(std::string(check_engine_options(model, options).message()),
              HasSubstr("max_waiting_requests"));
  options = {};
  options.max_prefill_tokens_with_decodes = -1;
  EXPECT_THAT(std::string(check_engine_options(model, options).message()),
              HasSubstr("max_prefill_tokens_with_decodes must be >= 0, got -1"));
  options.max_prefill_tokens_with_decodes = 0;  // no cap
  EXPECT_TRUE(check_engine_options(model, options).ok());
}

}  // namespace
}  // namespace megaserve::engine
