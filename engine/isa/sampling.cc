// Sampling of one token: penalties, temperature, top-k / top-p / min-p filters, and a
// Gumbel-max draw keyed by (seed, token index, vocab id). The order of the steps and the
// edge-case rules are documented in sampling.h; this file follows them step by step.
#include "engine/isa/sampling.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numbers>

#include "absl/strings/str_cat.h"
#include "engine/isa/counter_rng.h"

namespace megaserve::engine {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kMaxFloat = std::numeric_limits<float>::max();

// NaN counts as -inf and +inf as the largest finite float (sampling.h, input cleaning).
float clean_logit(float x) {
  if (std::isnan(x)) return kNegInf;
  return std::min(x, kMaxFloat);
}

bool in_vocab(int32_t id, size_t vocab_size) {
  return id >= 0 && static_cast<size_t>(id) < vocab_size;
}

// The vocabulary-wide passes below keep several independent accumulators ("lanes") so that
// they are not bound by the latency of one long chain of max or add instructions.
constexpr size_t kLanes = 8;

// Largest cleaned value (-inf when none is finite).
float max_clean(std::span<const float> values) {
  float lanes[kLanes];
  std::fill(lanes, lanes + kLanes, kNegInf);
  size_t i = 0;
  for (; i + kLanes <= values.size(); i += kLanes) {
    for (size_t j = 0; j < kLanes; ++j) lanes[j] = std::max(lanes[j], clean_logit(values[i + j]));
  }
  for (; i < values.size(); ++i) lanes[0] = std::max(lanes[0], clean_logit(values[i]));
  return *std::max_element(lanes, lanes + kLanes);
}

// Argmax of cleaned values, lowest id on ties (so 0 when all are -inf).
int32_t argmax_lowest_id(std::span<const float> values) {
  const float best = max_clean(values);
  size_t i = 0;
  while (clean_logit(values[i]) != best) ++i;
  return static_cast<int32_t>(i);
}

// Four floats in one SSE register (a GCC/Clang vector extension; arithmetic, comparisons
// and ?: act lane by lane). The compiler does not vectorize exp loops by itself.
using Float4 = float __attribute__((vector_size(16)));
using Int4 = int32_t __attribute__((vector_size(16)));

// exp(d) lane by lane for d <= 0, within 3e-7 relative; NaN and d < -87 count as -87
// (e^-87 ~ 1.6e-38, nothing next to the maximum's exp(0) = 1), and d > 0 as 0.
[[gnu::always_inline]] inline Float4 exp_nonpositive4(Float4 d) {
  d = d > 0.0f ? Float4{} : d;
  d = d >= -87.0f ? d : Float4{} - 87.0f;   // NaN compares false: -87
  constexpr float kShifter = 0x1.8p23f;     // adding it rounds to an integer
  constexpr float kLn2High = 0x1.62e4p-1f;  // n * kLn2High is exact for |n| < 2^8
  constexpr float kLn2Low = static_cast<float>(std::numbers::ln2 - 0x1.62e4p-1);
  const Float4 n = (d * std::numbers::log2e_v<float> + kShifter) - kShifter;
  const Float4 r = (d - n * kLn2High) - n * kLn2Low;
  Float4 p = Float4{} + 1.0f / 720;  // Taylor series to degree 6: remainder < 3e-7
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const Int4 biased_exponent = __builtin_convertvector(n, Int4) + 127;  // n >= -126
  return p * reinterpret_cast<Float4>(biased_exponent << 23);
}

// log-softmax of the cleaned raw logits, computed once: logprob(x) = x - log_normalizer.
// The sum of exponentials runs four lanes wide in float, flushed to double every 64
// entries, so its relative error stays around 1e-6: below a float logprob's resolution
// for all but the most likely tokens, and far below what any client reads from it.
class RawLogSoftmax {
 public:
  explicit RawLogSoftmax(std::span<const float> logits) {
    const float max_logit = max_clean(logits);
    if (max_logit == kNegInf) return;  // nothing finite: every logprob is -inf
    constexpr size_t kBlock = 64;
    double sum = 0.0;
    size_t i = 0;
    for (; i + kBlock <= logits.size(); i += kBlock) {
      Float4 block_sum{};
      for (size_t j = i; j < i + kBlock; j += 4) {
        Float4 x;
        std::memcpy(&x, &logits[j], sizeof(x));
        block_sum += exp_nonpositive4(x - max_logit);
      }
      sum += static_cast<double>(block_sum[0]) + block_sum[1] + block_sum[2] + block_sum[3];
    }
    for (; i < logits.size(); ++i) sum += std::exp(clean_logit(logits[i]) - max_logit);
    log_normalizer_ = max_logit + std::log(sum);
  }
  float logprob(float raw_logit) const {
    return static_cast<float>(static_cast<double>(clean_logit(raw_logit)) - log_normalizer_);
  }

