// Unicode helpers of the tokenizer: UTF-8 repair by maximal subparts (Unicode 3.9, as Python
// and Rust replace), utf8proc for categories, normalization and case, PCRE2 for patterns.
#include "data/text_unicode.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <cstdlib>
#include <stdexcept>

namespace qlora::data::text {
namespace {

// Length of the valid sequence at s[i], or 0 with `bad` = bytes of its maximal invalid subpart.
size_t valid_sequence(std::string_view s, size_t i, size_t& bad) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) return 1;
  size_t need;
  unsigned char lo = 0x80, hi = 0xbf;  // range of the second byte
  if (b0 >= 0xc2 && b0 <= 0xdf) {
    need = 1;
  } else if (b0 >= 0xe0 && b0 <= 0xef) {
    need = 2;
    if (b0 == 0xe0) lo = 0xa0;
    if (b0 == 0xed) hi = 0x9f;
  } else if (b0 >= 0xf0 && b0 <= 0xf4) {
    need = 3;
    if (b0 == 0xf0) lo = 0x90;
    if (b0 == 0xf4) hi = 0x8f;
  } else {
    bad = 1;
    return 0;
  }
  for (size_t k = 1; k <= need; ++k) {
    if (i + k >= s.size()) {
      bad = k;
      return 0;
    }
    const auto b = static_cast<unsigned char>(s[i + k]);
    const unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xbf;
    if (b < l || b > h) {
      bad = k;
      return 0;
    }
  }
  return need + 1;
}

}  // namespace

bool utf8_valid(std::string_view bytes) {
  size_t i = 0, bad = 0;
  while (i < bytes.size()) {
    // ASCII fast path, 8 bytes at a time.
    while (i + 8 <= bytes.size()) {
      uint64_t w;
      __builtin_memcpy(&w, bytes.data() + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= bytes.size()) break;
    const size_t n = valid_sequence(bytes, i, bad);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

std::string utf8_repair(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() + 8);
  size_t i = 0, bad = 0;
  while (i < bytes.size()) {
    const size_t n = valid_sequence(bytes, i, bad);
    if (n) {
      out.append(bytes.data() + i, n);
      i += n;
    } else {
      out += "\xef\xbf\xbd";
      i += bad;
    }
  }
  return out;
}

void utf8_append(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xc0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xe0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else {
    out += static_cast<char>(0xf0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  }
}

bool is_white_space(uint32_t cp) {
  // The White_Space property (PropList.txt); stable since Unicode 6.3.
  return (cp >= 0x09 && cp <= 0x0d) || cp == 0x20 || cp == 0x85 || cp == 0xa0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029 || cp == 0x202f ||
         cp == 0x205f || cp == 0x3000;
}

bool is_numeric(uint32_t cp) {
  const auto c = utf8proc_category(static_cast<utf8proc_int32_t>(cp));
  return c == UTF8PROC_CATEGORY_ND || c == UTF8PROC_CATEGORY_NL || c == UTF8PROC_CATEGORY_NO;
}

bool is_word_char(uint32_t cp) {
  if (cp < 0x80) {
    return (cp >= '0' && cp <= '9') || (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') ||
           cp == '_';
  }
  if (cp == 0x200c || cp == 0x200d) return true;              // Join_Control
  if (cp >= 0x24b6 && cp <= 0x24e9) return true;              // circled letters (Other_Alphabetic)
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(cp))) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_MN: case UTF8PROC_CATEGORY_MC: case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND: case UTF8PROC_CATEGORY_PC:
      return true;
    default:
      return false;
  }
}

std::string unicode_normalize(std::string_view s, NormalForm form) {
  int options = UTF8PROC_STABLE;
  if (form == NormalForm::kNfc) {
    options |= UTF8PROC_COMPOSE;
  } else if (form == NormalForm::kNfd) {
    options |= UTF8PROC_DECOMPOSE;
  } else if (form == NormalForm::kNfkc) {
    options |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT;
  } else if (form == NormalForm::kNfkd) {
    options |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT;
  } else {
    throw std::logic_error("unicode_normalize: unknown normal form");
  }
  // ASCII is invariant under every form.
  bool ascii = true;
  for (unsigned char c : s) ascii &= c < 0x80;
  if (ascii) return std::string(s);
  utf8proc_uint8_t* dst = nullptr;
  const utf8proc_ssize_t n =
      utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                   static_cast<utf8proc_ssize_t>(s.size()), &dst, static_cast<utf8proc_option_t>(options));
  if (n < 0) throw std::runtime_error(std::string("utf8proc: ") + utf8proc_errmsg(n));
  std::string out(reinterpret_cast<const char*>(dst), static_cast<size_t>(n));
  std::free(dst);
  return out;
}

