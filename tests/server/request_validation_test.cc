#include "server/request_validation.h"

#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "engine/model/tokenizer.h"
#include "gtest/gtest.h"
#include "tests/support/assets.h"

namespace megaserve::server {
namespace {

constexpr char kTokenizer[] = "models/stories260K/tok512.model";
const RequestLimits kLimits{/*vocab_size=*/512, /*max_model_len=*/64};

class RequestValidationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    MEGASERVE_REQUIRE_ASSET(kTokenizer);
    auto tokenizer = engine::Tokenizer::load(megaserve::testing::assets_dir() / kTokenizer);
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = *std::move(tokenizer);
  }
  absl::StatusOr<engine::GenerateRequest> convert(const v1::GenerateRequest& request) {
    return to_engine_request(request, *tokenizer_, kLimits);
  }
  std::unique_ptr<engine::Tokenizer> tokenizer_;
};

v1::GenerateRequest ids_request(std::vector<int32_t> ids) {
  v1::GenerateRequest r;
  for (int32_t id : ids) r.mutable_token_ids()->add_ids(id);
  return r;
}

TEST_F(RequestValidationTest, UnsetFieldsMeanTheNeutralDefaults) {
  v1::GenerateRequest request;
  request.set_text("Once upon a time");
  auto out = convert(request);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->prompt_token_ids, (std::vector<int32_t>{1, 403, 407, 261, 378}));
  EXPECT_EQ(out->sampling.temperature, 1.0f);  // not 0: unset is not greedy
  EXPECT_EQ(out->sampling.top_p, 1.0f);
  EXPECT_EQ(out->sampling.top_k, 0);
  EXPECT_EQ(out->sampling.min_p, 0.0f);
  EXPECT_EQ(out->sampling.repetition_penalty, 1.0f);
  EXPECT_EQ(out->sampling.max_tokens, kDefaultMaxTokens);
  EXPECT_FALSE(out->sampling.seed.has_value());
  EXPECT_FALSE(out->sampling.ignore_eos);
}

TEST_F(RequestValidationTest, SetFieldsAreCarriedOver) {
  v1::GenerateRequest request = ids_request({1, 5, 6});
  v1::SamplingParameters* p = request.mutable_params();
  p->set_temperature(0.0f);
  p->set_top_p(0.5f);
  p->set_top_k(7);
  p->set_min_p(0.1f);
  p->set_repetition_penalty(1.3f);
  p->set_frequency_penalty(-0.5f);
  p->set_presence_penalty(0.25f);
  p->set_seed(99);
  p->set_max_tokens(10);
  p->set_min_tokens(3);
  p->add_stop("end");
  p->add_stop_token_ids(13);
  p->set_ignore_eos(true);
  p->set_logprobs(5);
  request.set_priority(-2);
  auto out = convert(request);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->prompt_token_ids, (std::vector<int32_t>{1, 5, 6}));
  const scheduler::SamplingParams& s = out->sampling;
  EXPECT_EQ(s.temperature, 0.0f);
  EXPECT_EQ(s.top_p, 0.5f);
  EXPECT_EQ(s.top_k, 7);
  EXPECT_EQ(s.min_p, 0.1f);
  EXPECT_EQ(s.repetition_penalty, 1.3f);
  EXPECT_EQ(s.frequency_penalty, -0.5f);
  EXPECT_EQ(s.presence_penalty, 0.25f);
  EXPECT_EQ(s.seed, 99u);
  EXPECT_EQ(s.max_tokens, 10);
  EXPECT_EQ(s.min_tokens, 3);
  EXPECT_EQ(s.stop_strings, std::vector<std::string>{"end"});
  EXPECT_EQ(s.stop_token_ids, std::vector<int32_t>{13});
  EXPECT_TRUE(s.ignore_eos);
  EXPECT_EQ(s.logprobs, 5);
  EXPECT_EQ(out->priority, -2);
}

struct BadCase {
  const char* name;
  std::function<void(v1::GenerateRequest*)> mutate;
  const char* field;  // must appear in the message
};

