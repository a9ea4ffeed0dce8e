// tokenizer.json run in C++ as the `tokenizers` package runs it: added tokens split out of the
// raw text, then of each normalized piece; pre-tokenizers cut pieces; BPE merges each piece
// (lowest merge rank first, leftmost on ties); the post-processor adds its template ids.
#include "data/tokenizer.h"

#include <algorithm>
#include <array>
#include <fstream>
#include <mutex>
#include <shared_mutex>
#include <sstream>
#include <stdexcept>
#include <unordered_map>
#include <unordered_set>

#include <nlohmann/json.hpp>

#include "data/text_unicode.h"
#include "io/hash.h"
#include "io/json_file.h"

namespace qlora::data {
namespace {

using json = nlohmann::json;
using text::Regex;
using text::Span;

// ---------------------------------------------------------------------------------------------
// Reading the json: every message names the file and the location in it.

class JsonReader {
 public:
  explicit JsonReader(std::string file) : file_(std::move(file)) {}
  const std::string& file() const { return file_; }

  [[noreturn]] void fail(const std::string& where, const std::string& what) const {
    throw std::invalid_argument(file_ + ": " + where + " " + what);
  }
  void expect_object(const json& v, const std::string& where) const {
    if (!v.is_object()) fail(where, "must be an object, got " + brief(v));
  }
  const json& member(const json& obj, const std::string& where, const char* key) const {
    expect_object(obj, where);
    auto it = obj.find(key);
    if (it == obj.end()) fail(join(where, key), "is missing");
    return *it;
  }
  bool has(const json& obj, const char* key) const {
    auto it = obj.find(key);
    return it != obj.end() && !it->is_null();
  }
  std::string string(const json& obj, const std::string& where, const char* key) const {
    const json& v = member(obj, where, key);
    if (!v.is_string()) fail(join(where, key), "must be a string, got " + brief(v));
    return v.get<std::string>();
  }
  bool boolean(const json& obj, const std::string& where, const char* key, bool fallback) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return fallback;
    if (!it->is_boolean()) fail(join(where, key), "must be true or false, got " + brief(*it));
    return it->get<bool>();
  }
  int64_t integer(const json& v, const std::string& where) const {
    if (!v.is_number_integer()) fail(where, "must be an integer, got " + brief(v));
    return v.get<int64_t>();
  }
  int32_t token_id(const json& v, const std::string& where) const {
    const int64_t id = integer(v, where);
    if (id < 0 || id > INT32_MAX) fail(where, "must be a token id in [0, 2^31), got " + brief(v));
    return static_cast<int32_t>(id);
  }
  // A Rust `char`: a string of exactly one code point.
  std::string character(const json& obj, const std::string& where, const char* key) const {
    std::string s = string(obj, where, key);
    size_t i = 0;
    if (s.empty() || !text::utf8_valid(s) || (text::utf8_next(s, i), i != s.size())) {
      fail(join(where, key), "must be one character, got '" + s + "'");
    }
    return s;
  }
  [[noreturn]] void unsupported(const std::string& where, const std::string& what,
                                const std::string& supported) const {
    fail(where, what + " is not supported (supported: " + supported + ")");
  }
  static std::string join(const std::string& where, const char* key) {
    return where.empty() ? std::string(key) : where + "." + key;
  }
  static std::string index(const std::string& where, size_t i) {
    return where + "[" + std::to_string(i) + "]";
  }
  static std::string brief(const json& v) {
    std::string s = v.dump();
    return s.size() > 60 ? s.substr(0, 57) + "..." : s;
  }

