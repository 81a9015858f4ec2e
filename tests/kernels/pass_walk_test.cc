// The walk of a projection op's chunks and wgmma passes across its calls (kernels/pass_walk.h):
// an op simulated on the host, called as run_queue calls it (again after every yield), must do
// every chunk's prologue once, set up and emit every pass once and in order, run every
// chunk without passes once, and finish each chunk before starting the next.
#include "kernels/pass_walk.h"

#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

namespace megaserve::kernels {
namespace {

// Calls an op whose chunks take passes[i] wgmma passes until it stops yielding; returns the
// events in order: "P<i>" prologue, "S<i>.<p>" setup, "R<i>.<p>" the entry running it,
// "E<i>.<p>" emit, "N<i>" a chunk without passes run whole, "D<i>" a chunk done.
std::vector<std::string> walk_all(const std::vector<int>& passes, int* calls) {
  std::vector<std::string> events;
  std::string yielded;
  for (*calls = 0;; ++*calls) {
    if (!yielded.empty()) events.push_back("R" + yielded);
    yielded.clear();
    PassWalk walk{*calls, 0, nullptr};
    for (size_t i = 0; i < passes.size() && yielded.empty(); ++i) {
      const std::string c = std::to_string(i);
      const ChunkStep s = walk_chunk(walk, passes[i]);
      if (s.skip) continue;
      if (s.prologue) events.push_back("P" + c);
      if (passes[i] == 0) {
        events.push_back("N" + c);
      } else {
        if (s.emit >= 0) events.push_back("E" + c + "." + std::to_string(s.emit));
        if (s.setup >= 0) {
          yielded = c + "." + std::to_string(s.setup);
          events.push_back("S" + yielded);
          continue;
        }
      }
      events.push_back("D" + c);
    }
    if (yielded.empty()) return events;
    if (*calls > 10000) return events;  // a walk that never ends fails below
  }
}

// The order the op would follow if it ran every pass in one call.
std::vector<std::string> expected(const std::vector<int>& passes) {
  std::vector<std::string> events;
  for (size_t i = 0; i < passes.size(); ++i) {
    const std::string c = std::to_string(i);
    events.push_back("P" + c);
    if (passes[i] == 0) events.push_back("N" + c);
    for (int p = 0; p < passes[i]; ++p) {
      const std::string id = c + "." + std::to_string(p);
      events.insert(events.end(), {"S" + id, "R" + id, "E" + id});
    }
    events.push_back("D" + c);
  }
  return events;
}

int total(const std::vector<int>& passes) {
  int n = 0;
  for (int p : passes) n += p;
  return n;
}

TEST(PassWalk, HandWrittenChunkLists) {
  for (const std::vector<int>& passes : std::vector<std::vector<int>>{
           {}, {0}, {1}, {3}, {0, 0}, {2, 0, 1}, {0, 4, 0, 0, 2}, {1, 1, 1}, {5, 0}}) {
    int calls = 0;
    EXPECT_EQ(walk_all(passes, &calls), expected(passes));
    EXPECT_EQ(calls, total(passes)) << "one call per pass, plus the last (numbered from 0)";
  }
}

TEST(PassWalk, RandomChunkLists) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 500; ++trial) {
    std::vector<int> passes(rng() % 7);
    for (int& p : passes) p = rng() % 3 == 0 ? 0 : static_cast<int>(rng() % 6);
    int calls = 0;
    ASSERT_EQ(walk_all(passes, &calls), expected(passes)) << "trial " << trial;
    ASSERT_EQ(calls, total(passes));
  }
}

TEST(PassWalk, ChunkStepsOfOneCall) {
  // Call 3 of chunks with 2, 0 and 3 passes: chunk 0 (passes 0-1) finished in call 2, chunk 1
  // ran in call 2, chunk 2 (passes 2-4) emits its pass 0 (global 2) and sets up its pass 1.
  PassWalk walk{3, 0, nullptr};
  const ChunkStep a = walk_chunk(walk, 2), b = walk_chunk(walk, 0), c = walk_chunk(walk, 3);
  EXPECT_TRUE(a.skip);
  EXPECT_TRUE(b.skip);
  EXPECT_FALSE(c.skip);
  EXPECT_FALSE(c.prologue);
  EXPECT_EQ(c.emit, 0);
  EXPECT_EQ(c.setup, 1);
  EXPECT_EQ(walk.before, 5);
}

}  // namespace
}  // namespace megaserve::kernels