 private:
  // +inf when no logit is finite, which turns every logprob into -inf.
  double log_normalizer_ = std::numeric_limits<double>::infinity();
};

// The n best ids by raw logit (best first, lower id first on ties), with their logprobs.
std::vector<std::pair<int32_t, float>> top_logprobs(std::span<const float> logits,
                                                    const RawLogSoftmax& log_softmax, size_t n) {
  n = std::min(n, logits.size());
  if (n == 0) return {};
  // "a before b" means a ranks better. The heap keeps the n best seen so far, worst on top.
  auto better = [&](int32_t a, int32_t b) {
    const float la = clean_logit(logits[a]);
    const float lb = clean_logit(logits[b]);
    return la > lb || (la == lb && a < b);
  };
  std::vector<int32_t> heap;
  heap.reserve(n);
  for (size_t i = 0; i < logits.size(); ++i) {
    const auto id = static_cast<int32_t>(i);
    if (heap.size() < n) {
      heap.push_back(id);
      std::push_heap(heap.begin(), heap.end(), better);
    } else if (better(id, heap.front())) {
      std::pop_heap(heap.begin(), heap.end(), better);
      heap.back() = id;
      std::push_heap(heap.begin(), heap.end(), better);
    }
  }
  std::sort(heap.begin(), heap.end(), better);
  std::vector<std::pair<int32_t, float>> result;
  result.reserve(n);
  for (int32_t id : heap) result.emplace_back(id, log_softmax.logprob(logits[id]));
  return result;
}

// Step 5's scaled logit: s = (logit - max logit) * (1 / temperature) <= 0, in double.
class ScaledLogit {
 public:
  ScaledLogit(float max_logit, float temperature)
      : max_logit_(max_logit), inverse_temperature_(1.0 / static_cast<double>(temperature)) {}
  double operator()(float logit) const {
    return (static_cast<double>(logit) - max_logit_) * inverse_temperature_;
  }

 private:
  double max_logit_;
  double inverse_temperature_;
};

// Step 6 as a threshold: the k-th largest finite logit, or -inf when at most k are finite
// (then top-k keeps everything). Every filter keeps an upper set of s, so thresholds compose.
float top_k_logit(std::span<const float> processed, size_t k) {
  std::vector<float> best;  // min-heap of the k largest seen so far
  best.reserve(std::min(k, processed.size()));
  for (float x : processed) {
    if (x == kNegInf) continue;
    if (best.size() < k) {
      best.push_back(x);
      std::push_heap(best.begin(), best.end(), std::greater<float>());
    } else if (x > best.front()) {
      std::pop_heap(best.begin(), best.end(), std::greater<float>());
      best.back() = x;
      std::push_heap(best.begin(), best.end(), std::greater<float>());
    }
  }
  return best.size() == k ? best.front() : kNegInf;
}

// Step 7's weights, four tokens at a time: for logits x (padding: -inf), the weight
// exp((x - max) / T) in float and its histogram bucket. Both top-p passes call this, so
// they agree exactly on every token's bucket and weight.
class TopPLanes {
 public:
  static constexpr int kBucketsPerNat = 64;
  static constexpr int kBuckets = 64 * kBucketsPerNat;  // s in [-64, 0], then the rest

  TopPLanes(float max_logit, float temperature, float logit_floor)
      : max_logit_(max_logit),
        // Clamped so that (max - max) * inverse stays 0 for absurdly small temperatures.
        inverse_temperature_(std::min(1.0f / temperature, kMaxFloat)),
        logit_floor_(logit_floor) {}

  // Loads the 4 logits at `x` (only `count` of them when fewer remain).
  void load(const float* x, size_t count) {
    if (count == 4) {
      std::memcpy(&x_, x, sizeof(x_));  // a fixed size: one unaligned load
    } else {
      x_ = Float4{} + kNegInf;
      for (size_t i = 0; i < count; ++i) x_[i] = x[i];
    }
    const Float4 s = (x_ - max_logit_) * inverse_temperature_;
    weight_ = exp_nonpositive4(s);
    Float4 bucket = -s * static_cast<float>(kBucketsPerNat);
    bucket = bucket < static_cast<float>(kBuckets - 1) ? bucket : Float4{} + (kBuckets - 1);
    bucket_ = __builtin_convertvector(bucket, Int4);
    kept_ = (x_ >= logit_floor_) & (x_ > kNegInf);  // lanes of all ones where kept
  }
  bool kept(int lane) const { return kept_[lane] != 0; }
  float logit(int lane) const { return x_[lane]; }
  float weight(int lane) const { return weight_[lane]; }
  int bucket(int lane) const { return bucket_[lane]; }