 private:
  std::string file_;
};

// ---------------------------------------------------------------------------------------------
// Pieces of text between the stages. A piece holding an added token carries its id and is
// passed through untouched; `at_origin` is tokenizers' "offsets_original().0 == 0".

struct Piece {
  std::string text;
  int32_t id = -1;
  bool at_origin = false;
};
using Pieces = std::vector<Piece>;

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

SplitBehavior parse_behavior(const JsonReader& r, const json& obj, const std::string& where) {
  const std::string b = r.string(obj, where, "behavior");
  if (b == "Removed") return SplitBehavior::kRemoved;
  if (b == "Isolated") return SplitBehavior::kIsolated;
  if (b == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (b == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (b == "Contiguous") return SplitBehavior::kContiguous;
  r.unsupported(where + ".behavior", "'" + b + "'",
                "Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous");
}

// NormalizedString::split: cuts `p` at `spans` as `behavior` says; appends the non-empty parts.
void split_piece(const Piece& p, const std::vector<Span>& spans, SplitBehavior behavior, Pieces& out) {
  struct Part {
    size_t start, end;
    bool remove;
  };
  thread_local std::vector<Part> parts;
  parts.clear();
  if (behavior == SplitBehavior::kIsolated) {
    for (const Span& s : spans) parts.push_back({s.start, s.end, false});
  } else if (behavior == SplitBehavior::kRemoved) {
    for (const Span& s : spans) parts.push_back({s.start, s.end, s.is_match});
  } else if (behavior == SplitBehavior::kContiguous) {
    bool previous = false;
    for (const Span& s : spans) {
      if (s.is_match == previous && !parts.empty()) {
        parts.back().end = s.end;
      } else {
        parts.push_back({s.start, s.end, false});
      }
      previous = s.is_match;
    }
  } else if (behavior == SplitBehavior::kMergedWithPrevious) {
    bool previous = false;
    for (const Span& s : spans) {
      if (s.is_match && !previous && !parts.empty()) {
        parts.back().end = s.end;
      } else {
        parts.push_back({s.start, s.end, false});
      }
      previous = s.is_match;
    }
  } else if (behavior == SplitBehavior::kMergedWithNext) {
    bool previous = false;
    for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
      if (it->is_match && !previous && !parts.empty()) {
        parts.back().start = it->start;
      } else {
        parts.push_back({it->start, it->end, false});
      }
      previous = it->is_match;
    }
    std::reverse(parts.begin(), parts.end());
  } else {
    throw std::logic_error("split_piece: unknown behavior");
  }
  for (const Part& part : parts) {
    if (part.remove || part.end == part.start) continue;
    out.push_back({p.text.substr(part.start, part.end - part.start), -1, p.at_origin && part.start == 0});
  }
}

// Pattern::find_matches for a character predicate: every matching character is its own span.
template <typename Pred>
void find_char_matches(std::string_view s, Pred pred, std::vector<Span>& out) {
  out.clear();
  if (s.empty()) {
    out.push_back({0, 0, false});
    return;
  }
  size_t last = 0, i = 0;
  while (i < s.size()) {
    const size_t b = i;
    const uint32_t cp = text::utf8_next(s, i);
    if (pred(cp)) {
      if (last < b) out.push_back({last, b, false});
      out.push_back({b, i, true});
      last = i;
    }
  }
  if (last < s.size()) out.push_back({last, s.size(), false});
}

void invert(std::vector<Span>& spans) {
  for (Span& s : spans) s.is_match = !s.is_match;
}

// Every match of `re` in `s` replaced by `content` (NormalizedString::replace, Replace decoder).
std::string replace_all(const Regex& re, const std::string& s, const std::string& content) {
  thread_local std::vector<Span> spans;
  re.find_matches(s, spans);
  std::string out;
  out.reserve(s.size());
  for (const Span& sp : spans) {
    if (sp.is_match) {
      out += content;
    } else {
      out.append(s, sp.start, sp.end - sp.start);
    }
  }
  return out;
}

Regex parse_pattern(const JsonReader& r, const json& obj, const std::string& where) {
  const json& pat = r.member(obj, where, "pattern");
  const std::string pw = where + ".pattern";
  r.expect_object(pat, pw);
  if (pat.contains("String")) return Regex::from_literal(r.string(pat, pw, "String"), r.file() + ": " + pw);
  if (pat.contains("Regex")) return Regex::from_pattern(r.string(pat, pw, "Regex"), r.file() + ": " + pw);
  r.fail(pw, "must be {\"String\": ...} or {\"Regex\": ...}, got " + JsonReader::brief(pat));
}

// ---------------------------------------------------------------------------------------------
// Normalizers

struct Normalizer {
  enum class Kind { kUnicode, kLowercase, kPrepend, kReplace, kSequence };
  Kind kind = Kind::kSequence;
  text::NormalForm form = text::NormalForm::kNfc;
  std::string content;                 // Prepend: the prefix; Replace: the replacement
  std::shared_ptr<Regex> pattern;      // Replace
  std::vector<Normalizer> children;    // Sequence
};

Normalizer parse_normalizer(const JsonReader& r, const json& j, const std::string& where) {
  const std::string type = r.string(j, where, "type");
  Normalizer n;
  if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") {
    n.kind = Normalizer::Kind::kUnicode;
    n.form = type == "NFC"   ? text::NormalForm::kNfc
             : type == "NFD" ? text::NormalForm::kNfd
             : type == "NFKC" ? text::NormalForm::kNfkc
                              : text::NormalForm::kNfkd;
  } else if (type == "Lowercase") {
    n.kind = Normalizer::Kind::kLowercase;
  } else if (type == "Prepend") {
    n.kind = Normalizer::Kind::kPrepend;
    n.content = r.string(j, where, "prepend");
  } else if (type == "Replace") {
    n.kind = Normalizer::Kind::kReplace;
    n.pattern = std::make_shared<Regex>(parse_pattern(r, j, where));
    n.content = r.string(j, where, "content");
  } else if (type == "Sequence") {
    n.kind = Normalizer::Kind::kSequence;
    const json& list = r.member(j, where, "normalizers");
    if (!list.is_array()) r.fail(where + ".normalizers", "must be an array");
    for (size_t i = 0; i < list.size(); ++i) {
      n.children.push_back(parse_normalizer(r, list[i], JsonReader::index(where + ".normalizers", i)));
    }
  } else {
    r.unsupported(where + ".type", "'" + type + "'", "NFC, NFD, NFKC, NFKD, Lowercase, Prepend, Replace, Sequence");
  }
  return n;
}

void normalize(const Normalizer& n, std::string& s) {
  if (n.kind == Normalizer::Kind::kUnicode) {
    s = text::unicode_normalize(s, n.form);
  } else if (n.kind == Normalizer::Kind::kLowercase) {
    s = text::unicode_lowercase(s);
  } else if (n.kind == Normalizer::Kind::kPrepend) {
    if (!s.empty()) s.insert(0, n.content);
  } else if (n.kind == Normalizer::Kind::kReplace) {
    s = replace_all(*n.pattern, s, n.content);
  } else if (n.kind == Normalizer::Kind::kSequence) {
    for (const Normalizer& c : n.children) normalize(c, s);
  } else {
    throw std::logic_error("normalize: unknown normalizer kind");
  }
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers

enum class PrependScheme { kAlways, kFirst, kNever };

PrependScheme parse_prepend_scheme(const JsonReader& r, const json& j, const std::string& where) {
  PrependScheme scheme = PrependScheme::kAlways;
  if (r.has(j, "prepend_scheme")) {
    const std::string s = r.string(j, where, "prepend_scheme");
    if (s == "always") {
      scheme = PrependScheme::kAlways;
    } else if (s == "first") {
      scheme = PrependScheme::kFirst;
    } else if (s == "never") {
      scheme = PrependScheme::kNever;
    } else {
      r.unsupported(where + ".prepend_scheme", "'" + s + "'", "always, first, never");
    }
  }
  // Files from before prepend_scheme say add_prefix_space; false means never.
  if (!r.boolean(j, where, "add_prefix_space", true)) {
    if (scheme != PrependScheme::kNever && r.has(j, "prepend_scheme")) {
      r.fail(where + ".add_prefix_space", "is false but prepend_scheme is not 'never'");
    }
    scheme = PrependScheme::kNever;
  }
  return scheme;
}

// GPT-2's pattern, as tokenizers' ByteLevel pre-tokenizer holds it.
constexpr const char* kByteLevelPattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// bytes_to_unicode(): printable Latin-1 bytes stand for themselves, the rest for 256 + n.
struct ByteAlphabet {
  std::array<std::string, 256> byte_to_utf8;
  std::unordered_map<uint32_t, uint8_t> char_to_byte;
  ByteAlphabet() {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
      const uint32_t cp = printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++);
      text::utf8_append(byte_to_utf8[b], cp);
      char_to_byte[cp] = static_cast<uint8_t>(b);
    }
  }
};
const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet a;
  return a;
}

