// UTF-8 helpers for the tokenizers: lossy decoding with U+FFFD exactly as Python's
// bytes.decode("utf-8", "replace") and Rust's String::from_utf8_lossy do (one U+FFFD per
// maximal subpart of an ill-formed sequence, Unicode §3.9), and the incomplete-tail test
// that keeps a streaming detokenizer from emitting half a character.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace megaserve::engine {

// `bytes` with every ill-formed sequence replaced by U+FFFD: one per maximal subpart (a lead
// byte and the continuation bytes that could still have completed it), one per stray byte.
std::string utf8_lossy(std::string_view bytes);

// True when `bytes` is well-formed UTF-8 (no surrogates, no overlongs, nothing above
// U+10FFFF).
bool utf8_valid(std::string_view bytes);

// The length (0..3) of the end of `bytes` that is a proper prefix of a well-formed character:
// bytes that later bytes may still complete. Lossy decoding of everything before it does not
// depend on what follows, since the prefix starts with a lead byte.
size_t utf8_incomplete_tail(std::string_view bytes);

// Appends the UTF-8 encoding of a code point (at most U+10FFFF, not a surrogate).
void append_utf8(std::string* out, char32_t code_point);

}  // namespace megaserve::engine
