#include "engine/model/utf8.h"

#include <cstdint>

namespace megaserve::engine {

namespace {

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// A lead byte's sequence length and the range its second byte must lie in (Unicode Table
// 3-7); length 0 for a byte that cannot start a sequence.
struct Lead {
  int length = 0;
  uint8_t second_min = 0x80;
  uint8_t second_max = 0xBF;
};

Lead lead_of(uint8_t byte) {
  if (byte < 0x80) return {1};
  if (byte >= 0xC2 && byte <= 0xDF) return {2};
  if (byte == 0xE0) return {3, 0xA0, 0xBF};
  if (byte == 0xED) return {3, 0x80, 0x9F};  // no surrogates
  if (byte >= 0xE1 && byte <= 0xEF) return {3};
  if (byte == 0xF0) return {4, 0x90, 0xBF};
  if (byte == 0xF4) return {4, 0x80, 0x8F};  // nothing above U+10FFFF
  if (byte >= 0xF1 && byte <= 0xF3) return {4};
  return {0};
}

// How many bytes after bytes[i] continue the sequence it leads, as far as they are valid.
int valid_continuations(std::string_view bytes, size_t i, const Lead& lead) {
  int count = 0;
  for (int k = 1; k < lead.length && i + k < bytes.size(); ++k) {
    const auto byte = static_cast<uint8_t>(bytes[i + k]);
    const uint8_t lo = k == 1 ? lead.second_min : 0x80;
    const uint8_t hi = k == 1 ? lead.second_max : 0xBF;
    if (byte < lo || byte > hi) break;
    ++count;
  }
  return count;
}

}  // namespace

std::string utf8_lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  size_t i = 0;
  while (i < bytes.size()) {
    const Lead lead = lead_of(static_cast<uint8_t>(bytes[i]));
    if (lead.length == 1) {
      out.push_back(bytes[i++]);
      continue;
    }
    if (lead.length == 0) {
      out.append(kReplacement);
      ++i;
      continue;
    }
    const int continuations = valid_continuations(bytes, i, lead);
    if (continuations == lead.length - 1) {
      out.append(bytes.substr(i, lead.length));
    } else {
      out.append(kReplacement);  // the maximal subpart: the lead and its valid continuations
    }
    i += 1 + continuations;
  }
  return out;
}

bool utf8_valid(std::string_view bytes) {
  size_t i = 0;
  while (i < bytes.size()) {
    const Lead lead = lead_of(static_cast<uint8_t>(bytes[i]));
    if (lead.length == 0) return false;
    if (lead.length > 1 && valid_continuations(bytes, i, lead) != lead.length - 1) return false;
    i += lead.length;
  }
  return true;
}

size_t utf8_incomplete_tail(std::string_view bytes) {
  const size_t size = bytes.size();
  for (size_t back = 1; back <= 3 && back <= size; ++back) {
    const size_t i = size - back;
    const auto byte = static_cast<uint8_t>(bytes[i]);
    if (byte >= 0x80 && byte <= 0xBF) continue;  // a continuation byte: look further back
    const Lead lead = lead_of(byte);
    const bool proper_prefix = lead.length > static_cast<int>(back) &&
                               valid_continuations(bytes, i, lead) == static_cast<int>(back) - 1;
    return proper_prefix ? back : 0;
  }
  return 0;
}

void append_utf8(std::string* out, char32_t cp) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

}  // namespace megaserve::engine
