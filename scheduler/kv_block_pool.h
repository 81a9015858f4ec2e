// The paged KV cache's bookkeeping on the host: a pool of fixed-size blocks with reference
// counts, the per-request block tables that name them, and the prefix cache that lets a new
// request reuse full blocks another request already computed. It never touches KV memory; the
// backend owns that, laid out per layer as [num_blocks, kv_heads, block_size, head_dim].
//
// Block life cycle:
//   free (never hashed, or evicted)  --allocate-->            in use (ref_count >= 1)
//   in use  --release to ref 0, block hashed-->               cached-free (LRU list)
//   in use  --release to ref 0, not hashed-->                 free
//   cached-free  --matched by a new prefix-->                 in use again (content reused)
//   cached-free  --evicted LRU when a fresh block is needed--> in use with new content
// Allocation prefers never-hashed free blocks and evicts cached-free ones only when those
// run out, so `num_free_blocks()` (which counts both) is what can actually be handed out.
//
// Prefix cache keys: block i of a sequence is keyed by hash(key of block i-1, its
// block_size token ids); block 0 by hash(extra_key, its token ids), where extra_key is a hook
// for anything else that changes KV content (e.g. a LoRA adapter id; 0 for none). A hit is
// verified exactly (token ids, extra key, and the identity of the parent block), so a 64-bit
// hash collision costs a miss, never wrong KV.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace megaserve::scheduler {

inline constexpr int32_t kMinKvBlockSize = 16;
inline constexpr int32_t kMaxKvBlockSize = 128;

// One request's blocks. Owned by the request; only KvBlockPool changes it.
struct BlockTable {
  // Block i holds positions [i * block_size, (i + 1) * block_size).
  std::vector<int32_t> blocks;
  // Leading blocks whose content is known to the prefix cache (matched from it, or hashed by
  // cache_full_blocks). The next block to hash is blocks[num_hashed_blocks].
  int32_t num_hashed_blocks = 0;
  // Key of the last hashed block and the cached block that holds that content (which may be
  // another copy than blocks[num_hashed_blocks - 1] when two requests computed the same
  // block): the parent of the next block to hash.
  uint64_t parent_hash = 0;
  int32_t parent_block = -1;
  uint32_t parent_generation = 0;
  // Set after a hash collision: later blocks of this table are not cached.
  bool hashing_stopped = false;

  int32_t num_blocks() const { return static_cast<int32_t>(blocks.size()); }
};

struct KvBlockPoolConfig {
  int32_t block_size = 16;  // tokens per block: a power of two in [16, 128]
  int32_t num_blocks = 0;   // >= 1
  bool enable_prefix_caching = true;
};

class KvBlockPool {
 public:
  // InvalidArgument naming the field when `config` is out of range.
  static absl::Status validate(const KvBlockPoolConfig& config);
  static absl::StatusOr<KvBlockPool> create(const KvBlockPoolConfig& config);

  int32_t block_size() const { return config_.block_size; }
  int32_t num_blocks() const { return config_.num_blocks; }
  bool prefix_caching_enabled() const { return config_.enable_prefix_caching; }
  // Blocks allocate() can hand out: free plus cached-free (evictable).
  int32_t num_free_blocks() const;
  int32_t num_cached_free_blocks() const { return num_cached_free_; }
  int32_t num_used_blocks() const { return num_blocks() - num_free_blocks(); }
  int32_t ref_count(int32_t block) const { return blocks_[block].ref_count; }
  // Blocks needed to hold `num_positions` positions. Rounds up in 64 bits: near INT32_MAX
  // positions the 32-bit sum wraps negative (and such a request looked as if it fit).
  int32_t blocks_for(int32_t num_positions) const {
    return static_cast<int32_t>((int64_t{num_positions} + config_.block_size - 1) /
                                config_.block_size);
  }

