#include "scheduler/kv_block_pool.h"

#include <algorithm>
#include <limits>

#include "absl/strings/str_cat.h"

namespace megaserve::scheduler {
namespace {

// 64-bit mixer (the splitmix64 finalizer): every input bit affects every output bit.
uint64_t mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

// Key the root block chains from: depends on the extra key only.
uint64_t root_hash(uint64_t extra_key) { return mix(extra_key ^ 0x6d65676173657276ULL); }

}  // namespace

absl::Status KvBlockPool::validate(const KvBlockPoolConfig& config) {
  const int32_t bs = config.block_size;
  if (bs < kMinKvBlockSize || bs > kMaxKvBlockSize || (bs & (bs - 1)) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("kv_block_size must be a power of two in [",
                                                   kMinKvBlockSize, ", ", kMaxKvBlockSize,
                                                   "], got ", bs));
  }
  if (config.num_blocks < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_kv_blocks must be at least 1, got ", config.num_blocks));
  }
  return absl::OkStatus();
}

absl::StatusOr<KvBlockPool> KvBlockPool::create(const KvBlockPoolConfig& config) {
  if (absl::Status s = validate(config); !s.ok()) return s;
  return KvBlockPool(config);
}

KvBlockPool::KvBlockPool(const KvBlockPoolConfig& config)
    : config_(config), blocks_(config.num_blocks) {
  // Stack order: block 0 is handed out first.
  free_blocks_.reserve(config.num_blocks);
  for (int32_t b = config.num_blocks - 1; b >= 0; --b) free_blocks_.push_back(b);
}

int32_t KvBlockPool::num_free_blocks() const {
  return static_cast<int32_t>(free_blocks_.size()) + num_cached_free_;
}

uint64_t KvBlockPool::hash_block(uint64_t parent_hash, std::span<const int32_t> tokens) {
  uint64_t h = parent_hash;
  for (int32_t t : tokens) h = mix(h ^ static_cast<uint32_t>(t)) + 0x9e3779b97f4a7c15ULL;
  return h;
}

int32_t KvBlockPool::lookup(uint64_t hash, int32_t parent_block, uint32_t parent_generation,
                            uint64_t extra_key, std::span<const int32_t> tokens) const {
  auto it = cached_.find(hash);
  if (it == cached_.end()) return -1;
  const Block& b = blocks_[it->second];
  if (b.parent_block != parent_block || b.extra_key != extra_key) return -1;
  if (parent_block >= 0 && b.parent_generation != parent_generation) return -1;
  if (!std::equal(tokens.begin(), tokens.end(), b.token_ids.begin(), b.token_ids.end())) {
    return -1;
  }
  return it->second;
}

std::vector<int32_t> KvBlockPool::match_prefix(std::span<const int32_t> tokens,
                                               uint64_t extra_key) const {
  std::vector<int32_t> matched;
  if (!config_.enable_prefix_caching) return matched;
  const int32_t bs = config_.block_size;
  const int32_t num_full = static_cast<int32_t>(tokens.size()) / bs;
  uint64_t parent_hash = root_hash(extra_key);
  int32_t parent_block = -1;
  uint32_t parent_generation = 0;
  for (int32_t i = 0; i < num_full; ++i) {
    std::span<const int32_t> block_tokens = tokens.subspan(i * bs, bs);
    const uint64_t h = hash_block(parent_hash, block_tokens);
    const int32_t b = lookup(h, parent_block, parent_generation, extra_key, block_tokens);
    if (b < 0) break;
    matched.push_back(b);
    parent_hash = h;
    parent_block = b;
    parent_generation = blocks_[b].generation;
  }
  return matched;
}