struct PreTokenizer {
  enum class Kind { kByteLevel, kSplit, kDigits, kMetaspace, kSequence };
  Kind kind = Kind::kSequence;
  bool add_prefix_space = false;  // ByteLevel
  bool use_regex = true;          // ByteLevel
  std::shared_ptr<Regex> pattern;  // Split; ByteLevel with use_regex
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;             // Split
  bool individual_digits = false;  // Digits
  std::string replacement;         // Metaspace (one character)
  uint32_t replacement_cp = 0;
  PrependScheme prepend_scheme = PrependScheme::kAlways;
  bool split = true;               // Metaspace
  std::vector<PreTokenizer> children;
};

PreTokenizer parse_pre_tokenizer(const JsonReader& r, const json& j, const std::string& where) {
  const std::string type = r.string(j, where, "type");
  PreTokenizer p;
  if (type == "ByteLevel") {
    p.kind = PreTokenizer::Kind::kByteLevel;
    p.add_prefix_space = r.boolean(j, where, "add_prefix_space", true);
    p.use_regex = r.boolean(j, where, "use_regex", true);
    if (p.use_regex) p.pattern = std::make_shared<Regex>(Regex::from_pattern(kByteLevelPattern, "ByteLevel"));
  } else if (type == "Split") {
    p.kind = PreTokenizer::Kind::kSplit;
    p.pattern = std::make_shared<Regex>(parse_pattern(r, j, where));
    p.behavior = parse_behavior(r, j, where);
    p.invert = r.boolean(j, where, "invert", false);
  } else if (type == "Digits") {
    p.kind = PreTokenizer::Kind::kDigits;
    p.individual_digits = r.boolean(j, where, "individual_digits", false);
  } else if (type == "Metaspace") {
    p.kind = PreTokenizer::Kind::kMetaspace;
    p.replacement = r.character(j, where, "replacement");
    size_t i = 0;
    p.replacement_cp = text::utf8_next(p.replacement, i);
    p.prepend_scheme = parse_prepend_scheme(r, j, where);
    p.split = r.boolean(j, where, "split", true);
  } else if (type == "Sequence") {
    p.kind = PreTokenizer::Kind::kSequence;
    const json& list = r.member(j, where, "pretokenizers");
    if (!list.is_array()) r.fail(where + ".pretokenizers", "must be an array");
    for (size_t i = 0; i < list.size(); ++i) {
      p.children.push_back(parse_pre_tokenizer(r, list[i], JsonReader::index(where + ".pretokenizers", i)));
    }
  } else {
    r.unsupported(where + ".type", "'" + type + "'", "ByteLevel, Split, Digits, Metaspace, Sequence");
  }
  return p;
}

// One pre-tokenizer over one piece (not an added token); appends the non-empty results.
void pre_tokenize_piece(const PreTokenizer& p, Piece& piece, Pieces& out) {
  thread_local std::vector<Span> spans;
  if (p.kind == PreTokenizer::Kind::kByteLevel) {
    if (p.add_prefix_space && !piece.text.empty() && piece.text[0] != ' ') piece.text.insert(0, " ");
    const size_t first = out.size();
    if (p.use_regex) {
      p.pattern->find_matches(piece.text, spans);
      split_piece(piece, spans, SplitBehavior::kIsolated, out);
    } else if (!piece.text.empty()) {
      out.push_back(std::move(piece));
    }
    const auto& alphabet = byte_alphabet().byte_to_utf8;
    for (size_t k = first; k < out.size(); ++k) {
      std::string mapped;
      mapped.reserve(out[k].text.size() * 2);
      for (unsigned char b : out[k].text) mapped += alphabet[b];
      out[k].text = std::move(mapped);
    }
  } else if (p.kind == PreTokenizer::Kind::kSplit) {
    p.pattern->find_matches(piece.text, spans);
    if (p.invert) invert(spans);
    split_piece(piece, spans, p.behavior, out);
  } else if (p.kind == PreTokenizer::Kind::kDigits) {
    find_char_matches(piece.text, text::is_numeric, spans);
    split_piece(piece, spans,
                p.individual_digits ? SplitBehavior::kIsolated : SplitBehavior::kContiguous, out);
  } else if (p.kind == PreTokenizer::Kind::kMetaspace) {
    std::string s;
    s.reserve(piece.text.size() + 8);
    for (char c : piece.text) {
      if (c == ' ') {
        s += p.replacement;
      } else {
        s += c;
      }
    }
    const bool starts = s.compare(0, p.replacement.size(), p.replacement) == 0;
    if (!s.empty() && !starts &&
        (p.prepend_scheme == PrependScheme::kAlways ||
         (p.prepend_scheme == PrependScheme::kFirst && piece.at_origin))) {
      s.insert(0, p.replacement);
    }
    piece.text = std::move(s);
    if (p.split) {
      const uint32_t rep = p.replacement_cp;
      find_char_matches(piece.text, [rep](uint32_t cp) { return cp == rep; }, spans);
      split_piece(piece, spans, SplitBehavior::kMergedWithNext, out);
    } else if (!piece.text.empty()) {
      out.push_back(std::move(piece));
    }
  } else if (p.kind == PreTokenizer::Kind::kSequence) {
    Pieces cur{std::move(piece)}, next;
    for (const PreTokenizer& c : p.children) {
      next.clear();
      for (Piece& q : cur) pre_tokenize_piece(c, q, next);
      std::swap(cur, next);
    }
    for (Piece& q : cur) out.push_back(std::move(q));
  } else {
    throw std::logic_error("pre_tokenize: unknown pre-tokenizer kind");
  }
}

// ---------------------------------------------------------------------------------------------
// The BPE model

