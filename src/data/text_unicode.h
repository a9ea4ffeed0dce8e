// Unicode text helpers for the tokenizer: UTF-8 repair (Python's errors="replace"), code point
// iteration, the character classes Rust's `char` and `regex` use (White_Space, numeric, \w),
// normalization forms and lowercase through utf8proc, and a PCRE2 regex (UTF + UCP, JIT) that
// finds matches with the semantics of the Oniguruma iterator the `tokenizers` package uses.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace qlora::data::text {

// `bytes` as valid UTF-8: every maximal invalid subpart becomes U+FFFD, exactly as Python's
// bytes.decode("utf-8", errors="replace") (and Rust's String::from_utf8_lossy).
std::string utf8_repair(std::string_view bytes);
bool utf8_valid(std::string_view bytes);

// The code point starting at s[i] of valid UTF-8; advances i past it.
inline uint32_t utf8_next(std::string_view s, size_t& i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) {
    i += 1;
    return b0;
  }
  auto cont = [&](size_t k) { return static_cast<uint32_t>(static_cast<unsigned char>(s[i + k]) & 0x3f); };
  uint32_t cp;
  if (b0 < 0xe0) {
    cp = ((b0 & 0x1fu) << 6) | cont(1);
    i += 2;
  } else if (b0 < 0xf0) {
    cp = ((b0 & 0x0fu) << 12) | (cont(1) << 6) | cont(2);
    i += 3;
  } else {
    cp = ((b0 & 0x07u) << 18) | (cont(1) << 12) | (cont(2) << 6) | cont(3);
    i += 4;
  }
  return cp;
}
// Bytes of the UTF-8 sequence that starts with lead byte b (valid input).
inline size_t utf8_len(unsigned char b) { return b < 0x80 ? 1 : b < 0xe0 ? 2 : b < 0xf0 ? 3 : 4; }
void utf8_append(std::string& out, uint32_t cp);

bool is_white_space(uint32_t cp);  // Unicode White_Space: Rust char::is_whitespace, regex \s
bool is_numeric(uint32_t cp);      // general category Nd, Nl or No: Rust char::is_numeric
bool is_word_char(uint32_t cp);    // Rust regex \w (letters, marks, Nd, Pc, joiners)

enum class NormalForm { kNfc, kNfd, kNfkc, kNfkd };
std::string unicode_normalize(std::string_view s, NormalForm form);
// Rust's per-character char::to_lowercase (full mapping, no context-dependent final sigma).
std::string unicode_lowercase(std::string_view s);

// One piece of a text cut by a pattern: [start, end) in bytes, and whether the pattern matched it.
struct Span {
  size_t start;
  size_t end;
  bool is_match;
};

// A compiled pattern. Compiled as Oniguruma's Ruby syntax reads it for what tokenizers' files
// use: UTF-8, Unicode classes, ^/$ at line ends, and \s / \S as Unicode White_Space.
class Regex {
 public:
  // A regular expression; a bad one is std::invalid_argument "<where>: ...".
  static Regex from_pattern(const std::string& pattern, const std::string& where);
  // A literal string (tokenizers escapes String patterns).
  static Regex from_literal(const std::string& literal, const std::string& where);

  // tokenizers' Pattern::find_matches: spans covering all of `s` in order, matched ones marked;
  // "" gives one empty unmatched span. Empty matches right after a match are skipped, as in
  // onig's find_iter.
  void find_matches(std::string_view s, std::vector<Span>& out) const;

 private:
  std::shared_ptr<void> code_;  // pcre2_code_8
};

}  // namespace qlora::data::text