std::string unicode_lowercase(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    const auto b = static_cast<unsigned char>(s[i]);
    if (b < 0x80) {
      out += static_cast<char>(b >= 'A' && b <= 'Z' ? b + 32 : b);
      ++i;
      continue;
    }
    const uint32_t cp = utf8_next(s, i);
    if (cp == 0x130) {  // the one unconditional multi-character lowercase (SpecialCasing.txt)
      out += "i\xcc\x87";
      continue;
    }
    utf8_append(out, static_cast<uint32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(cp))));
  }
  return out;
}

namespace {

// \s and \S as Unicode White_Space; PCRE2 10.42's UCP \s also takes U+180E, Oniguruma does not.
constexpr const char* kWhiteSpaceClass =
    "\\t-\\r\\x{20}\\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}"
    "\\x{205f}\\x{3000}";

std::string rewrite_white_space(const std::string& p) {
  std::string out;
  bool in_class = false;
  size_t i = 0;
  const size_t n = p.size();
  while (i < n) {
    const char c = p[i];
    if (c == '\\' && i + 1 < n) {
      const char d = p[i + 1];
      if (d == 's') {
        out += in_class ? std::string(kWhiteSpaceClass) : "[" + std::string(kWhiteSpaceClass) + "]";
      } else if (d == 'S' && !in_class) {
        out += "[^" + std::string(kWhiteSpaceClass) + "]";
      } else if (d == 'Q') {
        const size_t e = p.find("\\E", i + 2);
        const size_t stop = e == std::string::npos ? n : e + 2;
        out.append(p, i, stop - i);
        i = stop;
        continue;
      } else {
        out += c;
        out += d;
      }
      i += 2;
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      ++i;
      if (i < n && p[i] == '^') out += p[i++];
      if (i < n && p[i] == ']') out += p[i++];  // a leading ] is a literal
      continue;
    }
    if (in_class && c == '[' && i + 1 < n && p[i + 1] == ':') {
      const size_t e = p.find(":]", i + 2);
      const size_t stop = e == std::string::npos ? n : e + 2;
      out.append(p, i, stop - i);
      i = stop;
      continue;
    }
    if (in_class && c == ']') in_class = false;
    out += c;
    ++i;
  }
  return out;
}

std::shared_ptr<void> compile(const std::string& pattern, uint32_t options, const std::string& where) {
  int err = 0;
  PCRE2_SIZE offset = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   options, &err, &offset, nullptr);
  if (!code) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    throw std::invalid_argument(where + ": the pattern '" + pattern + "' does not compile at offset " +
                                std::to_string(offset) + ": " + reinterpret_cast<const char*>(msg));
  }
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // without JIT support it still matches, slower
  return std::shared_ptr<void>(code, [](void* c) { pcre2_code_free(static_cast<pcre2_code*>(c)); });
}

// Match data and a JIT stack per thread (a long whitespace run can need more than the default).
struct MatchScratch {
  pcre2_match_data* data = pcre2_match_data_create(1, nullptr);
  pcre2_match_context* context = pcre2_match_context_create(nullptr);
  pcre2_jit_stack* stack = pcre2_jit_stack_create(32 * 1024, 64 * 1024 * 1024, nullptr);
  MatchScratch() { pcre2_jit_stack_assign(context, nullptr, stack); }
  ~MatchScratch() {
    pcre2_jit_stack_free(stack);
    pcre2_match_context_free(context);
    pcre2_match_data_free(data);
  }
};

}  // namespace

Regex Regex::from_pattern(const std::string& pattern, const std::string& where) {
  Regex r;
  r.code_ = compile(rewrite_white_space(pattern), PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE, where);
  return r;
}

Regex Regex::from_literal(const std::string& literal, const std::string& where) {
  Regex r;
  r.code_ = compile(literal, PCRE2_UTF | PCRE2_LITERAL, where);
  return r;
}

void Regex::find_matches(std::string_view s, std::vector<Span>& out) const {
  out.clear();
  if (s.empty()) {
    out.push_back({0, 0, false});
    return;
  }
  thread_local MatchScratch scratch;
  auto* code = static_cast<pcre2_code*>(code_.get());
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
  size_t last_end = 0, prev = 0;
  bool have_last_match = false;
  size_t last_match_end = 0;
  while (last_end <= s.size()) {
    const int rc = pcre2_match(code, subject, s.size(), last_end, PCRE2_NO_UTF_CHECK, scratch.data,
                               scratch.context);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(rc, msg, sizeof msg);
      throw std::runtime_error(std::string("tokenizer pattern match failed: ") +
                               reinterpret_cast<const char*>(msg));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(scratch.data);
    const size_t start = ov[0], end = ov[1];
    if (start == end && have_last_match && last_match_end == end) {
      // onig's find_iter: no empty match right after the previous match; step one character.
      last_end += last_end < s.size() ? utf8_len(static_cast<unsigned char>(s[last_end])) : 1;
      continue;
    }
    last_end = end;
    have_last_match = true;
    last_match_end = end;
    if (prev != start) out.push_back({prev, start, false});
    out.push_back({start, end, true});
    prev = end;
  }
  if (prev != s.size()) out.push_back({prev, s.size(), false});
}

}  // namespace qlora::data::text