struct Bpe {
  std::unordered_map<std::string, int32_t> vocab;
  std::unordered_map<int32_t, std::string> id_to_token;
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };
  std::unordered_map<uint64_t, Merge> merges;  // (left id << 32 | right id) -> merge
  std::optional<std::string> unk_token;
  std::string continuing_subword_prefix, end_of_word_suffix;
  bool fuse_unk = false, byte_fallback = false, ignore_merges = false;
  std::array<int32_t, 256> byte_ids{};  // <0xXX> tokens for byte_fallback, -1 when absent
  int32_t max_id = -1;

  // Word cache (tokenizers keeps one too): piece -> ids; readers share, a busy writer skips.
  static constexpr size_t kCacheCapacity = 200000;
  static constexpr size_t kCacheMaxWordBytes = 256;
  struct WordCache {
    std::unordered_map<std::string, std::vector<int32_t>> words;
    std::shared_mutex mutex;
  };
  std::unique_ptr<WordCache> cache = std::make_unique<WordCache>();

  static uint64_t key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  void tokenize(const std::string& word, const std::string& where, std::vector<int32_t>& out) const;
  void merge_word(const std::string& word, const std::string& where, std::vector<int32_t>& out) const;
};

void Bpe::tokenize(const std::string& word, const std::string& where, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (ignore_merges) {
    auto it = vocab.find(word);
    if (it != vocab.end()) {
      out.push_back(it->second);
      return;
    }
  }
  const bool cacheable = word.size() < kCacheMaxWordBytes;
  if (cacheable) {
    std::shared_lock<std::shared_mutex> lock(cache->mutex);
    auto it = cache->words.find(word);
    if (it != cache->words.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t first = out.size();
  merge_word(word, where, out);
  if (cacheable) {
    std::unique_lock<std::shared_mutex> lock(cache->mutex, std::try_to_lock);
    if (lock.owns_lock() && cache->words.size() < kCacheCapacity) {
      cache->words.emplace(word, std::vector<int32_t>(out.begin() + static_cast<std::ptrdiff_t>(first), out.end()));
    }
  }
}

void Bpe::merge_word(const std::string& w, const std::string& where, std::vector<int32_t>& out) const {
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool alive;
  };
  thread_local std::vector<Symbol> symbols;
  symbols.clear();
  auto add = [](int32_t id) {
    const auto n = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, n - 1, n + 1, true});
  };
  bool unk_pending = false;
  int32_t unk_id = -1;
  std::string s;
  size_t i = 0;
  while (i < w.size()) {
    const size_t b = i;
    i += text::utf8_len(static_cast<unsigned char>(w[i]));
    s.assign(w, b, i - b);
    if (b != 0 && !continuing_subword_prefix.empty()) s.insert(0, continuing_subword_prefix);
    if (i >= w.size() && !end_of_word_suffix.empty()) s += end_of_word_suffix;
    auto it = vocab.find(s);
    if (it != vocab.end()) {
      if (unk_pending) {
        add(unk_id);
        unk_pending = false;
      }
      add(it->second);
      continue;
    }
    if (byte_fallback) {
      bool all = true;
      for (unsigned char c : s) all &= byte_ids[c] >= 0;
      if (all) {
        // As tokenizers: a pending unknown is not flushed before the byte tokens.
        for (unsigned char c : s) add(byte_ids[c]);
        continue;
      }
    }
    if (unk_token) {
      auto u = vocab.find(*unk_token);
      if (u == vocab.end()) {
        throw std::invalid_argument(where + ": model.unk_token '" + *unk_token +
                                    "' is not in model.vocab but the text needs it");
      }
      if (unk_pending && !fuse_unk) add(unk_id);
      unk_pending = true;
      unk_id = u->second;
    }
  }
  if (unk_pending) add(unk_id);
  if (symbols.empty()) return;
  symbols.back().next = -1;

  // Lowest rank first, then leftmost; stale entries are skipped when popped.
  struct Entry {
    int32_t rank;
    int32_t pos;
    int32_t new_id;
  };
  auto later = [](const Entry& a, const Entry& b) { return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos; };
  thread_local std::vector<Entry> heap;
  heap.clear();
  auto push = [&](int32_t pos) {
    const Symbol& l = symbols[static_cast<size_t>(pos)];
    if (l.next < 0) return;
    auto m = merges.find(key(l.id, symbols[static_cast<size_t>(l.next)].id));
    if (m == merges.end()) return;
    heap.push_back({m->second.rank, pos, m->second.new_id});
    std::push_heap(heap.begin(), heap.end(), later);
  };
  for (int32_t k = 0; k + 1 < static_cast<int32_t>(symbols.size()); ++k) push(k);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later);
    const Entry top = heap.back();
    heap.pop_back();
    Symbol& left = symbols[static_cast<size_t>(top.pos)];
    if (!left.alive || left.next < 0) continue;
    Symbol& right = symbols[static_cast<size_t>(left.next)];
    auto m = merges.find(key(left.id, right.id));
    if (m == merges.end() || m->second.new_id != top.new_id) continue;
    left.id = top.new_id;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) symbols[static_cast<size_t>(right.next)].prev = top.pos;
    if (left.prev >= 0) push(left.prev);
    push(top.pos);
  }
  for (const Symbol& sym : symbols) {
    if (sym.alive) out.push_back(sym.id);
  }
}

