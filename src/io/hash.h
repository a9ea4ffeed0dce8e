// Stable, dependency-free mixing, the same on every platform: FNV-1a 64-bit (content hash for
// cache keys; not for security) and splitmix64 (the generator of seeded orders: the sampler's
// shuffle, the validation split).
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

// Advances `state` and returns the next value of Vigna's splitmix64.
inline uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

inline std::string hex16(uint64_t h) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

}  // namespace qlora::io
