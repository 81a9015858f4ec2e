// Sampling of one token: penalties, temperature, top-k / top-p / min-p filters, and a
// Gumbel-max draw keyed by (seed, token index, vocab id). The order of the steps and the
// edge-case rules are documented in sampling.h; this file follows them step by step.
#include "engine/sampling.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <functional>
#include <limits>
#include <numbers>

#include "absl/strings/str_cat.h"
#include "engine/counter_rng.h"

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

// exp(x) for x <= 0 or -inf, within about 1e-14 relative, as inline arithmetic that
// pipelines (a libm call per vocabulary entry dominated the sums). Values below e^-708
// come out as about 3e-308 instead of smaller: negligible in sums that include exp(0) = 1.
[[gnu::always_inline]] inline double exp_nonpositive(double x) {
  x = std::max(x, -708.0);
  // x = n ln2 + r with n = round(x log2 e), |r| <= ln2 / 2; ln2 split so that n * kLn2High
  // is exact (Cody and Waite).
  constexpr double kShifter = 0x1.8p52;  // adding it rounds to an integer
  constexpr double kLn2High = 0x1.62e42feep-1;
  constexpr double kLn2Low = std::numbers::ln2 - kLn2High;
  const double n = (x * std::numbers::log2e + kShifter) - kShifter;
  const double r = (x - n * kLn2High) - n * kLn2Low;
  // Taylor series of e^r to degree 11 (the remainder is below 1e-14 for |r| <= 0.35), in
  // Estrin's form: a short dependency chain, so that neighbouring entries overlap.
  const double r2 = r * r;
  const double r4 = r2 * r2;
  const double c01 = 1.0 + r;
  const double c23 = 1.0 / 2 + r * (1.0 / 6);
  const double c45 = 1.0 / 24 + r * (1.0 / 120);
  const double c67 = 1.0 / 720 + r * (1.0 / 5040);
  const double c89 = 1.0 / 40320 + r * (1.0 / 362880);
  const double c1011 = 1.0 / 3628800 + r * (1.0 / 39916800);
  const double low = c01 + r2 * c23;
  const double middle = c45 + r2 * c67;
  const double high = c89 + r2 * c1011;
  const double p = low + r4 * (middle + r4 * high);
  const auto biased_exponent = static_cast<uint64_t>(static_cast<int64_t>(n) + 1023);
  return p * std::bit_cast<double>(biased_exponent << 52);  // n >= -1022: a normal 2^n
}