Bpe parse_bpe(const JsonReader& r, const json& j, const std::string& where) {
  Bpe m;
  if (r.has(j, "dropout")) {
    const json& d = j["dropout"];
    if (!d.is_number() || d.get<double>() != 0.0) {
      r.unsupported(where + ".dropout", JsonReader::brief(d), "null");
    }
  }
  if (r.has(j, "unk_token")) m.unk_token = r.string(j, where, "unk_token");
  if (r.has(j, "continuing_subword_prefix")) m.continuing_subword_prefix = r.string(j, where, "continuing_subword_prefix");
  if (r.has(j, "end_of_word_suffix")) m.end_of_word_suffix = r.string(j, where, "end_of_word_suffix");
  m.fuse_unk = r.boolean(j, where, "fuse_unk", false);
  m.byte_fallback = r.boolean(j, where, "byte_fallback", false);
  m.ignore_merges = r.boolean(j, where, "ignore_merges", false);

  const json& vocab = r.member(j, where, "vocab");
  if (!vocab.is_object()) r.fail(where + ".vocab", "must be an object {token: id}, got " + JsonReader::brief(vocab));
  m.vocab.reserve(vocab.size());
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    const int32_t id = r.token_id(it.value(), where + ".vocab[\"" + it.key() + "\"]");
    m.vocab[it.key()] = id;
    m.id_to_token[id] = it.key();
    m.max_id = std::max(m.max_id, id);
  }
  m.byte_ids.fill(-1);
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    auto it = m.vocab.find(name);
    if (it != m.vocab.end()) m.byte_ids[static_cast<size_t>(b)] = it->second;
  }

  const json& merges = r.member(j, where, "merges");
  if (!merges.is_array()) r.fail(where + ".merges", "must be an array, got " + JsonReader::brief(merges));
  m.merges.reserve(merges.size() * 2);
  const size_t prefix_len = m.continuing_subword_prefix.size();
  for (size_t k = 0; k < merges.size(); ++k) {
    const std::string mw = JsonReader::index(where + ".merges", k);
    const json& e = merges[k];
    std::string a, b;
    if (e.is_string()) {
      const std::string line = e.get<std::string>();
      const size_t sp = line.find(' ');
      if (sp == std::string::npos || line.find(' ', sp + 1) != std::string::npos) {
        r.fail(mw, "must be two tokens separated by one space, got " + JsonReader::brief(e));
      }
      a = line.substr(0, sp);
      b = line.substr(sp + 1);
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    } else {
      r.fail(mw, "must be \"A B\" or [\"A\", \"B\"], got " + JsonReader::brief(e));
    }
    auto ia = m.vocab.find(a), ib = m.vocab.find(b);
    if (ia == m.vocab.end()) r.fail(mw, "names '" + a + "', which is not in " + where + ".vocab");
    if (ib == m.vocab.end()) r.fail(mw, "names '" + b + "', which is not in " + where + ".vocab");
    const std::string merged = a + (prefix_len <= b.size() ? b.substr(prefix_len) : std::string());
    auto in = m.vocab.find(merged);
    if (in == m.vocab.end()) r.fail(mw, "makes '" + merged + "', which is not in " + where + ".vocab");
    m.merges[Bpe::key(ia->second, ib->second)] = {static_cast<int32_t>(k), in->second};
  }
  return m;
}

// ---------------------------------------------------------------------------------------------
// Added tokens: leftmost-longest matching over the text, as the daachorse automaton does.

struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool single_word = false, lstrip = false, rstrip = false, normalized = true, special = false;
};

class AddedTokenMatcher {
 public:
  void add(std::string pattern, int32_t token) {
    if (pattern.empty()) return;
    const auto b = static_cast<unsigned char>(pattern[0]);
    by_byte_[b].push_back({std::move(pattern), token});
    any_ = true;
  }
  void finish() {
    for (auto& list : by_byte_) {
      std::stable_sort(list.begin(), list.end(),
                       [](const Entry& x, const Entry& y) { return x.pattern.size() > y.pattern.size(); });
    }
  }
  bool empty() const { return !any_; }

  struct Match {
    int32_t token;  // index into the added tokens, -1 for plain text
    size_t start, end;
  };
  // AddedVocabulary::find_matches: splits covering `s`, with single_word / lstrip / rstrip.
  void find_matches(const std::string& s, const std::vector<AddedToken>& tokens, std::vector<Match>& out) const {
    out.clear();
    if (s.empty()) {
      out.push_back({-1, 0, 0});
      return;
    }
    size_t start_offset = 0;
    size_t pos = 0;
    while (pos < s.size()) {
      const Entry* hit = longest_at(s, pos);
      if (!hit) {
        ++pos;
        continue;
      }
      size_t start = pos, stop = pos + hit->pattern.size();
      const AddedToken& t = tokens[static_cast<size_t>(hit->token)];
      // The automaton moves past every match, used or discarded.
      pos = stop;
      if (t.single_word) {
        const bool start_space = start == 0 || !ends_with_word(s, start);
        const bool stop_space = stop == s.size() || !starts_with_word(s, stop);
        if (!start_space || !stop_space) continue;
      }
      if (t.lstrip) {
        size_t k = start;
        while (k > 0) {
          size_t c = k - 1;
          while (c > 0 && (static_cast<unsigned char>(s[c]) & 0xc0) == 0x80) --c;
          size_t q = c;
          if (!text::is_white_space(text::utf8_next(s, q))) break;
          k = c;
        }
        start = std::max(k, start_offset);
      }
      if (t.rstrip) {
        size_t k = stop;
        while (k < s.size()) {
          size_t q = k;
          if (!text::is_white_space(text::utf8_next(s, q))) break;
          k = q;
        }
        stop = k;
      }
      if (start_offset < start) out.push_back({-1, start_offset, start});
      out.push_back({hit->token, start, stop});
      start_offset = stop;
    }
    if (start_offset != s.size()) out.push_back({-1, start_offset, s.size()});
  }

 private:
  struct Entry {
    std::string pattern;
    int32_t token;
  };
  const Entry* longest_at(const std::string& s, size_t pos) const {
    const auto& list = by_byte_[static_cast<unsigned char>(s[pos])];
    for (const Entry& e : list) {
      if (s.size() - pos >= e.pattern.size() && s.compare(pos, e.pattern.size(), e.pattern) == 0) return &e;
    }
    return nullptr;
  }
  static bool ends_with_word(const std::string& s, size_t end) {
    size_t c = end - 1;
    while (c > 0 && (static_cast<unsigned char>(s[c]) & 0xc0) == 0x80) --c;
    return text::is_word_char(text::utf8_next(s, c));
  }
  static bool starts_with_word(const std::string& s, size_t start) {
    return text::is_word_char(text::utf8_next(s, start));
  }
  std::array<std::vector<Entry>, 256> by_byte_;
  bool any_ = false;
};

