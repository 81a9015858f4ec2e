#include "scheduler/kv_block_pool.h"

#include <limits>
#include <numeric>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace megaserve::scheduler {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::vector<int32_t> iota_tokens(int32_t n, int32_t start) {
  std::vector<int32_t> v(n);
  std::iota(v.begin(), v.end(), start);
  return v;
}

KvBlockPool make_pool(int32_t num_blocks, bool prefix_caching = true) {
  absl::StatusOr<KvBlockPool> pool = KvBlockPool::create({16, num_blocks, prefix_caching});
  EXPECT_TRUE(pool.ok()) << pool.status();
  return *std::move(pool);
}

void expect_consistent(const KvBlockPool& pool, std::vector<const BlockTable*> tables) {
  absl::Status s = pool.check_consistency(tables);
  EXPECT_TRUE(s.ok()) << s;
}

TEST(KvBlockPoolTest, ValidatesBlockSizeAndCount) {
  for (int32_t bs : {16, 32, 64, 128}) {
    EXPECT_TRUE(KvBlockPool::validate({bs, 1, true}).ok()) << bs;
  }
  for (int32_t bs : {0, 8, 24, 48, 256}) {
    absl::Status s = KvBlockPool::validate({bs, 10, true});
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bs;
    EXPECT_THAT(s.message(), HasSubstr("kv_block_size"));
  }
  absl::Status s = KvBlockPool::validate({16, 0, true});
  EXPECT_THAT(s.message(), HasSubstr("num_kv_blocks"));
}

TEST(KvBlockPoolTest, AllocateGrowsTablesAndFreeReturnsEverything) {
  KvBlockPool pool = make_pool(4);
  BlockTable a, b;
  ASSERT_TRUE(pool.allocate(a, 17));  // positions 0..16: two blocks
  EXPECT_EQ(a.num_blocks(), 2);
  ASSERT_TRUE(pool.allocate(a, 32));  // still two
  EXPECT_EQ(a.num_blocks(), 2);
  ASSERT_TRUE(pool.allocate(b, 16));
  EXPECT_EQ(pool.num_free_blocks(), 1);
  EXPECT_EQ(pool.num_used_blocks(), 3);
  expect_consistent(pool, {&a, &b});

  // Not enough: nothing changes.
  EXPECT_FALSE(pool.allocate(b, 48));
  EXPECT_EQ(b.num_blocks(), 1);
  EXPECT_EQ(pool.num_free_blocks(), 1);
  expect_consistent(pool, {&a, &b});

  pool.free(a);
  EXPECT_TRUE(a.blocks.empty());
  EXPECT_EQ(pool.num_free_blocks(), 3);
  pool.free(b);
  EXPECT_EQ(pool.num_free_blocks(), 4);
  expect_consistent(pool, {});
}

TEST(KvBlockPoolTest, BlocksForRoundsUpWithoutWrapping) {
  KvBlockPool pool = make_pool(4);
  EXPECT_EQ(pool.blocks_for(0), 0);
  EXPECT_EQ(pool.blocks_for(16), 1);
  EXPECT_EQ(pool.blocks_for(17), 2);
  // (2^31 - 1 + 15) wraps in 32 bits; the answer is 2^27.
  EXPECT_EQ(pool.blocks_for(std::numeric_limits<int32_t>::max()), 134217728);
  BlockTable t;
  EXPECT_FALSE(pool.allocate(t, std::numeric_limits<int32_t>::max()));
  EXPECT_EQ(t.num_blocks(), 0);
  EXPECT_EQ(pool.num_free_blocks(), 4);
}

TEST(KvBlockPoolTest, MatchesLongestCachedPrefixOfFullBlocks) {
  KvBlockPool pool = make_pool(8);
  const std::vector<int32_t> tokens = iota_tokens(40, 100);
  BlockTable a;
  ASSERT_TRUE(pool.allocate(a, 40));
  pool.cache_full_blocks(a, tokens, 40, /*extra_key=*/0);
  EXPECT_EQ(a.num_hashed_blocks, 2);  // positions 32..39 are not a full block

  EXPECT_EQ(pool.match_prefix(tokens, 0),
            std::vector<int32_t>(a.blocks.begin(), a.blocks.begin() + 2));
  // Only whole blocks of the query count.
  EXPECT_EQ(pool.match_prefix(std::span(tokens).first(31), 0).size(), 1u);
  // Another extra key (say a LoRA adapter) shares nothing.
  EXPECT_TRUE(pool.match_prefix(tokens, 7).empty());
  // A difference in block 1 keeps block 0 only; in block 0, nothing.
  std::vector<int32_t> other = tokens;
  other[20] = 1;
  EXPECT_THAT(pool.match_prefix(other, 0), ElementsAre(a.blocks[0]));
  other[3] = 1;
  EXPECT_TRUE(pool.match_prefix(other, 0).empty());

  // A second request adopts the prefix: shared blocks gain a reference.
  BlockTable b;
  const std::vector<int32_t> prefix = pool.match_prefix(tokens, 0);
  ASSERT_TRUE(pool.allocate(b, 40, prefix));
  EXPECT_EQ(b.num_blocks(), 3);
  EXPECT_EQ(b.num_hashed_blocks, 2);
  EXPECT_EQ(pool.ref_count(a.blocks[0]), 2);
  EXPECT_EQ(pool.ref_count(a.blocks[1]), 2);
  EXPECT_NE(b.blocks[2], a.blocks[2]);
  EXPECT_EQ(pool.num_used_blocks(), 4);
  expect_consistent(pool, {&a, &b});
}

