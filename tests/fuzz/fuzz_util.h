// Shared by the libFuzzer harnesses of tests/fuzz: a scratch directory for parsers that take a
// path, and a small reader that turns fuzz bytes into structured choices. Header-only, so the
// same harness builds with clang for libFuzzer (scripts/fuzz.sh) and with the project's compiler
// for the corpus replay (replay_main.cpp, ctest label fuzz).
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <exception>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace qlora::fuzz {

// One directory per process under $TMPDIR (or /tmp), removed when the process exits normally.
inline const std::filesystem::path& scratch_dir() {
  static const std::filesystem::path dir = [] {
    const char* tmp = std::getenv("TMPDIR");
    std::string templ = std::string(tmp && *tmp ? tmp : "/tmp") + "/qlora_fuzz.XXXXXX";
    if (::mkdtemp(templ.data()) == nullptr) {
      std::perror("qlora fuzz: mkdtemp");
      std::abort();
    }
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(scratch_dir(), ec);
    });
    return std::filesystem::path(templ);
  }();
  return dir;
}

// Writes `bytes` to scratch_dir()/name (replacing it) and returns the path.
inline std::string scratch_write(const std::string& name, std::string_view bytes) {
  const std::filesystem::path path = scratch_dir() / name;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) {
    std::perror(("qlora fuzz: cannot write " + path.string()).c_str());
    std::abort();
  }
  return path.string();
}

// Reads choices off the front of the input; past the end every read gives 0 / "".
class Bytes {
 public:
  Bytes(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  size_t left() const { return size_ - pos_; }
  uint8_t u8() { return pos_ < size_ ? data_[pos_++] : 0; }
  uint64_t u64() {
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= uint64_t{u8()} << (8 * i);
    return v;
  }
  // Up to max_len bytes, the length taken from one byte.
  std::string str(size_t max_len) {
    size_t n = u8();
    if (n > max_len) n = max_len;
    if (n > left()) n = left();
    std::string s(reinterpret_cast<const char*>(data_ + pos_), n);
    pos_ += n;
    return s;
  }
  std::string_view rest() {
    std::string_view s(reinterpret_cast<const char*>(data_ + pos_), left());
    pos_ = size_;
    return s;
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

// An expected refusal of bad input; printed when QLORA_FUZZ_VERBOSE is set (to see what the
// seeds reach: QLORA_FUZZ_VERBOSE=1 fuzz_NAME -runs=0 corpus/NAME).
inline void refused(const std::exception& e) {
  static const bool verbose = std::getenv("QLORA_FUZZ_VERBOSE") != nullptr;
  if (verbose) std::fprintf(stderr, "refused: %s\n", e.what());
}

// Splits text at the first line that is exactly `marker`; second is "" without one.
inline std::pair<std::string_view, std::string_view> split_at_line(std::string_view text,
                                                                   std::string_view marker) {
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    if (text.substr(pos, end - pos) == marker) {
      const size_t after = end < text.size() ? end + 1 : end;
      return {text.substr(0, pos), text.substr(after)};
    }
    pos = end + 1;
  }
  return {text, std::string_view()};
}

// Splits text at lines that are exactly `marker` into at most max_parts parts (the last part
// keeps any further markers).
inline std::vector<std::string_view> split_parts(std::string_view text, std::string_view marker,
                                                 size_t max_parts) {
  std::vector<std::string_view> parts;
  while (parts.size() + 1 < max_parts) {
    const auto [head, tail] = split_at_line(text, marker);
    if (head.size() == text.size()) break;
    parts.push_back(head);
    text = tail;
  }
  parts.push_back(text);
  return parts;
}

}  // namespace qlora::fuzz