bool KvBlockPool::allocate(BlockTable& table, int32_t num_positions,
                           std::span<const int32_t> prefix) {
  if (!table.blocks.empty()) prefix = {};
  const int32_t have = table.num_blocks() + static_cast<int32_t>(prefix.size());
  const int32_t num_new = std::max(0, blocks_for(num_positions) - have);
  // Prefix blocks nobody holds sit in the cached-free list: taking them shrinks what is free.
  int32_t num_reclaimed = 0;
  for (int32_t b : prefix) num_reclaimed += blocks_[b].ref_count == 0 ? 1 : 0;
  if (num_new + num_reclaimed > num_free_blocks()) return false;

  for (int32_t b : prefix) {
    add_ref(b);
    table.blocks.push_back(b);
  }
  if (!prefix.empty()) {
    const Block& last = blocks_[prefix.back()];
    table.num_hashed_blocks = static_cast<int32_t>(prefix.size());
    table.parent_hash = last.hash;
    table.parent_block = prefix.back();
    table.parent_generation = last.generation;
  }
  for (int32_t i = 0; i < num_new; ++i) {
    const int32_t b = take_free_block();
    blocks_[b].ref_count = 1;
    table.blocks.push_back(b);
  }
  return true;
}

void KvBlockPool::cache_full_blocks(BlockTable& table, std::span<const int32_t> tokens,
                                    int32_t num_positions, uint64_t extra_key) {
  if (!config_.enable_prefix_caching || table.hashing_stopped) return;
  const int32_t bs = config_.block_size;
  const int32_t num_full = std::min(num_positions / bs, table.num_blocks());
  for (int32_t i = table.num_hashed_blocks; i < num_full; ++i) {
    std::span<const int32_t> block_tokens = tokens.subspan(i * bs, bs);
    const uint64_t parent_hash = i == 0 ? root_hash(extra_key) : table.parent_hash;
    const int32_t parent_block = i == 0 ? -1 : table.parent_block;
    const uint32_t parent_generation = i == 0 ? 0 : table.parent_generation;
    const uint64_t h = hash_block(parent_hash, block_tokens);
    int32_t canonical = lookup(h, parent_block, parent_generation, extra_key, block_tokens);
    if (canonical < 0) {
      if (cached_.contains(h)) {  // a different block under the same 64-bit key
        table.hashing_stopped = true;
        return;
      }
      canonical = table.blocks[i];
      Block& b = blocks_[canonical];
      b.hashed = true;
      b.hash = h;
      b.extra_key = extra_key;
      b.parent_block = parent_block;
      b.parent_generation = parent_generation;
      b.token_ids.assign(block_tokens.begin(), block_tokens.end());
      cached_.emplace(h, canonical);
    }
    table.num_hashed_blocks = i + 1;
    table.parent_hash = h;
    table.parent_block = canonical;
    table.parent_generation = blocks_[canonical].generation;
  }
}

void KvBlockPool::free(BlockTable& table) {
  for (auto it = table.blocks.rbegin(); it != table.blocks.rend(); ++it) release(*it);
  table = BlockTable{};
}

int32_t KvBlockPool::take_free_block() {
  if (!free_blocks_.empty()) {
    const int32_t b = free_blocks_.back();
    free_blocks_.pop_back();
    return b;
  }
  // Evict the least recently released cached block; callers checked num_free_blocks().
  const int32_t b = lru_head_;
  lru_remove(b);
  Block& block = blocks_[b];
  cached_.erase(block.hash);
  block.hashed = false;
  block.token_ids.clear();
  ++block.generation;
  return b;
}

void KvBlockPool::add_ref(int32_t block) {
  Block& b = blocks_[block];
  if (b.ref_count == 0 && b.in_lru) lru_remove(block);
  ++b.ref_count;
}

void KvBlockPool::release(int32_t block) {
  Block& b = blocks_[block];
  if (--b.ref_count > 0) return;
  if (b.hashed) {
    lru_push_back(block);
  } else {
    free_blocks_.push_back(block);
  }
}

void KvBlockPool::lru_remove(int32_t block) {
  Block& b = blocks_[block];
  if (b.lru_prev >= 0) {
    blocks_[b.lru_prev].lru_next = b.lru_next;
  } else {
    lru_head_ = b.lru_next;
  }
  if (b.lru_next >= 0) {
    blocks_[b.lru_next].lru_prev = b.lru_prev;
  } else {
    lru_tail_ = b.lru_prev;
  }
  b.lru_prev = b.lru_next = -1;
  b.in_lru = false;
  --num_cached_free_;
}