TEST(KvBlockPoolTest, FreedCachedBlocksStayReusableUntilEvictedLeastRecentFirst) {
  KvBlockPool pool = make_pool(4);
  const std::vector<int32_t> x = iota_tokens(32, 0);
  const std::vector<int32_t> y = iota_tokens(32, 1000);
  BlockTable a, b;
  ASSERT_TRUE(pool.allocate(a, 32));
  pool.cache_full_blocks(a, x, 32, 0);
  ASSERT_TRUE(pool.allocate(b, 32));
  pool.cache_full_blocks(b, y, 32, 0);
  const std::vector<int32_t> a_blocks = a.blocks;
  pool.free(a);  // released first: least recent
  pool.free(b);
  EXPECT_EQ(pool.num_free_blocks(), 4);
  EXPECT_EQ(pool.num_cached_free_blocks(), 4);
  EXPECT_EQ(pool.match_prefix(x, 0), a_blocks);

  // A fresh block evicts the least recently released one: a's tail block (a table is
  // released last block first, so a chain loses its tail before its head).
  BlockTable c;
  ASSERT_TRUE(pool.allocate(c, 1));
  EXPECT_EQ(c.blocks[0], a_blocks[1]);
  EXPECT_THAT(pool.match_prefix(x, 0), ElementsAre(a_blocks[0]));
  EXPECT_EQ(pool.match_prefix(y, 0).size(), 2u);
  // Next goes a's head; y's chain is untouched.
  BlockTable d;
  ASSERT_TRUE(pool.allocate(d, 1));
  EXPECT_EQ(d.blocks[0], a_blocks[0]);
  EXPECT_TRUE(pool.match_prefix(x, 0).empty());
  EXPECT_EQ(pool.match_prefix(y, 0).size(), 2u);
  expect_consistent(pool, {&c, &d});
}

TEST(KvBlockPoolTest, NeverHashedBlocksAreHandedOutBeforeEvicting) {
  KvBlockPool pool = make_pool(3);
  const std::vector<int32_t> x = iota_tokens(16, 0);
  BlockTable a;
  ASSERT_TRUE(pool.allocate(a, 16));
  pool.cache_full_blocks(a, x, 16, 0);
  pool.free(a);
  BlockTable b;
  ASSERT_TRUE(pool.allocate(b, 32));  // takes the two never-hashed blocks
  EXPECT_EQ(pool.match_prefix(x, 0).size(), 1u);
  // Adopting a cached-free prefix block counts against the free blocks.
  BlockTable c;
  EXPECT_FALSE(pool.allocate(c, 17, pool.match_prefix(x, 0)));  // 1 reclaimed + 1 new > 1
  ASSERT_TRUE(pool.allocate(c, 16, pool.match_prefix(x, 0)));
  EXPECT_EQ(pool.num_free_blocks(), 0);
  expect_consistent(pool, {&b, &c});
}

TEST(KvBlockPoolTest, DuplicateContentChainsToTheCachedCopy) {
  KvBlockPool pool = make_pool(8);
  std::vector<int32_t> shared = iota_tokens(16, 0);
  std::vector<int32_t> x = shared, y = shared;
  for (int32_t i = 0; i < 16; ++i) {
    x.push_back(100 + i);
    y.push_back(200 + i);
  }
  // Both computed block 0 independently (admitted in the same step, neither hit).
  BlockTable a, b;
  ASSERT_TRUE(pool.allocate(a, 32));
  ASSERT_TRUE(pool.allocate(b, 32));
  pool.cache_full_blocks(a, x, 32, 0);
  pool.cache_full_blocks(b, y, 32, 0);
  EXPECT_EQ(b.num_hashed_blocks, 2);
  // y's block 1 chains to a's copy of block 0, so y is found as a's block 0 + b's block 1.
  EXPECT_THAT(pool.match_prefix(y, 0), ElementsAre(a.blocks[0], b.blocks[1]));
  EXPECT_THAT(pool.match_prefix(x, 0), ElementsAre(a.blocks[0], a.blocks[1]));
  expect_consistent(pool, {&a, &b});
}