 private:
  float max_logit_;
  float inverse_temperature_;
  float logit_floor_;
  Float4 x_{};
  Float4 weight_{};
  Int4 bucket_{};
  Int4 kept_{};
};

// Step 7 as a threshold on logits, over the tokens with logit >= logit_floor: the logit of
// the last token of the smallest best-first prefix whose weight reaches top_p of their total.
//
// Two passes, no sort of the vocabulary: the first sums weights into buckets of s (a
// histogram, best first), which locates the bucket where the running mass reaches the
// target; the second collects only that bucket's tokens, which are sorted to find the exact
// end. Tokens below the histogram's range share its last bucket, which is exact too, just
// slower if the end ever falls there (it would take top_p within about 1e-23 of 1).
float top_p_logit(std::span<const float> processed, float max_logit, float temperature,
                  float logit_floor, double top_p) {
  TopPLanes lanes(max_logit, temperature, logit_floor);
  std::vector<double> mass(TopPLanes::kBuckets, 0.0);
  double total = 0.0;
  for (size_t i = 0; i < processed.size(); i += 4) {
    lanes.load(&processed[i], std::min<size_t>(4, processed.size() - i));
    for (int lane = 0; lane < 4; ++lane) {
      if (!lanes.kept(lane)) continue;
      mass[lanes.bucket(lane)] += lanes.weight(lane);
      total += lanes.weight(lane);
    }
  }
  const double target = top_p * total;
  int end_bucket = 0;
  double mass_before = 0.0;  // of the buckets before end_bucket
  while (end_bucket < TopPLanes::kBuckets - 1 && mass_before + mass[end_bucket] < target) {
    mass_before += mass[end_bucket++];
  }
  struct Member {
    float logit;
    float weight;
    int32_t id;
  };
  std::vector<Member> members;
  for (size_t i = 0; i < processed.size(); i += 4) {
    lanes.load(&processed[i], std::min<size_t>(4, processed.size() - i));
    for (int lane = 0; lane < 4; ++lane) {
      if (!lanes.kept(lane) || lanes.bucket(lane) != end_bucket) continue;
      members.push_back({lanes.logit(lane), lanes.weight(lane), static_cast<int32_t>(i + lane)});
    }
  }
  // Empty only when rounding left the running mass just short of the target in every
  // bucket and the last one has no tokens: then the prefix is everything.
  if (members.empty()) return logit_floor;
  std::sort(members.begin(), members.end(), [](const Member& a, const Member& b) {
    return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
  });
  for (const Member& m : members) {
    mass_before += m.weight;
    if (mass_before >= target) return m.logit;
  }
  // Short of the target only by rounding: the bucket's lightest token ends the prefix.
  return members.back().logit;
}

// Top-k at or below this leaves a short list of candidates (at most k plus boundary ties).
constexpr int kShortListTopK = 1024;

// Step 7 over a short list of candidate ids (reordered here): sorted best first, the logit
// of the last token of the smallest prefix whose weight reaches top_p of their total.
float top_p_logit(std::span<const float> processed, std::vector<int32_t>& ids,
                  const ScaledLogit& scaled, double top_p) {
  std::sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) {
    return processed[a] > processed[b] || (processed[a] == processed[b] && a < b);
  });
  double total = 0.0;
  for (int32_t id : ids) total += std::exp(scaled(processed[id]));
  const double target = top_p * total;
  double mass = 0.0;
  for (int32_t id : ids) {
    mass += std::exp(scaled(processed[id]));
    if (mass >= target) return processed[id];
  }
  return processed[ids.back()];  // short of the target only by rounding: keep all
}

// Lower bounds of log(-log u) for the draw's pruning, by the number of leading zeros of
// ~bits (see draw): kLogExponentialFloor[c] = (11 - c) ln 2, c in [12, 64].
constexpr auto kLogExponentialFloor = [] {
  std::array<double, 65> table{};
  for (int c = 0; c <= 64; ++c) table[c] = (11 - c) * std::numbers::ln2;
  return table;
}();