// ---------------------------------------------------------------------------------------------
// Post-processors (single sequence): ids before and after the encoded text.

struct PostProcessor {
  std::vector<int32_t> prefix, suffix;
};

void parse_post_processor(const JsonReader& r, const json& j, const std::string& where, PostProcessor& pp) {
  const std::string type = r.string(j, where, "type");
  if (type == "ByteLevel") {
    return;  // trims offsets only
  } else if (type == "TemplateProcessing") {
    const json& single = r.member(j, where, "single");
    const json& specials = r.member(j, where, "special_tokens");
    r.expect_object(specials, where + ".special_tokens");
    if (!single.is_array()) r.fail(where + ".single", "must be an array");
    std::vector<int32_t> before, after;
    bool seen_sequence = false;
    for (size_t i = 0; i < single.size(); ++i) {
      const std::string iw = JsonReader::index(where + ".single", i);
      const json& item = single[i];
      r.expect_object(item, iw);
      if (item.contains("Sequence")) {
        const std::string id = r.string(item["Sequence"], iw + ".Sequence", "id");
        if (id != "A") r.unsupported(iw + ".Sequence.id", "'" + id + "' in a single-sequence template", "A");
        seen_sequence = true;
      } else if (item.contains("SpecialToken")) {
        const std::string name = r.string(item["SpecialToken"], iw + ".SpecialToken", "id");
        const std::string sw = where + ".special_tokens[\"" + name + "\"]";
        if (!specials.contains(name)) r.fail(sw, "is missing (named by " + iw + ")");
        const json& ids = r.member(specials[name], sw, "ids");
        if (!ids.is_array()) r.fail(sw + ".ids", "must be an array");
        for (size_t k = 0; k < ids.size(); ++k) {
          (seen_sequence ? after : before).push_back(r.token_id(ids[k], JsonReader::index(sw + ".ids", k)));
        }
      } else {
        r.fail(iw, "must be {\"Sequence\": ...} or {\"SpecialToken\": ...}, got " + JsonReader::brief(item));
      }
    }
    pp.prefix.insert(pp.prefix.begin(), before.begin(), before.end());
    pp.suffix.insert(pp.suffix.end(), after.begin(), after.end());
  } else if (type == "RobertaProcessing" || type == "BertProcessing") {
    auto pair_id = [&](const char* key) {
      const json& v = r.member(j, where, key);
      if (!v.is_array() || v.size() != 2) r.fail(JsonReader::join(where, key), "must be [token, id]");
      return r.token_id(v[1], JsonReader::join(where, key) + "[1]");
    };
    pp.prefix.insert(pp.prefix.begin(), pair_id("cls"));
    pp.suffix.push_back(pair_id("sep"));
  } else if (type == "Sequence") {
    const json& list = r.member(j, where, "processors");
    if (!list.is_array()) r.fail(where + ".processors", "must be an array");
    for (size_t i = 0; i < list.size(); ++i) {
      parse_post_processor(r, list[i], JsonReader::index(where + ".processors", i), pp);
    }
  } else {
    r.unsupported(where + ".type", "'" + type + "'", "TemplateProcessing, ByteLevel, RobertaProcessing, BertProcessing, Sequence");
  }
}

// ---------------------------------------------------------------------------------------------
// Decoders: each maps the list of token strings to a new list; the result is joined.

struct Decoder {
  enum class Kind { kByteLevel, kMetaspace, kReplace, kByteFallback, kFuse, kStrip, kSequence };
  Kind kind = Kind::kSequence;
  std::string replacement;  // Metaspace
  uint32_t replacement_cp = 0;
  PrependScheme prepend_scheme = PrependScheme::kAlways;
  std::shared_ptr<Regex> pattern;  // Replace
  std::string content;             // Replace
  uint32_t strip_cp = 0;           // Strip
  size_t start = 0, stop = 0;      // Strip
  std::vector<Decoder> children;
};

