// The attention copy's key-row walk (kernels/kv_rows.h) against the direct offsets
// kv.offset(blocks[j / bs], head, j % bs): every stage of a thread's rows, as the passes and
// the decode stream walk them, over block sizes shorter and longer than the rows, key ends
// inside and at the edges of blocks, and scattered block tables.
#include "kernels/kv_rows.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

namespace megaserve::kernels {
namespace {

TEST(KvRows, WalkMatchesTheBlockTableForEveryValidRow) {
  std::mt19937 rng(7);
  int checked = 0;
  for (const int bs : {1, 3, 5, 8, 16, 64, 128}) {
    for (const int head_dim : {64, 128}) {
      const engine::KvCacheLayout kv{
          .num_blocks = 64, .kv_heads = 3, .block_size = bs, .head_dim = head_dim};
      const int keys = 40 * bs + 7;
      std::vector<int32_t> blocks((keys + bs - 1) / bs);
      std::iota(blocks.begin(), blocks.end(), 0);
      std::shuffle(blocks.begin(), blocks.end(), rng);
      for (const int rows : {4, 8}) {
        for (int key_end = 1; key_end <= keys; key_end += 1 + key_end / 7) {
          for (int j0 = 0; j0 < key_end + rows; j0 += rows) {
            const RowBlocks rb = row_blocks(blocks.data(), j0, rows, key_end, bs);
            if (j0 >= key_end) {
              EXPECT_EQ(rb.first, -1);
              continue;
            }
            const int head = (j0 / rows) % kv.kv_heads;
            KeyRowWalk walk(blocks.data(), rb, kv, head, j0);
            for (int k = 0; k < rows; ++k, walk.next()) {
              const int j = j0 + k;
              if (j >= key_end) break;
              ASSERT_EQ(walk.offset(), kv.offset(blocks[j / bs], head, j % bs))
                  << "bs " << bs << " rows " << rows << " key_end " << key_end << " j " << j;
              ++checked;
            }
          }
        }
      }
    }
  }
  EXPECT_GT(checked, 10000);
}

TEST(KvRows, RowBlocksNamesTheFirstAndLastValidRowsBlocks) {
  const std::vector<int32_t> blocks = {9, 4, 7, 2};
  const RowBlocks rb = row_blocks(blocks.data(), 14, 8, 35, 16);  // rows 14..21: blocks 0, 1
  EXPECT_EQ(rb.first, 9);
  EXPECT_EQ(rb.last, 4);
  EXPECT_EQ(rb.first_at, 0);
  EXPECT_EQ(rb.last_at, 1);
  const RowBlocks tail = row_blocks(blocks.data(), 32, 8, 35, 16);  // only rows 32..34 valid
  EXPECT_EQ(tail.first, 7);
  EXPECT_EQ(tail.last, 7);
  EXPECT_EQ(row_blocks(blocks.data(), 40, 8, 35, 16).first, -1);
}

}  // namespace
}  // namespace megaserve::kernels