// Steps 5-9 over the processed logits, whose largest value, at `top`, is finite.
//
// Step 9 is the argmax of s + Gumbel(seed, token_index, id) over the kept tokens, where
// Gumbel = -log(E), E = -log(u). Most tokens cannot win, and proving it is cheaper than the
// two logarithms of their noise: u = (k + 0.5) / 2^52 with k the top 52 bits, so
// 1 - u = (r + 0.5) / 2^52 with r = (~bits) >> 12, and E >= 1 - u >= 2^(11 - clz(r)) (also
// for r = 0, where clz = 64). So the key is at most s - (11 - clz(r)) ln 2. A token whose
// bound is below the best key so far by more than ln 2 (a margin far above rounding error)
// is skipped; -inf logits always are. Starting from the largest logit, which every filter
// keeps, makes the bound tight at once. The result is the plain argmax over kept tokens.
int32_t draw(std::span<const float> processed, int32_t top, const scheduler::SamplingParams& params,
             const SamplingContext& context) {
  const ScaledLogit scaled(processed[top], params.temperature);
  float logit_floor = kNegInf;  // steps 6 and 7 keep the logits >= logit_floor
  // A small top-k leaves a short list of tokens: steps 7-9 then visit only those.
  std::vector<int32_t> short_list;
  const bool use_short_list = params.top_k > 0 && params.top_k <= kShortListTopK;
  if (params.top_k > 0) {
    logit_floor = top_k_logit(processed, static_cast<size_t>(params.top_k));
    for (size_t i = 0; use_short_list && i < processed.size(); ++i) {
      if (processed[i] != kNegInf && processed[i] >= logit_floor) {
        short_list.push_back(static_cast<int32_t>(i));
      }
    }
  }
  if (params.top_p < 1.0f) {
    const double top_p = std::max(0.0, static_cast<double>(params.top_p));
    logit_floor =
        std::max(logit_floor, use_short_list ? top_p_logit(processed, short_list, scaled, top_p)
                                             : top_p_logit(processed, processed[top],
                                                           params.temperature, logit_floor, top_p));
  }
  // Step 8: p / p_max = exp(s - 0); checked only for tokens that could win the draw.
  const double min_ratio = std::clamp(static_cast<double>(params.min_p), 0.0, 1.0);

  const uint64_t stream = rng::stream_for(context.seed, context.token_index);
  int32_t best_id = top;
  double best_key = rng::gumbel_for(context.seed, context.token_index, top);  // s = 0
  auto consider = [&](int32_t id) {
    const double s = scaled(processed[id]);
    const uint64_t bits = rng::bits_for(stream, id);
    const int leading_zeros = std::countl_zero((~bits) >> 12);
    if (s - kLogExponentialFloor[leading_zeros] + std::numbers::ln2 < best_key) return;
    if (processed[id] < logit_floor || std::exp(s) < min_ratio) return;  // steps 6-8
    const double key = s + rng::gumbel_from_uniform(rng::uniform_from_bits(bits));
    if (key > best_key || (key == best_key && id < best_id)) {
      best_key = key;
      best_id = id;
    }
  };
  if (use_short_list) {
    for (int32_t id : short_list) consider(id);
  } else {
    for (size_t i = 0; i < processed.size(); ++i) consider(static_cast<int32_t>(i));
  }
  return best_id;
}

}  // namespace

absl::Status validate_sampling_inputs(int64_t vocab_size, const scheduler::SamplingParams& params,
                                      const SamplingContext& context) {
  if (vocab_size < 1) return absl::InvalidArgumentError("sampling: empty vocabulary (no logits)");
  if (!(params.temperature >= 0.0f) || std::isinf(params.temperature)) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be finite and >= 0, got ", params.temperature));
  }
  if (params.top_k < 0) {
    return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", params.top_k));
  }
  if (!(params.top_p > 0.0f && params.top_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", params.top_p));
  }
  if (!(params.min_p >= 0.0f && params.min_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("min_p must be in [0, 1], got ", params.min_p));
  }
  if (!(params.repetition_penalty > 0.0f) || std::isinf(params.repetition_penalty)) {
    return absl::InvalidArgumentError(
        absl::StrCat("repetition_penalty must be finite and > 0, got ", params.repetition_penalty));
  }
  if (!std::isfinite(params.frequency_penalty)) {
    return absl::InvalidArgumentError(
        absl::StrCat("frequency_penalty must be finite, got ", params.frequency_penalty));
  }
  if (!std::isfinite(params.presence_penalty)) {
    return absl::InvalidArgumentError(
        absl::StrCat("presence_penalty must be finite, got ", params.presence_penalty));
  }
  if (params.logprobs < 0) {
    return absl::InvalidArgumentError(absl::StrCat("logprobs must be >= 0, got ", params.logprobs));
  }
  const auto check_ids = [&](std::span<const int32_t> ids, const char* what) -> absl::Status {
    for (int32_t id : ids) {
      if (id < 0 || id >= vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat(
            what, " contains token id ", id, " outside the vocabulary [0, ", vocab_size, ")"));
      }
    }
    return absl::OkStatus();
  };
  if (auto s = check_ids(context.prompt_token_ids, "prompt_token_ids"); !s.ok()) return s;
  if (auto s = check_ids(context.output_token_ids, "output_token_ids"); !s.ok()) return s;
  return check_ids(context.banned_ids, "banned_ids");
}

