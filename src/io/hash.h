// FNV-1a 64-bit: a stable, dependency-free content hash for cache keys (not for security).
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

namespace qlora::io {

inline uint64_t fnv1a64(std::string_view bytes, uint64_t h = 0xcbf29ce484222325ull) {
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

inline std::string hex16(uint64_t h) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

}  // namespace qlora::io
