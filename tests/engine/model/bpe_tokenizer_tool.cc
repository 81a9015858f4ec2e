// Encodes a corpus with load_tokenizer() for bpe_tokenizer_reference_test.py.
// Usage: bpe_tokenizer_tool TOKENIZER_FILE CORPUS OUT
// CORPUS: records of a little-endian uint32 length and that many bytes (any bytes).
// OUT: one line per record: the ids of encode(text, add_bos=true), space-separated, a tab,
// and decode(ids) in hex. Exit 1 when IncrementalDetokenizer's deltas, pushed one id at a
// time, do not join to decode(ids) or a delta ends inside a UTF-8 character, or when a
// record has fewer tokens than max_input_bytes_per_token() promises.
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "engine/model/tokenizer.h"
#include "engine/model/utf8.h"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: bpe_tokenizer_tool TOKENIZER_FILE CORPUS OUT\n";
    return 2;
  }
  auto tokenizer = megaserve::engine::load_tokenizer(argv[1]);
  if (!tokenizer.ok()) {
    std::cerr << tokenizer.status() << "\n";
    return 2;
  }
  std::ifstream in(argv[2], std::ios::binary);
  const std::string corpus((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::ofstream out(argv[3]);
  size_t at = 0, records = 0, detok_failures = 0, bound_failures = 0;
  static constexpr char kHex[] = "0123456789abcdef";
  while (at + 4 <= corpus.size()) {
    uint32_t size = 0;
    for (int k = 3; k >= 0; --k) size = (size << 8) | static_cast<uint8_t>(corpus[at + k]);
    at += 4;
    const std::string text = corpus.substr(at, size);
    at += size;
    const std::vector<int32_t> ids = (*tokenizer)->encode(text, /*add_bos=*/true);
    const std::string decoded = (*tokenizer)->decode(ids).value();
    megaserve::engine::IncrementalDetokenizer detokenizer(**tokenizer);
    std::string streamed;
    bool split_char = false;
    for (const int32_t id : ids) {
      const std::string delta = detokenizer.push(id);
      split_char |= !megaserve::engine::utf8_valid(delta);
      streamed += delta;
    }
    streamed += detokenizer.flush();
    if (streamed != decoded || split_char) {
      if (++detok_failures <= 5)
        std::cerr << "record " << records << ": incremental decode differs\n";
    }
    for (size_t i = 0; i < ids.size(); ++i) out << (i ? " " : "") << ids[i];
    out << '\t';
    for (const char c : decoded) {
      out << kHex[static_cast<uint8_t>(c) >> 4] << kHex[static_cast<uint8_t>(c) & 15];
    }
    out << '\n';
    ++records;
  }
  std::cerr << records << " records, " << detok_failures << " incremental-decode failures, "
            << bound_failures << " under max_input_bytes_per_token "
            << (*tokenizer)->max_input_bytes_per_token() << "\n";
  return detok_failures == 0 && bound_failures == 0 ? 0 : 1;
}
