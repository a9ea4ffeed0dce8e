#include "cpu_features.h"

#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace qlora::kernels {

const char* cpu_bf16_feature() {
#if defined(__x86_64__) || defined(__i386__)
  static const char* const found = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_max(0, nullptr) < 7) return "";
    __cpuid_count(1, 0, a, b, c, d);
    if (!(c & (1u << 27))) return "";  // OSXSAVE: xgetbv may be executed
    uint32_t xcr0_lo = 0, xcr0_hi = 0;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    const uint64_t xcr0 = (static_cast<uint64_t>(xcr0_hi) << 32) | xcr0_lo;
    const bool zmm_state = (xcr0 & 0xE6) == 0xE6;          // XMM, YMM, opmask, ZMM hi/lo
    const bool tile_state = (xcr0 & 0x60000) == 0x60000;   // XTILECFG, XTILEDATA
    __cpuid_count(7, 0, a, b, c, d);
    const bool avx512f = (b & (1u << 16)) != 0;
    const bool amx_bf16 = tile_state && (d & (1u << 22)) != 0;
    __cpuid_count(7, 1, a, b, c, d);
    const bool avx512_bf16 = zmm_state && avx512f && (a & (1u << 5)) != 0;
    if (avx512_bf16 && amx_bf16) return "AVX512_BF16 and AMX-BF16";
    if (avx512_bf16) return "AVX512_BF16";
    if (amx_bf16) return "AMX-BF16";
    return "";
  }();
  return found;
#else
  return "";
#endif
}

}  // namespace qlora::kernels
