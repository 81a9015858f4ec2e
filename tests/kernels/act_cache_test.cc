// The activation cache's key (kernels/act_cache.h [ACT_CACHE]): a pass reads cached
// activations only when the cache holds exactly its block (same tag, first source row, rows
// and pass shape) since the last fill, and every other pass that may be cached refills it.
#include "kernels/act_cache.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

namespace megaserve::kernels {
namespace {

constexpr int32_t kWidth = 4096;

ActCache fresh_cache(uint16_t* rows) {
  return ActCache{rows, nullptr, 0, kWidth, -1, nullptr, 0, 0};
}

TEST(ActCache, NeverCachedWithoutRowsTagOrWidth) {
  uint16_t storage[1];
  float x[8];
  ActCache none = fresh_cache(nullptr);
  EXPECT_EQ(choose_act_mode(none, 7, kWidth, x, 64, 64), kActConvert);
  EXPECT_EQ(choose_act_mode(none, 7, kWidth, x, 64, 64), kActConvert);
  ActCache c = fresh_cache(storage);
  EXPECT_EQ(choose_act_mode(c, -1, kWidth, x, 64, 64), kActConvert);  // untagged (down, LM head)
  EXPECT_EQ(choose_act_mode(c, 7, kWidth + 8, x, 64, 64), kActConvert);  // wider than a row
  EXPECT_EQ(choose_act_mode(c, 7, kWidth - 8, x, 64, 64), kActConvert);  // narrower
  EXPECT_EQ(c.tag, -1);  // none of them filled it
}

TEST(ActCache, FillsThenHitsTheSameBlockOnly) {
  uint16_t storage[1];
  float x[1024];
  ActCache c = fresh_cache(storage);
  EXPECT_EQ(choose_act_mode(c, 7, kWidth, x, 128, 128), kActFill);
  EXPECT_EQ(choose_act_mode(c, 7, kWidth, x, 128, 128), kActCached);
  EXPECT_EQ(choose_act_mode(c, 7, kWidth, x, 128, 128), kActCached);
  // Any part of the key differing: a refill, after which only the new block hits.
  EXPECT_EQ(choose_act_mode(c, 8, kWidth, x, 128, 128), kActFill);  // another op or layer
  EXPECT_EQ(choose_act_mode(c, 7, kWidth, x, 128, 128), kActFill);
  EXPECT_EQ(choose_act_mode(c, 7, kWidth, x + 64, 128, 128), kActFill);  // other rows
  EXPECT_EQ(choose_act_mode(c, 7, kWidth, x, 128, 128), kActFill);
  EXPECT_EQ(choose_act_mode(c, 7, kWidth, x, 100, 128), kActFill);  // fewer rows
  EXPECT_EQ(choose_act_mode(c, 7, kWidth, x, 100, 64), kActFill);  // another pass shape
  EXPECT_EQ(choose_act_mode(c, 7, kWidth, x, 100, 64), kActCached);
}

TEST(ActCache, UncachedPassesLeaveTheBlockAndAStepResetsIt) {
  uint16_t storage[1];
  float x[1024];
  ActCache c = fresh_cache(storage);
  EXPECT_EQ(choose_act_mode(c, 7, kWidth, x, 64, 64), kActFill);
  EXPECT_EQ(choose_act_mode(c, -1, 14336, x + 512, 64, 64), kActConvert);  // a down tile
  EXPECT_EQ(choose_act_mode(c, 7, kWidth, x, 64, 64), kActCached);
  c.tag = -1;  // the next step (load_step)
  EXPECT_EQ(choose_act_mode(c, 7, kWidth, x, 64, 64), kActFill);
}

// A CTA's queue as the planner deals it: runs of tiles over one row block, then the next.
TEST(ActCache, OneFillPerRunOfTilesOverABlock) {
  uint16_t storage[1];
  float residual[4 * 128];
  ActCache c = fresh_cache(storage);
  const std::vector<int> blocks = {0, 0, 0, 1, 1, 0, 2, 2, 2, 2};
  std::vector<int32_t> modes;
  for (int b : blocks) modes.push_back(choose_act_mode(c, 3, kWidth, residual + 128 * b, 128, 128));
  const std::vector<int32_t> want = {kActFill,   kActCached, kActCached, kActFill,   kActCached,
                                     kActFill,   kActFill,   kActCached, kActCached, kActCached};
  EXPECT_EQ(modes, want);
}

}  // namespace
}  // namespace megaserve::kernels