  // The longest run of cached full blocks holding tokens[0, k * block_size), k maximal. Only
  // whole blocks of `tokens` are looked up: pass the tokens whose KV may be reused (the
  // caller leaves out the last prompt token, which must be computed to get logits). Takes
  // no references; hand the result to allocate() before anything else changes the pool.
  std::vector<int32_t> match_prefix(std::span<const int32_t> tokens, uint64_t extra_key) const;

  // Grows `table` to cover `num_positions` positions. When the table is empty, `prefix`
  // (a match_prefix result) is adopted first: its blocks gain a reference and count as
  // hashed. Returns false and changes nothing when there are not enough free blocks.
  bool allocate(BlockTable& table, int32_t num_positions, std::span<const int32_t> prefix = {});

  // Hashes the table's full blocks within tokens[0, num_positions) into the prefix cache.
  // `num_positions` must count only positions whose token ids are known and whose KV is
  // computed or scheduled (steps run in order, so a later step's reader sees it written).
  // A block whose content is already cached is left unhashed (the cached copy stays the one
  // found), but later blocks still chain to it.
  void cache_full_blocks(BlockTable& table, std::span<const int32_t> tokens, int32_t num_positions,
                         uint64_t extra_key);

  // Drops the table's references (last block first, so a chain's tail is evicted before its
  // head) and empties it.
  void free(BlockTable& table);

  // For tests and debugging: every block's reference count equals the number of `tables`
  // holding it, free and cached-free lists hold exactly the unreferenced blocks once each,
  // and the hash index points at hashed blocks only. FailedPrecondition names the first
  // mismatch.
  absl::Status check_consistency(std::span<const BlockTable* const> tables) const;

 private:
  struct Block {
    int32_t ref_count = 0;
    bool hashed = false;
    uint32_t generation = 0;  // bumped on eviction: a child keyed on an old copy never matches
    uint64_t hash = 0;
    uint64_t extra_key = 0;
    int32_t parent_block = -1;  // cached block holding the parent content (-1 for block 0)
    uint32_t parent_generation = 0;
    std::vector<int32_t> token_ids;  // when hashed: its block_size token ids, for verification
    int32_t lru_prev = -1;           // cached-free list links
    int32_t lru_next = -1;
    bool in_lru = false;
  };

  explicit KvBlockPool(const KvBlockPoolConfig& config);

  static uint64_t hash_block(uint64_t parent_hash, std::span<const int32_t> tokens);
  // The cached block with this content, or -1.
  int32_t lookup(uint64_t hash, int32_t parent_block, uint32_t parent_generation,
                 uint64_t extra_key, std::span<const int32_t> tokens) const;
  int32_t take_free_block();  // a never-hashed block, else evicts the LRU cached-free one
  void add_ref(int32_t block);
  void release(int32_t block);
  void lru_remove(int32_t block);
  void lru_push_back(int32_t block);

  KvBlockPoolConfig config_;
  std::vector<Block> blocks_;
  std::vector<int32_t> free_blocks_;  // never hashed (or evicted), ref 0; a stack
  int32_t lru_head_ = -1;             // cached-free blocks, least recently released first
  int32_t lru_tail_ = -1;
  int32_t num_cached_free_ = 0;
  absl::flat_hash_map<uint64_t, int32_t> cached_;  // prefix-cache key -> hashed block
};

// KV cache sizing. One block holds block_size positions of K and V for every layer:
//   bytes = num_layers * 2 * num_kv_heads * block_size * head_dim * dtype_bytes.
struct KvCacheShape {
  int32_t num_layers = 0;
  int32_t num_kv_heads = 0;  // per rank, after tensor-parallel sharding
  int32_t head_dim = 0;
  int32_t block_size = 16;
  int32_t dtype_bytes = 2;  // bf16
};
absl::StatusOr<int64_t> kv_block_bytes(const KvCacheShape& shape);
// How many blocks fit in `budget_bytes` (rounded down, capped at INT32_MAX). InvalidArgument
// for a bad shape or a budget smaller than one block.
absl::StatusOr<int32_t> num_kv_blocks_for_budget(int64_t budget_bytes, const KvCacheShape& shape);

}  // namespace megaserve::scheduler