std::vector<float> apply_penalties(std::span<const float> logits,
                                   const scheduler::SamplingParams& params,
                                   const SamplingContext& context) {
  const size_t vocab_size = logits.size();
  std::vector<float> out(logits.begin(), logits.end());
  size_t i = 0;
  for (; i + 4 <= vocab_size; i += 4) {  // input cleaning, four lanes at a time
    Float4 x;
    std::memcpy(&x, &out[i], sizeof(x));
    x = x == x ? x : Float4{} + kNegInf;           // NaN -> -inf
    x = x < kMaxFloat ? x : Float4{} + kMaxFloat;  // +inf -> largest finite
    std::memcpy(&out[i], &x, sizeof(x));
  }
  for (; i < vocab_size; ++i) out[i] = clean_logit(out[i]);

  // 1. Repetition penalty, once per distinct id of prompt and output.
  const float penalty = params.repetition_penalty;
  if (penalty != 1.0f) {
    std::vector<uint8_t> seen(vocab_size, 0);
    auto penalize = [&](std::span<const int32_t> ids) {
      for (int32_t id : ids) {
        if (!in_vocab(id, vocab_size) || seen[id]) continue;
        seen[id] = 1;
        const float x = out[id];
        out[id] = clean_logit(x > 0.0f ? x / penalty : x * penalty);
      }
    };
    penalize(context.prompt_token_ids);
    penalize(context.output_token_ids);
  }

  // 2. Frequency and presence penalties, from the count of each id in the output.
  if (params.frequency_penalty != 0.0f || params.presence_penalty != 0.0f) {
    std::vector<int32_t> ids(context.output_token_ids.begin(), context.output_token_ids.end());
    std::erase_if(ids, [&](int32_t id) { return !in_vocab(id, vocab_size); });
    std::sort(ids.begin(), ids.end());
    for (size_t run = 0; run < ids.size();) {
      size_t end = run;
      while (end < ids.size() && ids[end] == ids[run]) ++end;
      const auto count = static_cast<float>(end - run);
      float& x = out[ids[run]];
      x = clean_logit(x - (params.frequency_penalty * count + params.presence_penalty));
      run = end;
    }
  }

  // 3. Banned ids.
  for (int32_t id : context.banned_ids) {
    if (in_vocab(id, vocab_size)) out[id] = kNegInf;
  }
  return out;
}

scheduler::SampledToken sample_token(std::span<const float> logits,
                                     const scheduler::SamplingParams& params,
                                     const SamplingContext& context) {
  scheduler::SampledToken result;
  if (logits.empty()) return result;  // broken precondition: token 0 (sampling.h)
  const std::vector<float> processed = apply_penalties(logits, params, context);
  const int32_t top = argmax_lowest_id(processed);
  if (processed[top] == kNegInf) {
    result.token_id = argmax_lowest_id(logits);  // nothing left: sampling.h step 3 fallback
  } else if (!(params.temperature > 0.0f)) {
    result.token_id = top;  // step 4
  } else {
    result.token_id = draw(processed, top, params, context);
  }
  const RawLogSoftmax log_softmax(logits);
  result.logprob = log_softmax.logprob(logits[result.token_id]);
  if (params.logprobs > 0) {
    result.top_logprobs = top_logprobs(logits, log_softmax, static_cast<size_t>(params.logprobs));
  }
  return result;
}

double uniform_for(uint64_t seed, int64_t token_index, int32_t vocab_id) {
  return rng::uniform_for(seed, token_index, vocab_id);
}

double gumbel_for(uint64_t seed, int64_t token_index, int32_t vocab_id) {
  return rng::gumbel_for(seed, token_index, vocab_id);
}

}  // namespace megaserve::engine