// log-softmax of the cleaned raw logits, computed once: logprob(x) = x - log_normalizer.
class RawLogSoftmax {
 public:
  explicit RawLogSoftmax(std::span<const float> logits) {
    const double max_logit = max_clean(logits);
    if (max_logit == kNegInf) return;  // nothing finite: every logprob is -inf
    double lanes[kLanes] = {};
    size_t i = 0;
    for (; i + kLanes <= logits.size(); i += kLanes) {
      for (size_t j = 0; j < kLanes; ++j) {
        lanes[j] += exp_nonpositive(clean_logit(logits[i + j]) - max_logit);
      }
    }
    for (; i < logits.size(); ++i) lanes[0] += exp_nonpositive(clean_logit(logits[i]) - max_logit);
    double sum = 0.0;
    for (double lane : lanes) sum += lane;
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

// A token in the running for top-p, with its unnormalized probability exp(s).
struct Weighted {
  double s;
  double weight;
  int32_t id;
};

struct BetterWeighted {  // best first; ids break ties so that the order is deterministic
  bool operator()(const Weighted& a, const Weighted& b) const {
    return a.s > b.s || (a.s == b.s && a.id < b.id);
  }
};

// Step 7 as a threshold on s, over the tokens with s >= s_floor: the s of the last token of
// the smallest best-first prefix whose weight reaches top_p of their total.
//
// Only tokens of weight >= (1 - top_p) * total / n can end that prefix: the lighter ones
// weigh less than (1 - top_p) * total together, so the heavier ones reach top_p before any
// lighter one is needed. Among the heavy ones a weighted quickselect finds the end in
// expected linear time, without a full sort.
double top_p_threshold(std::span<const float> processed, const ScaledLogit& scaled, double s_floor,
                       double top_p) {
  // weight[i] = exp(s) for tokens still in the running, -1 for the others.
  std::vector<double> weight(processed.size());
  double lanes[kLanes] = {};
  size_t n = 0;
  for (size_t i = 0; i < processed.size(); ++i) {
    const double s = scaled(processed[i]);
    const bool in = processed[i] != kNegInf && s >= s_floor;
    weight[i] = in ? exp_nonpositive(s) : -1.0;
    lanes[i % kLanes] += in ? weight[i] : 0.0;
    n += in;
  }
  double total = 0.0;
  for (double lane : lanes) total += lane;
  const double light = (1.0 - top_p) * total / static_cast<double>(n);
  std::vector<Weighted> heavy;
  for (size_t i = 0; i < processed.size(); ++i) {
    if (weight[i] >= 0.0 && weight[i] >= light) {
      heavy.push_back({scaled(processed[i]), weight[i], static_cast<int32_t>(i)});
    }
  }
  // The top token weighs exp(0) = 1 >= light, so `heavy` is never empty; stay safe anyway.
  if (heavy.empty()) return 0.0;
  const double target = top_p * total;
  // Invariant: [0, lo) ranks before every element of [lo, hi), its weight is `mass_before`
  // and < target, and the prefix that first reaches the target ends inside [lo, hi).
  size_t lo = 0;
  size_t hi = heavy.size();
  double mass_before = 0.0;
  constexpr size_t kSortBelow = 64;
  while (hi - lo > kSortBelow) {
    const size_t mid = lo + (hi - lo) / 2;
    std::nth_element(heavy.begin() + lo, heavy.begin() + mid, heavy.begin() + hi, BetterWeighted());
    double first_half = 0.0;
    for (size_t i = lo; i < mid; ++i) first_half += heavy[i].weight;
    if (mass_before + first_half >= target) {
      hi = mid;
    } else {
      mass_before += first_half;
      lo = mid;
    }
  }
  std::sort(heavy.begin() + lo, heavy.begin() + hi, BetterWeighted());
  for (size_t i = lo; i < hi; ++i) {
    mass_before += heavy[i].weight;
    if (mass_before >= target) return heavy[i].s;
  }
  // Short of the target only by rounding: the lightest heavy token ends the prefix.
  return heavy[hi - 1].s;
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
  double s_floor = -std::numeric_limits<double>::infinity();  // kept: s >= s_floor
  if (params.top_k > 0) {
    const float kth = top_k_logit(processed, static_cast<size_t>(params.top_k));
    if (kth != kNegInf) s_floor = scaled(kth);
  }
  if (params.top_p < 1.0f) {
    const double top_p = std::max(0.0, static_cast<double>(params.top_p));
    s_floor = std::max(s_floor, top_p_threshold(processed, scaled, s_floor, top_p));
  }
  // Step 8: p / p_max = exp(s - 0); checked only for tokens that could win the draw.
  const double min_ratio = std::clamp(static_cast<double>(params.min_p), 0.0, 1.0);

  const uint64_t stream = rng::stream_for(context.seed, context.token_index);
  int32_t best_id = top;
  double best_key = rng::gumbel_for(context.seed, context.token_index, top);  // s = 0
  for (size_t i = 0; i < processed.size(); ++i) {
    const auto id = static_cast<int32_t>(i);
    const double s = scaled(processed[i]);
    const uint64_t bits = rng::bits_for(stream, id);
    const int leading_zeros = std::countl_zero((~bits) >> 12);
    if (s - kLogExponentialFloor[leading_zeros] + std::numbers::ln2 < best_key) continue;
    if (s < s_floor || std::exp(s) < min_ratio) continue;  // filtered by steps 6-8
    const double key = s + rng::gumbel_from_uniform(rng::uniform_from_bits(bits));
    if (key > best_key || (key == best_key && id < best_id)) {
      best_key = key;
      best_id = id;
    }
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
  std::vector<float> out(vocab_size);
  for (size_t i = 0; i < vocab_size; ++i) out[i] = clean_logit(logits[i]);

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