TEST_F(RequestValidationTest, EveryBadFieldIsNamed) {
  const BadCase cases[] = {
      {"no input", [](v1::GenerateRequest* r) { r->clear_input(); }, "input"},
      {"empty text", [](v1::GenerateRequest* r) { r->set_text(""); }, "text"},
      {"empty ids", [](v1::GenerateRequest* r) { r->mutable_token_ids()->clear_ids(); },
       "token_ids"},
      {"id too big", [](v1::GenerateRequest* r) { r->mutable_token_ids()->add_ids(512); },
       "token_ids[3] = 512"},
      {"negative id", [](v1::GenerateRequest* r) { r->mutable_token_ids()->set_ids(0, -1); },
       "token_ids[0]"},
      {"temperature", [](v1::GenerateRequest* r) { r->mutable_params()->set_temperature(-0.1f); },
       "temperature"},
      {"temperature nan", [](v1::GenerateRequest* r) { r->mutable_params()->set_temperature(NAN); },
       "temperature"},
      {"top_p 0", [](v1::GenerateRequest* r) { r->mutable_params()->set_top_p(0.0f); }, "top_p"},
      {"top_p > 1", [](v1::GenerateRequest* r) { r->mutable_params()->set_top_p(1.01f); }, "top_p"},
      {"top_k", [](v1::GenerateRequest* r) { r->mutable_params()->set_top_k(-1); }, "top_k"},
      {"min_p", [](v1::GenerateRequest* r) { r->mutable_params()->set_min_p(1.5f); }, "min_p"},
      {"repetition 0",
       [](v1::GenerateRequest* r) { r->mutable_params()->set_repetition_penalty(0.0f); },
       "repetition_penalty"},
      {"repetition big",
       [](v1::GenerateRequest* r) { r->mutable_params()->set_repetition_penalty(11.0f); },
       "repetition_penalty"},
      {"frequency",
       [](v1::GenerateRequest* r) { r->mutable_params()->set_frequency_penalty(2.5f); },
       "frequency_penalty"},
      {"presence", [](v1::GenerateRequest* r) { r->mutable_params()->set_presence_penalty(-3.0f); },
       "presence_penalty"},
      {"max_tokens", [](v1::GenerateRequest* r) { r->mutable_params()->set_max_tokens(0); },
       "max_tokens"},
      {"min > max",
       [](v1::GenerateRequest* r) {
         r->mutable_params()->set_max_tokens(4);
         r->mutable_params()->set_min_tokens(5);
       },
       "min_tokens"},
      {"min negative", [](v1::GenerateRequest* r) { r->mutable_params()->set_min_tokens(-1); },
       "min_tokens"},
      {"logprobs", [](v1::GenerateRequest* r) { r->mutable_params()->set_logprobs(21); },
       "logprobs"},
      {"logprobs negative", [](v1::GenerateRequest* r) { r->mutable_params()->set_logprobs(-1); },
       "logprobs"},
      {"empty stop", [](v1::GenerateRequest* r) { r->mutable_params()->add_stop(""); }, "stop[0]"},
      {"stop id", [](v1::GenerateRequest* r) { r->mutable_params()->add_stop_token_ids(600); },
       "stop_token_ids[0] = 600"},
  };
  for (const BadCase& c : cases) {
    v1::GenerateRequest request = ids_request({1, 5, 6});
    c.mutate(&request);
    auto out = convert(request);
    ASSERT_FALSE(out.ok()) << c.name;
    EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument) << c.name;
    EXPECT_NE(out.status().message().find(c.field), std::string::npos)
        << c.name << ": " << out.status().message();
  }
}

TEST_F(RequestValidationTest, BoundaryValuesAreAccepted) {
  v1::GenerateRequest request = ids_request({1, 5, 6});
  v1::SamplingParameters* p = request.mutable_params();
  p->set_top_p(1.0f);
  p->set_min_p(1.0f);
  p->set_repetition_penalty(kMaxRepetitionPenalty);
  p->set_frequency_penalty(-2.0f);
  p->set_presence_penalty(2.0f);
  p->set_logprobs(kMaxLogprobs);
  p->set_max_tokens(61);  // 3 + 61 = 64 = max_model_len
  p->set_min_tokens(61);
  EXPECT_TRUE(convert(request).ok());
}

TEST_F(RequestValidationTest, TooLongGivesBothLengths) {
  v1::GenerateRequest request = ids_request(std::vector<int32_t>(64, 5));
  auto out = convert(request);
  ASSERT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(out.status().message().find("64 tokens"), std::string::npos) << out.status().message();
  EXPECT_NE(out.status().message().find("context is 64"), std::string::npos);

  request = ids_request(std::vector<int32_t>(50, 5));
  request.mutable_params()->set_max_tokens(15);
  out = convert(request);
  ASSERT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(out.status().message().find("prompt has 50 tokens and max_tokens is 15"),
            std::string::npos)
      << out.status().message();
  EXPECT_NE(out.status().message().find("64"), std::string::npos);

  // Unset max_tokens shrinks to what still fits instead of failing.
  request.mutable_params()->clear_max_tokens();
  out = convert(request);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(out->sampling.max_tokens, 14);
}

// Issue 18: prompt + max_tokens past INT32_MAX printed a wrapped, negative sum.
TEST_F(RequestValidationTest, TooLongPrintsTheSumWithoutWrapping) {
  const RequestLimits limits{/*vocab_size=*/512, /*max_model_len=*/2147483647};
  v1::GenerateRequest request = ids_request({1, 5, 6, 7});
  request.mutable_params()->set_max_tokens(2147483647);
  auto out = to_engine_request(request, *tokenizer_, limits);
  ASSERT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(out.status().message().find(": 2147483651 tokens exceed the model's context of "
                                        "2147483647 tokens"),
            std::string::npos)
      << out.status().message();
}

// Issue 18 item 4: the byte bound is computed in 64 bits and refuses text before tokenizing.
TEST(MaxPromptTextBytesTest, SixtyFourBitsAndNoBoundWithoutATokenBound) {
  EXPECT_EQ(max_prompt_text_bytes(256, 10), 2550);
  EXPECT_EQ(max_prompt_text_bytes(INT32_MAX, 48), int64_t{INT32_MAX - 1} * 48);
  EXPECT_EQ(max_prompt_text_bytes(256, 0), 0);
}

TEST_F(RequestValidationTest, TextLongerThanTheByteBoundIsRefusedNamingBothSizes) {
  RequestLimits limits = kLimits;
  limits.max_text_bytes = 1000;
  v1::GenerateRequest request;
  request.set_text(std::string(1001, 'x'));
  const absl::Status status = check_text_size(request, *tokenizer_, limits);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("text is 1001 bytes"), std::string::npos) << status;
  EXPECT_NE(status.message().find("at most 1000 bytes"), std::string::npos) << status;
  EXPECT_EQ(to_engine_request(request, *tokenizer_, limits).status(), status);
  // Spaces that stories260K's normalizer folds away do not count.
  request.set_text("a" + std::string(5000, ' ') + "b");
  EXPECT_TRUE(check_text_size(request, *tokenizer_, limits).ok());
  request.set_text(std::string(1000, 'x'));
  EXPECT_TRUE(check_text_size(request, *tokenizer_, limits).ok());
}

}  // namespace
}  // namespace megaserve::server