Decoder parse_decoder(const JsonReader& r, const json& j, const std::string& where) {
  const std::string type = r.string(j, where, "type");
  Decoder d;
  if (type == "ByteLevel") {
    d.kind = Decoder::Kind::kByteLevel;
  } else if (type == "Metaspace") {
    d.kind = Decoder::Kind::kMetaspace;
    d.replacement = r.character(j, where, "replacement");
    size_t i = 0;
    d.replacement_cp = text::utf8_next(d.replacement, i);
    d.prepend_scheme = parse_prepend_scheme(r, j, where);
  } else if (type == "Replace") {
    d.kind = Decoder::Kind::kReplace;
    d.pattern = std::make_shared<Regex>(parse_pattern(r, j, where));
    d.content = r.string(j, where, "content");
  } else if (type == "ByteFallback") {
    d.kind = Decoder::Kind::kByteFallback;
  } else if (type == "Fuse") {
    d.kind = Decoder::Kind::kFuse;
  } else if (type == "Strip") {
    d.kind = Decoder::Kind::kStrip;
    const std::string c = r.character(j, where, "content");
    size_t i = 0;
    d.strip_cp = text::utf8_next(c, i);
    const int64_t start = r.integer(r.member(j, where, "start"), where + ".start");
    const int64_t stop = r.integer(r.member(j, where, "stop"), where + ".stop");
    if (start < 0 || stop < 0) r.fail(where, "start and stop must be >= 0");
    d.start = static_cast<size_t>(start);
    d.stop = static_cast<size_t>(stop);
  } else if (type == "Sequence") {
    d.kind = Decoder::Kind::kSequence;
    const json& list = r.member(j, where, "decoders");
    if (!list.is_array()) r.fail(where + ".decoders", "must be an array");
    for (size_t i = 0; i < list.size(); ++i) {
      d.children.push_back(parse_decoder(r, list[i], JsonReader::index(where + ".decoders", i)));
    }
  } else {
    r.unsupported(where + ".type", "'" + type + "'", "ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip, Sequence");
  }
  return d;
}

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// "<0xXX>" as u8::from_str_radix reads XX (a leading '+' allowed), else -1.
int fallback_byte(const std::string& t) {
  if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return -1;
  if (t[3] == '+') return hex_digit(t[4]);
  const int hi = hex_digit(t[3]), lo = hex_digit(t[4]);
  return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

void decode_chain(const Decoder& d, std::vector<std::string>& tokens) {
  if (d.kind == Decoder::Kind::kByteLevel) {
    const auto& map = byte_alphabet().char_to_byte;
    std::string bytes;
    for (const std::string& t : tokens) {
      std::string tb;
      bool ok = true;
      size_t i = 0;
      while (i < t.size()) {
        auto it = map.find(text::utf8_next(t, i));
        if (it == map.end()) {
          ok = false;
          break;
        }
        tb += static_cast<char>(it->second);
      }
      bytes += ok ? tb : t;
    }
    tokens.assign(1, text::utf8_repair(bytes));
  } else if (d.kind == Decoder::Kind::kMetaspace) {
    for (size_t k = 0; k < tokens.size(); ++k) {
      std::string out;
      size_t i = 0;
      const std::string& t = tokens[k];
      while (i < t.size()) {
        const size_t b = i;
        const uint32_t cp = text::utf8_next(t, i);
        if (cp == d.replacement_cp) {
          if (!(k == 0 && d.prepend_scheme != PrependScheme::kNever)) out += ' ';
        } else {
          out.append(t, b, i - b);
        }
      }
      tokens[k] = std::move(out);
    }
  } else if (d.kind == Decoder::Kind::kReplace) {
    for (std::string& t : tokens) t = replace_all(*d.pattern, t, d.content);
  } else if (d.kind == Decoder::Kind::kByteFallback) {
    std::vector<std::string> out;
    std::string pending;
    auto flush = [&] {
      if (pending.empty()) return;
      if (text::utf8_valid(pending)) {
        out.push_back(pending);
      } else {
        for (size_t i = 0; i < pending.size(); ++i) out.push_back("\xef\xbf\xbd");
      }
      pending.clear();
    };
    for (std::string& t : tokens) {
      const int b = fallback_byte(t);
      if (b >= 0) {
        pending += static_cast<char>(b);
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    tokens = std::move(out);
  } else if (d.kind == Decoder::Kind::kFuse) {
    std::string all;
    for (const std::string& t : tokens) all += t;
    tokens.assign(1, std::move(all));
  } else if (d.kind == Decoder::Kind::kStrip) {
    for (std::string& t : tokens) {
      std::vector<size_t> starts;  // byte offset of each character, then the end
      for (size_t i = 0; i < t.size(); i += text::utf8_len(static_cast<unsigned char>(t[i]))) starts.push_back(i);
      const size_t n = starts.size();
      starts.push_back(t.size());
      auto cp_at = [&](size_t c) {
        size_t i = starts[c];
        return text::utf8_next(t, i);
      };
      size_t start_cut = 0;
      for (size_t c = 0; c < std::min(d.start, n) && cp_at(c) == d.strip_cp; ++c) start_cut = c + 1;
      size_t stop_cut = n;
      for (size_t k = 0; k < std::min(d.stop, n); ++k) {
        const size_t c = n - k - 1;
        if (cp_at(c) != d.strip_cp) break;
        stop_cut = c;
      }
      t = start_cut < stop_cut ? t.substr(starts[start_cut], starts[stop_cut] - starts[start_cut]) : std::string();
    }
  } else if (d.kind == Decoder::Kind::kSequence) {
    for (const Decoder& c : d.children) decode_chain(c, tokens);
  } else {
    throw std::logic_error("decode_chain: unknown decoder kind");
  }
}


}  // namespace

// ---------------------------------------------------------------------------------------------

struct Tokenizer::Impl {
  std::string where;
  std::string hash;
  std::optional<Normalizer> normalizer;
  std::optional<PreTokenizer> pre_tokenizer;
  Bpe model;
  PostProcessor post;
  std::optional<Decoder> decoder;
  std::vector<AddedToken> added;
  std::unordered_map<std::string, int32_t> added_by_content;  // content -> id
  std::unordered_map<int32_t, std::string> added_by_id;       // id -> content, normalized if the token is
  std::unordered_set<std::string> special_contents;
  AddedTokenMatcher raw_matcher, normalized_matcher;  // normalized = false / true

  void split_added(const AddedTokenMatcher& m, Piece& piece, Pieces& out) const {
    if (m.empty()) {
      if (!piece.text.empty()) out.push_back(std::move(piece));
      return;
    }
    thread_local std::vector<AddedTokenMatcher::Match> matches;
    m.find_matches(piece.text, added, matches);
    for (const auto& mt : matches) {
      if (mt.end == mt.start) continue;
      Piece p{piece.text.substr(mt.start, mt.end - mt.start), -1, piece.at_origin && mt.start == 0};
      if (mt.token >= 0) p.id = added[static_cast<size_t>(mt.token)].id;
      out.push_back(std::move(p));
    }
  }
};

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

Tokenizer Tokenizer::from_file(const std::string& path) { return from_json_text(io::file_read(path, "tokenizer file"), path); }

Tokenizer Tokenizer::from_json_text(const std::string& text, const std::string& where) {
  JsonReader r(where);
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {  // parse_error, or out_of_range for a number like 1e999
    throw std::invalid_argument(where + ": not valid JSON (" + e.what() + ")");
  }
  if (!j.is_object()) r.fail("the top level", "must be a JSON object");
  auto impl = std::make_unique<Impl>();
  impl->where = where;
  impl->hash = io::hex16(io::fnv1a64(text));

  for (const char* key : {"truncation", "padding"}) {
    if (r.has(j, key)) r.unsupported(key, JsonReader::brief(j[key]), "null");
  }
  // The model first: added tokens and templates refer to its vocabulary.
  const json& model = r.member(j, "", "model");
  r.expect_object(model, "model");
  std::string type = model.contains("type") ? r.string(model, "model", "type") : "BPE";
  if (type != "BPE") r.unsupported("model.type", "'" + type + "'", "BPE");
  impl->model = parse_bpe(r, model, "model");

  if (r.has(j, "normalizer")) impl->normalizer = parse_normalizer(r, j["normalizer"], "normalizer");
  if (r.has(j, "pre_tokenizer")) impl->pre_tokenizer = parse_pre_tokenizer(r, j["pre_tokenizer"], "pre_tokenizer");
  if (r.has(j, "post_processor")) parse_post_processor(r, j["post_processor"], "post_processor", impl->post);
  if (r.has(j, "decoder")) impl->decoder = parse_decoder(r, j["decoder"], "decoder");

  if (r.has(j, "added_tokens")) {
    const json& list = j["added_tokens"];
    if (!list.is_array()) r.fail("added_tokens", "must be an array, got " + JsonReader::brief(list));
    auto next_id = static_cast<int32_t>(impl->model.vocab.size());
    for (size_t i = 0; i < list.size(); ++i) {
      const std::string aw = JsonReader::index("added_tokens", i);
      const json& e = list[i];
      AddedToken t;
      t.content = r.string(e, aw, "content");
      r.token_id(r.member(e, aw, "id"), aw + ".id");
      if (t.content.empty()) continue;  // tokenizers ignores it
      // tokenizers does not take the file's id: a token of the model vocabulary keeps the
      // model's id, any other gets the next free one from the vocabulary's size on (the two
      // agree in every file tokenizers writes).
      if (auto a = impl->added_by_content.find(t.content); a != impl->added_by_content.end()) {
        t.id = a->second;
      } else if (auto m = impl->model.vocab.find(t.content); m != impl->model.vocab.end()) {
        t.id = m->second;
      } else {
        t.id = next_id++;
      }
      t.single_word = r.boolean(e, aw, "single_word", false);
      t.lstrip = r.boolean(e, aw, "lstrip", false);
      t.rstrip = r.boolean(e, aw, "rstrip", false);
      t.special = r.boolean(e, aw, "special", false);
      t.normalized = r.boolean(e, aw, "normalized", !t.special);
      const auto index = static_cast<int32_t>(impl->added.size());
      // A normalized token is matched, decoded and named by id in its normalized form.
      std::string form = t.content;
      if (t.normalized) {
        if (impl->normalizer) normalize(*impl->normalizer, form);
        impl->normalized_matcher.add(form, index);
      } else {
        impl->raw_matcher.add(t.content, index);
      }
      impl->added_by_content[t.content] = t.id;
      impl->added_by_id[t.id] = form;
      if (t.special) impl->special_contents.insert(t.content);
      impl->added.push_back(std::move(t));
    }
  }
  impl->raw_matcher.finish();
  impl->normalized_matcher.finish();
  return Tokenizer(std::move(impl));
}

std::vector<int32_t> Tokenizer::encode(std::string_view input, bool add_special_tokens) const {
  const Impl& im = *impl_;
  Piece whole{text::utf8_valid(input) ? std::string(input) : text::utf8_repair(input), -1, true};
  // 1. added tokens matched on the raw text; 2. the rest normalized, then normalized tokens.
  Pieces raw, pieces;
  im.split_added(im.raw_matcher, whole, raw);
  for (Piece& p : raw) {
    if (p.id >= 0) {
      pieces.push_back(std::move(p));
      continue;
    }
    if (im.normalizer) normalize(*im.normalizer, p.text);
    im.split_added(im.normalized_matcher, p, pieces);
  }
  // 3. pre-tokenizer; 4. model.
  if (im.pre_tokenizer) {
    Pieces cut;
    cut.reserve(pieces.size() * 4);
    for (Piece& p : pieces) {
      if (p.id >= 0) {
        cut.push_back(std::move(p));
      } else {
        pre_tokenize_piece(*im.pre_tokenizer, p, cut);
      }
    }
    pieces = std::move(cut);
  }
  std::vector<int32_t> ids;
  ids.reserve(input.size() / 3 + 8);
  if (add_special_tokens) ids.insert(ids.end(), im.post.prefix.begin(), im.post.prefix.end());
  for (const Piece& p : pieces) {
    if (p.id >= 0) {
      ids.push_back(p.id);
    } else {
      im.model.tokenize(p.text, im.where, ids);
    }
  }
  if (add_special_tokens) ids.insert(ids.end(), im.post.suffix.begin(), im.post.suffix.end());
  return ids;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  const Impl& im = *impl_;
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    const std::string* t = nullptr;
    if (auto a = im.added_by_id.find(id); a != im.added_by_id.end()) {
      t = &a->second;
    } else if (auto m = im.model.id_to_token.find(id); m != im.model.id_to_token.end()) {
      t = &m->second;
    }
    if (!t) continue;  // unknown ids are skipped, as tokenizers does
    if (skip_special_tokens && im.special_contents.count(*t)) continue;
    tokens.push_back(*t);
  }
  if (!im.decoder) {
    std::string out;
    for (size_t i = 0; i < tokens.size(); ++i) out += (i ? " " : "") + tokens[i];
    return out;
  }
  decode_chain(*im.decoder, tokens);
  std::string out;
  for (const std::string& t : tokens) out += t;
  return out;
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  const std::string t(token);
  if (auto a = impl_->added_by_content.find(t); a != impl_->added_by_content.end()) return a->second;
  if (auto m = impl_->model.vocab.find(t); m != impl_->model.vocab.end()) return m->second;
  return std::nullopt;
}

std::optional<std::string> Tokenizer::id_to_token(int32_t id) const {
  if (auto a = impl_->added_by_id.find(id); a != impl_->added_by_id.end()) return a->second;
  if (auto m = impl_->model.id_to_token.find(id); m != impl_->model.id_to_token.end()) return m->second;
  return std::nullopt;
}

int64_t Tokenizer::vocab_size() const {
  int64_t n = impl_->model.max_id + 1;
  for (const auto& t : impl_->added) n = std::max<int64_t>(n, int64_t{t.id} + 1);
  return n;
}

const std::string& Tokenizer::content_hash() const { return impl_->hash; }

}  // namespace qlora::data
