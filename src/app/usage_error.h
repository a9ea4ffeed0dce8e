// The one usage-error type of the binary: a command line that does not parse or an option value
// that is not allowed. main turns it into one line and exit status 2 (errors in the files a user
// hands us are other exceptions: exit status 1).
#pragma once

#include <cstdio>
#include <stdexcept>
#include <string>

namespace qlora::app {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A message as one printable line: messages quote what they found in a file (a key, a tensor
// name, a JSON parser's "last read" bytes), which may hold newlines, control bytes or bytes that
// are not UTF-8. Those become \n, \t, \r or \xNN; valid UTF-8 stays as it is.
inline std::string error_line(const std::string& message) {
  std::string out;
  const auto* p = reinterpret_cast<const unsigned char*>(message.data());
  const size_t n = message.size();
  char hex[5];
  for (size_t i = 0; i < n;) {
    const unsigned char c = p[i];
    size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    bool valid = len > 0 && i + len <= n && !(len == 2 && c < 0xC2);
    for (size_t k = 1; valid && k < len; ++k) valid = (p[i + k] & 0xC0) == 0x80;
    if (valid && len >= 3) {  // no overlong forms, surrogates or code points past U+10FFFF
      const unsigned char d = p[i + 1];
      valid = !(c == 0xE0 && d < 0xA0) && !(c == 0xED && d >= 0xA0) && !(c == 0xF0 && d < 0x90) &&
              !(c == 0xF4 && d >= 0x90) && c <= 0xF4;
    }
    if (valid && len > 1) {
      out.append(message, i, len);
      i += len;
    } else if (c == '\n' || c == '\t' || c == '\r') {
      out += c == '\n' ? "\\n" : c == '\t' ? "\\t" : "\\r";
      ++i;
    } else if (c < 0x20 || c >= 0x7F) {
      std::snprintf(hex, sizeof hex, "\\x%02x", c);
      out += hex;
      ++i;
    } else {
      out += static_cast<char>(c);
      ++i;
    }
  }
  return out;
}

}  // namespace qlora::app