void KvBlockPool::lru_push_back(int32_t block) {
  Block& b = blocks_[block];
  b.lru_prev = lru_tail_;
  b.lru_next = -1;
  if (lru_tail_ >= 0) {
    blocks_[lru_tail_].lru_next = block;
  } else {
    lru_head_ = block;
  }
  lru_tail_ = block;
  b.in_lru = true;
  ++num_cached_free_;
}

absl::Status KvBlockPool::check_consistency(std::span<const BlockTable* const> tables) const {
  const int32_t n = num_blocks();
  std::vector<int32_t> refs(n, 0);
  for (const BlockTable* t : tables) {
    for (int32_t b : t->blocks) {
      if (b < 0 || b >= n) return absl::FailedPreconditionError(absl::StrCat("bad block ", b));
      ++refs[b];
    }
  }
  std::vector<int32_t> listed(n, 0);
  for (int32_t b : free_blocks_) {
    ++listed[b];
    if (blocks_[b].hashed) {
      return absl::FailedPreconditionError(absl::StrCat("free block ", b, " is hashed"));
    }
  }
  int32_t lru_count = 0;
  int32_t prev = -1;
  for (int32_t b = lru_head_; b >= 0; prev = b, b = blocks_[b].lru_next) {
    if (++lru_count > n) return absl::FailedPreconditionError("cached-free list has a cycle");
    ++listed[b];
    if (blocks_[b].lru_prev != prev || !blocks_[b].in_lru || !blocks_[b].hashed) {
      return absl::FailedPreconditionError(absl::StrCat("cached-free list broken at ", b));
    }
  }
  if (prev != lru_tail_ || lru_count != num_cached_free_) {
    return absl::FailedPreconditionError("cached-free list tail or count is wrong");
  }
  for (int32_t b = 0; b < n; ++b) {
    if (blocks_[b].ref_count != refs[b]) {
      return absl::FailedPreconditionError(absl::StrCat("block ", b, " has ref_count ",
                                                        blocks_[b].ref_count, " but ", refs[b],
                                                        " block tables hold it"));
    }
    const int32_t want_listed = refs[b] == 0 ? 1 : 0;
    if (listed[b] != want_listed) {
      return absl::FailedPreconditionError(absl::StrCat("block ", b, " with ", refs[b],
                                                        " references is on the free lists ",
                                                        listed[b], " times"));
    }
    if (blocks_[b].hashed) {
      auto it = cached_.find(blocks_[b].hash);
      if (it == cached_.end() || it->second != b) {
        return absl::FailedPreconditionError(absl::StrCat("hashed block ", b, " not indexed"));
      }
    }
  }
  for (const auto& [h, b] : cached_) {
    if (!blocks_[b].hashed || blocks_[b].hash != h) {
      return absl::FailedPreconditionError(absl::StrCat("index names unhashed block ", b));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> kv_block_bytes(const KvCacheShape& shape) {
  if (shape.num_layers < 1 || shape.num_kv_heads < 1 || shape.head_dim < 1 ||
      shape.block_size < 1 || shape.dtype_bytes < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV cache shape needs positive sizes: num_layers=", shape.num_layers,
                     " num_kv_heads=", shape.num_kv_heads, " head_dim=", shape.head_dim,
                     " block_size=", shape.block_size, " dtype_bytes=", shape.dtype_bytes));
  }
  return int64_t{shape.num_layers} * 2 * shape.num_kv_heads * shape.block_size * shape.head_dim *
         shape.dtype_bytes;
}

absl::StatusOr<int32_t> num_kv_blocks_for_budget(int64_t budget_bytes, const KvCacheShape& shape) {
  absl::StatusOr<int64_t> block_bytes = kv_block_bytes(shape);
  if (!block_bytes.ok()) return block_bytes.status();
  const int64_t blocks = budget_bytes / *block_bytes;
  if (budget_bytes < 0 || blocks < 1) {
    return absl::InvalidArgumentError(absl::StrCat("KV cache budget of ", budget_bytes,
                                                   " bytes is less than one block (", *block_bytes,
                                                   " bytes)"));
  }
  return static_cast<int32_t>(std::min<int64_t>(blocks, std::numeric_limits<int32_t>::max()));
}

}  // namespace megaserve::scheduler