TEST(KvBlockPoolTest, ChainThroughAnEvictedParentCopyIsNotFollowed) {
  KvBlockPool pool = make_pool(6);
  std::vector<int32_t> x = iota_tokens(16, 0), y = x;
  for (int32_t i = 0; i < 16; ++i) {
    x.push_back(100 + i);
    y.push_back(200 + i);
  }
  BlockTable a, b;
  ASSERT_TRUE(pool.allocate(a, 32));
  ASSERT_TRUE(pool.allocate(b, 32));
  pool.cache_full_blocks(a, x, 32, 0);
  pool.cache_full_blocks(b, y, 32, 0);  // b's block 1 chains to a's block 0
  pool.free(a);
  // Two fresh blocks: the never-hashed ones go first, then a's two cached blocks are evicted.
  BlockTable filler;
  ASSERT_TRUE(pool.allocate(filler, 64));
  EXPECT_EQ(pool.num_cached_free_blocks(), 0);
  EXPECT_TRUE(pool.match_prefix(y, 0).empty());  // block 0's cached copy is gone
  pool.free(filler);
  // Block 0's content is computed again, into a block that may even reuse a's old id. b's
  // block 1 still names the old copy as its parent, so the chain stops after block 0.
  BlockTable c;
  ASSERT_TRUE(pool.allocate(c, 16));
  pool.cache_full_blocks(c, y, 16, 0);
  EXPECT_THAT(pool.match_prefix(y, 0), ElementsAre(c.blocks[0]));
  expect_consistent(pool, {&b, &c});
}

TEST(KvBlockPoolTest, PrefixCachingOffCachesNothing) {
  KvBlockPool pool = make_pool(4, /*prefix_caching=*/false);
  const std::vector<int32_t> x = iota_tokens(32, 0);
  BlockTable a;
  ASSERT_TRUE(pool.allocate(a, 32));
  pool.cache_full_blocks(a, x, 32, 0);
  EXPECT_TRUE(pool.match_prefix(x, 0).empty());
  pool.free(a);
  EXPECT_EQ(pool.num_cached_free_blocks(), 0);
  EXPECT_EQ(pool.num_free_blocks(), 4);
}

TEST(KvBlockPoolTest, ConsistencyCheckCatchesAMissingTable) {
  KvBlockPool pool = make_pool(4);
  BlockTable a, b;
  ASSERT_TRUE(pool.allocate(a, 16));
  ASSERT_TRUE(pool.allocate(b, 16));
  absl::Status s = pool.check_consistency(std::vector<const BlockTable*>{&a});
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("ref_count 1 but 0"));
  BlockTable fake = a;  // a table the pool never gave out: a double reference
  s = pool.check_consistency(std::vector<const BlockTable*>{&a, &b, &fake});
  EXPECT_THAT(s.message(), HasSubstr("ref_count 1 but 2"));
}

TEST(KvCacheSizingTest, BlockBytesAndBlocksForBudget) {
  // Llama-3.1-8B: 32 layers, 8 KV heads of 128, bf16, 16-token blocks:
  // 32 * 2 * 8 * 16 * 128 * 2 = 2 MiB per block.
  const KvCacheShape llama8b{32, 8, 128, 16, 2};
  EXPECT_EQ(*kv_block_bytes(llama8b), 2 * 1024 * 1024);
  EXPECT_EQ(*num_kv_blocks_for_budget(int64_t{10} << 30, llama8b), 5120);
  EXPECT_EQ(*num_kv_blocks_for_budget((int64_t{10} << 30) + (1 << 21) - 1, llama8b), 5120);
  // stories260K: 5 layers, 4 KV heads of 8, fp32 on the CPU, 32-token blocks:
  // 5 * 2 * 4 * 32 * 8 * 4 = 40960 bytes.
  EXPECT_EQ(*kv_block_bytes({5, 4, 8, 32, 4}), 40960);

  EXPECT_EQ(num_kv_blocks_for_budget(1 << 20, llama8b).status().code(),
            absl::StatusCode::kInvalidArgument);
  absl::Status s = kv_block_bytes({32, 0, 128, 16, 2}).status();
  EXPECT_THAT(s.message(), HasSubstr("num_kv_heads=0"));
  // Capped rather than overflowing.
  EXPECT_EQ(*num_kv_blocks_for_budget(int64_t{1} << 62, {1, 1, 1, 16, 1}),
            std::numeric_limits<int32_t>::max());
}

}  // namespace
}  // namespace megaserve::scheduler
