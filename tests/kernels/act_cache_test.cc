// The activation cache's keys and claims (kernels/act_cache.h [ACT_CACHE]): a block's key
// differs from every other block's and step's; a pass reads the cache only once its block is
// published, one CTA at a time fills it (the others convert for themselves meanwhile), and
// flags left by other steps, other blocks or the poisoning are claimed again.
#include "kernels/act_cache.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <set>

namespace megaserve::kernels {
namespace {

// A flag word and its compare-and-swap, as the device's.
struct Flag {
  uint64_t value = 0;
  uint64_t cas(uint64_t expected, uint64_t desired) {
    const uint64_t old = value;
    if (old == expected) value = desired;
    return old;
  }
  int32_t claim(uint64_t key) {
    return claim_act_block(value, key, [this](uint64_t e, uint64_t d) { return cas(e, d); });
  }
};

TEST(ActCache, KeysDifferByEpochTagRowsAndPassShape) {
  std::set<uint64_t> keys;
  int made = 0;
  for (uint32_t epoch : {1u, 2u, 0xfffffffeu}) {
    for (int32_t tag : {2 * 65536, 2 * 65536 + 31, 6 * 65536, 10 * 65536 + 4095}) {
      for (int32_t nr : {1, 63, 64, 100, 128}) {
        for (int32_t rows : {64, 128}) {
          if (nr > rows) continue;
          const uint64_t key = act_block_key(epoch, tag, nr, rows);
          EXPECT_EQ(key & 1, 0u);
          keys.insert(key);
          keys.insert(key | 1);
          made += 2;
        }
      }
    }
  }
  EXPECT_EQ(static_cast<int>(keys.size()), made);
  EXPECT_EQ(keys.count(~uint64_t{0}), 0u);  // the poison is nobody's key
  EXPECT_EQ(keys.count(0), 0u);             // nor is a fresh (zeroed) flag
}

TEST(ActCache, OneCtaFillsTheOthersConvertUntilItPublishes) {
  const uint64_t key = act_block_key(7, 6 * 65536 + 3, 128, 128);
  Flag f;  // zeroed, as allocated
  EXPECT_EQ(f.claim(key), kActFill);
  EXPECT_EQ(f.value, key);
  EXPECT_EQ(f.claim(key), kActConvert);  // being filled
  EXPECT_EQ(f.claim(key), kActConvert);
  f.value = key | 1;  // the filler publishes
  EXPECT_EQ(f.claim(key), kActCached);
  EXPECT_EQ(f.claim(key), kActCached);
  // The next layer, another op or another step's block: claimed again.
  const uint64_t next = act_block_key(7, 2 * 65536 + 4, 64, 64);
  EXPECT_EQ(f.claim(next), kActFill);
  EXPECT_EQ(f.claim(key), kActFill);  // the old block's key no longer held
  const uint64_t later = act_block_key(8, 6 * 65536 + 3, 128, 128);
  f.value = key | 1;
  EXPECT_EQ(f.claim(later), kActFill);
  f.value = ~uint64_t{0};  // poisoned
  EXPECT_EQ(f.claim(key), kActFill);
}

TEST(ActCache, ALostClaimReadsWhatTheWinnerLeft) {
  const uint64_t key = act_block_key(3, 5 * 65536, 64, 64);
  const uint64_t stale = act_block_key(2, 5 * 65536, 64, 64) | 1;
  // Both saw the stale value; the winner's swap lands first.
  const auto lost_to = [&](uint64_t now) {
    return claim_act_block(stale, key, [&](uint64_t, uint64_t) { return now; });
  };
  EXPECT_EQ(lost_to(key), kActConvert);  // still filling
  EXPECT_EQ(lost_to(key | 1), kActCached);
  EXPECT_EQ(lost_to(act_block_key(3, 6 * 65536, 64, 64)), kActConvert);  // someone else's block
}

TEST(ActCache, OnlyAlignedRowsOfTaggedActivationsAsWideAsTheCache) {
  uint16_t storage[1];
  const ActCache c{storage, nullptr, nullptr, 1024, 4096, 1};
  EXPECT_TRUE(act_cacheable(c, 7, 4096, 0, 128));
  EXPECT_TRUE(act_cacheable(c, 7, 4096, 64, 64));
  EXPECT_TRUE(act_cacheable(c, 7, 4096, 896, 128));
  EXPECT_FALSE(act_cacheable(c, 7, 4096, 960, 128));  // past the capacity
  EXPECT_FALSE(act_cacheable(c, 7, 4096, 100, 64));   // not on a flag's rows
  EXPECT_FALSE(act_cacheable(c, -1, 4096, 0, 64));    // untagged (LM head)
  EXPECT_FALSE(act_cacheable(c, 7, 14336, 0, 64));    // wider than the rows (down)
  EXPECT_FALSE(act_cacheable(c, 7, 2048, 0, 64));     // narrower
  const ActCache none{nullptr, nullptr, nullptr, 0, 4096, 1};
  EXPECT_FALSE(act_cacheable(none, 7, 4096, 0, 64));
}

}  // namespace
}  // namespace megaserve::kernels
