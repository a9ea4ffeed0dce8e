// AVX2 4-bit dequantize (fp32 and bf16) against the scalar reference, bit for bit, over odd and
// partial shapes, every blocksize, both formats, hostile absmax values (0, subnormal, huge, inf,
// NaNs with payloads, bf16 rounding ties) and sentinel bytes around the output; plus the
// argument checks and a quantize -> dequantize error bound for the reference itself.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "quant4_cpu.h"
#include "quant4_format.h"
#include "quant4_ref.h"

namespace qlora::kernels {
namespace {

constexpr uint32_t kSeed = 20240611;
constexpr size_t kGuardNbytes = 64;  // sentinel bytes on each side of every output
constexpr uint8_t kSentinel = 0xA5;

const int64_t kNumels[] = {1, 2, 3, 5, 7, 11, 13, 31, 33, 63, 64, 65, 127, 129, 1000, 4097,
                           3 * 4096 + 17};
const int32_t kBlocksizes[] = {32, 64, 128, 256, 512, 1024, 2048, 4096};
const QuantType kTypes[] = {QuantType::nf4, QuantType::fp4};

const char* type_name(QuantType type) { return quant4_traits(type).name; }

float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Absmax values a kernel could get wrong: every special class, plus bit patterns whose low 16
// bits sit on or next to the bf16 rounding tie (FP4 codes +-1, 1/2, 1/4 keep them exact).
float random_absmax(std::mt19937& rng) {
  static const float kSpecial[] = {
      0.0f, -0.0f, 1.0f, std::numeric_limits<float>::min(),
      std::numeric_limits<float>::denorm_min(), 1e-40f, 1e-38f, kAbsmaxFloor,
      std::numeric_limits<float>::max(), 3e38f, std::numeric_limits<float>::infinity(),
      -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(),
      bits_to_float(0x7fc12345u),  // quiet NaN with a payload
      bits_to_float(0xffc00001u),  // negative quiet NaN
      bits_to_float(0x7f800001u),  // signaling NaN: the multiply quiets it
      bits_to_float(0x7fffffffu),  // NaN that plain rounding would carry into the sign bit
      bits_to_float(0xffff8000u),  // negative NaN on a rounding tie
      bits_to_float(0x7f7f8000u),  // largest finite that rounds to bf16 inf
      -2.5f};
  std::uniform_int_distribution<int> pick(0, 9);
  const int kind = pick(rng);
  if (kind == 0) {
    std::uniform_int_distribution<size_t> i(0, std::size(kSpecial) - 1);
    return kSpecial[i(rng)];
  }
  std::uniform_int_distribution<uint32_t> u32;
  if (kind == 1) {
    // on the tie (0x8000) or one below/above it, any exponent, even or odd bf16 mantissa
    static const uint32_t kLow[] = {0x8000u, 0x7fffu, 0x8001u};
    const uint32_t bits = (u32(rng) & 0x7fff0000u) | kLow[u32(rng) % 3];
    return bits_to_float(bits);
  }
  // Random finite magnitudes over most of the exponent range, subnormal results included.
  std::uniform_real_distribution<float> mant(0.5f, 1.0f);
  std::uniform_int_distribution<int> exp(-140, 120);
  return std::ldexp(mant(rng), exp(rng));
}

// A buffer of numel T with kGuardNbytes of sentinel on each side, the output starting
// misalign elements after a 64-byte boundary (0 lets the streaming-store path run).
template <typename T>
class Guarded {
 public:
  Guarded(int64_t numel, size_t misalign)
      : numel_(numel),
        raw_(kGuardNbytes * 2 + 64 + (misalign + static_cast<size_t>(numel)) * sizeof(T)) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(raw_.data()) + kGuardNbytes;
    const uintptr_t aligned = (base + 63) / 64 * 64 + misalign * sizeof(T);
    begin_ = aligned - reinterpret_cast<uintptr_t>(raw_.data());
    std::fill(raw_.begin(), raw_.end(), kSentinel);
  }
  T* data() { return reinterpret_cast<T*>(raw_.data() + begin_); }
  size_t nbytes() const { return static_cast<size_t>(numel_) * sizeof(T); }
  // True if no sentinel byte changed; else *where names the first changed one, as an offset
  // from data() (negative = before the output).
  bool sentinels_intact(std::string* where) const {
    for (size_t i = 0; i < raw_.size(); ++i) {
      if (i >= begin_ && i < begin_ + nbytes()) continue;
      if (raw_[i] != kSentinel) {
        *where = "byte " + std::to_string(static_cast<int64_t>(i) - static_cast<int64_t>(begin_)) +
                 " relative to out[0] changed to " + std::to_string(raw_[i]);
        return false;
      }
    }
    return true;
  }

 private:
  int64_t numel_;
  std::vector<uint8_t> raw_;
  size_t begin_ = 0;
};

struct Inputs {
  std::vector<uint8_t> packed;  // [(numel+1)/2]
  std::vector<float> absmax;    // [blocks]
};

Inputs random_inputs(std::mt19937& rng, int64_t numel, int32_t blocksize) {
  Inputs in;
  in.packed.resize(static_cast<size_t>(packed_nbytes(numel)));
  std::uniform_int_distribution<int> byte(0, 255);
  for (auto& b : in.packed) b = static_cast<uint8_t>(byte(rng));
  in.absmax.resize(static_cast<size_t>(num_blocks(numel, blocksize)));
  for (auto& a : in.absmax) a = random_absmax(rng);
  return in;
}

std::string params(int64_t numel, int32_t blocksize, QuantType type, const char* dtype) {
  return "numel=" + std::to_string(numel) + " blocksize=" + std::to_string(blocksize) +
         " type=" + type_name(type) + " dtype=" + dtype;
}

uint32_t out_bits(float v) { return float_to_bits(v); }
uint32_t out_bits(uint16_t v) { return v; }

// Compares got against want byte for byte; on mismatch reports the first differing element.
template <typename T>
void expect_identical(const T* got, const std::vector<T>& want, const Inputs& in, int64_t numel,
                      int32_t blocksize, const std::string& what) {
  if (numel == 0 || std::memcmp(got, want.data(), want.size() * sizeof(T)) == 0) return;
  for (int64_t i = 0; i < numel; ++i) {
    if (out_bits(got[i]) != out_bits(want[static_cast<size_t>(i)])) {
      const size_t b = static_cast<size_t>(i / blocksize);
      ADD_FAILURE() << what << " index=" << i << " got=0x" << std::hex << out_bits(got[i])
                    << " want=0x" << out_bits(want[static_cast<size_t>(i)]) << " absmax=0x"
                    << float_to_bits(in.absmax[b]) << std::dec << " ("
                    << in.absmax[b] << ") packed byte=" << int{in.packed[i / 2]};
      return;
    }
  }
}

// One (numel, blocksize, type) case for fp32 and bf16, through fn_f32 / fn_bf16.
template <typename FnF32, typename FnBf16>
void check_case(std::mt19937& rng, int64_t numel, int32_t blocksize, QuantType type,
                size_t misalign, FnF32 fn_f32, FnBf16 fn_bf16) {
  const Inputs in = random_inputs(rng, numel, blocksize);
  const size_t n = static_cast<size_t>(numel);
  {
    std::vector<float> want(n);
    dequantize_4bit_ref(in.packed.data(), in.absmax.data(), numel, blocksize, type, want.data());
    Guarded<float> got(numel, misalign);
    fn_f32(in.packed.data(), in.absmax.data(), numel, blocksize, type, got.data());
    const std::string what = params(numel, blocksize, type, "fp32") +
                             " misalign=" + std::to_string(misalign);
    expect_identical(got.data(), want, in, numel, blocksize, what);
    std::string where;
    EXPECT_TRUE(got.sentinels_intact(&where)) << what << ": " << where;
  }
  {
    std::vector<uint16_t> want(n);
    dequantize_4bit_bf16_ref(in.packed.data(), in.absmax.data(), numel, blocksize, type,
                             want.data());
    Guarded<uint16_t> got(numel, misalign);
    fn_bf16(in.packed.data(), in.absmax.data(), numel, blocksize, type, got.data());
    const std::string what = params(numel, blocksize, type, "bf16") +
                             " misalign=" + std::to_string(misalign);
    expect_identical(got.data(), want, in, numel, blocksize, what);
    std::string where;
    EXPECT_TRUE(got.sentinels_intact(&where)) << what << ": " << where;
  }
}

#define SKIP_WITHOUT_AVX2()                                           \
  do {                                                                \
    if (!cpu_has_avx2()) GTEST_SKIP() << "CPU lacks AVX2/FMA";        \
  } while (0)

TEST(Quant4Avx2, MatchesRefEveryShapeBlocksizeType) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(kSeed);
  for (int64_t numel : kNumels) {
    for (int32_t bs : kBlocksizes) {
      for (QuantType type : kTypes) {
        // One element off a 64-byte boundary for odd cases: the kernel must not assume alignment.
        check_case(rng, numel, bs, type, numel % 2 ? 1 : 0, dequantize_4bit_avx2,
                   dequantize_4bit_bf16_avx2);
      }
    }
  }
}

// Every code against every special absmax, deterministically (the random cases above may miss
// a pair): inf * +-0 is NaN, a NaN absmax keeps its payload in fp32 (bf16: 0x7fc0), ties round
// to even, FP4 code 8 is -0.0 * absmax.
TEST(Quant4Avx2, MatchesRefEveryCodeWithSpecialAbsmax) {
  SKIP_WITHOUT_AVX2();
  const uint32_t special_bits[] = {0x7f800000u, 0xff800000u, 0x7fc00000u, 0x7fffffffu,
                                   0xffff8000u, 0x7f800001u, 0x00000000u, 0x80000000u,
                                   0x00000001u, 0x7f7fffffu, 0x3f808000u, 0x3f818000u};
  for (int32_t bs : {32, 64}) {
    const int64_t numel = bs * static_cast<int64_t>(std::size(special_bits));
    Inputs in;
    in.packed.resize(static_cast<size_t>(packed_nbytes(numel)));
    for (size_t j = 0; j < in.packed.size(); ++j) {
      // bytes 0x01, 0x23, ..., 0xef, then 0x10, 0x32, ..., 0xfe: every code in both nibbles
      const size_t k = j % 8;
      const bool swap = (j / 8) % 2 == 1;
      const size_t hi = swap ? 2 * k + 1 : 2 * k;
      const size_t lo = swap ? 2 * k : 2 * k + 1;
      in.packed[j] = static_cast<uint8_t>(hi << 4 | lo);
    }
    for (uint32_t bits : special_bits) in.absmax.push_back(bits_to_float(bits));
    for (QuantType type : kTypes) {
      const size_t n = static_cast<size_t>(numel);
      std::vector<float> want(n), got(n);
      dequantize_4bit_ref(in.packed.data(), in.absmax.data(), numel, bs, type, want.data());
      dequantize_4bit_avx2(in.packed.data(), in.absmax.data(), numel, bs, type, got.data());
      expect_identical(got.data(), want, in, numel, bs, params(numel, bs, type, "fp32"));
      std::vector<uint16_t> want16(n), got16(n);
      dequantize_4bit_bf16_ref(in.packed.data(), in.absmax.data(), numel, bs, type,
                               want16.data());
      dequantize_4bit_bf16_avx2(in.packed.data(), in.absmax.data(), numel, bs, type,
                                got16.data());
      expect_identical(got16.data(), want16, in, numel, bs, params(numel, bs, type, "bf16"));
    }
  }
}

// Even blocksizes that are not powers of two: a block still starts on a byte boundary, and
// blocks that are not a multiple of 16 elements end in the scalar tail.
TEST(Quant4Avx2, MatchesRefNonPowerOfTwoBlocksizes) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(kSeed + 1);
  for (int32_t bs : {34, 48, 50, 96, 100, 1000, 4094}) {
    for (int64_t numel : {int64_t{1}, int64_t{33}, int64_t{1001}, int64_t{3 * 4096 + 17}}) {
      for (QuantType type : kTypes) {
        check_case(rng, numel, bs, type, 0, dequantize_4bit_avx2, dequantize_4bit_bf16_avx2);
      }
    }
  }
}

// Outputs of 8 MiB and more take the non-temporal store path when aligned; check it and the
// unaligned fallback at the same size, with a partial odd last block after the stream.
TEST(Quant4Avx2, MatchesRefLargeStreamingAndUnaligned) {
  SKIP_WITHOUT_AVX2();
  std::mt19937 rng(kSeed + 2);
  const int64_t numel = (int64_t{1} << 22) + 17;  // 16 MiB fp32, 8 MiB bf16, odd
  for (int32_t bs : {64, 4096}) {
    for (size_t misalign : {size_t{0}, size_t{1}}) {
      check_case(rng, numel, bs, QuantType::nf4, misalign, dequantize_4bit_avx2,
                 dequantize_4bit_bf16_avx2);
    }
  }
}

TEST(Quant4Cpu, DispatchMatchesRef) {
  std::mt19937 rng(kSeed + 3);
  for (int64_t numel : {int64_t{1}, int64_t{7}, int64_t{129}, int64_t{4097}}) {
    for (int32_t bs : {32, 64, 4096}) {
      for (QuantType type : kTypes) {
        check_case(rng, numel, bs, type, 0, dequantize_4bit_cpu, dequantize_4bit_bf16_cpu);
      }
    }
  }
}

// The sign of a decoded zero, checked with std::signbit (== cannot tell -0.0 from +0.0): FP4
// code 8 is -0.0 * absmax, as bitsandbytes' CUDA kernel decodes it; FP4 code 0 and NF4 code 7
// are +0.0. Absmax 0 included (-0.0 * 0 is still -0.0); three full blocks reach the SIMD body,
// the odd partial last block the scalar rest and the final half byte.
using DequantizeF32 = void (*)(const uint8_t*, const float*, int64_t, int32_t, QuantType, float*);
using DequantizeBf16 = void (*)(const uint8_t*, const float*, int64_t, int32_t, QuantType,
                                uint16_t*);

void check_zero_signs(const char* path, DequantizeF32 fn_f32, DequantizeBf16 fn_bf16) {
  constexpr int32_t bs = 32;
  std::vector<uint8_t> codes;  // [numel]
  for (int i = 0; i < 3 * bs; ++i) codes.push_back(static_cast<uint8_t>(i % 16));
  for (uint8_t c : {8, 0, 7, 8, 8}) codes.push_back(c);
  const int64_t numel = static_cast<int64_t>(codes.size());  // 101
  const std::vector<float> absmax = {1.0f, 2.5f, 0.0f, kAbsmaxFloor};  // [blocks]
  std::vector<uint8_t> packed(static_cast<size_t>(packed_nbytes(numel)), 0);
  for (size_t i = 0; i < codes.size(); ++i)
    packed[i / 2] |= static_cast<uint8_t>(i % 2 ? codes[i] : codes[i] << 4);
  for (QuantType type : kTypes) {
    std::vector<float> f32(codes.size());
    std::vector<uint16_t> b16(codes.size());
    fn_f32(packed.data(), absmax.data(), numel, bs, type, f32.data());
    fn_bf16(packed.data(), absmax.data(), numel, bs, type, b16.data());
    for (size_t i = 0; i < codes.size(); ++i) {
      const uint8_t c = codes[i];
      const bool negative = type == QuantType::fp4 && c == 8;
      const bool positive = type == QuantType::fp4 ? c == 0 : c == 7;
      if (!negative && !positive) continue;
      const std::string what = std::string(path) + " " + type_name(type) + " index=" +
                               std::to_string(i) + " code=" + std::to_string(c) +
                               " absmax=" + std::to_string(absmax[i / bs]);
      EXPECT_EQ(f32[i], 0.0f) << what << " fp32";
      EXPECT_EQ(std::signbit(f32[i]), negative) << what << " fp32 bits=0x" << std::hex
                                                << float_to_bits(f32[i]);
      EXPECT_EQ(b16[i], negative ? 0x8000u : 0x0000u) << what << " bf16";
    }
  }
}

TEST(Quant4Ref, ZeroSigns) {
  check_zero_signs("ref", dequantize_4bit_ref, dequantize_4bit_bf16_ref);
}

TEST(Quant4Avx2, ZeroSigns) {
  SKIP_WITHOUT_AVX2();
  check_zero_signs("avx2", dequantize_4bit_avx2, dequantize_4bit_bf16_avx2);
}

TEST(Quant4Cpu, ZeroSigns) {
  check_zero_signs("cpu", dequantize_4bit_cpu, dequantize_4bit_bf16_cpu);
}

TEST(Quant4Cpu, ZeroNumelWritesNothing) {
  const uint8_t packed[1] = {0x12};
  const float absmax[1] = {1.0f};
  Guarded<float> f32(0, 0);
  Guarded<uint16_t> bf16(0, 0);
  dequantize_4bit_cpu(packed, absmax, 0, 64, QuantType::nf4, f32.data());
  dequantize_4bit_bf16_cpu(packed, absmax, 0, 64, QuantType::nf4, bf16.data());
  std::string where;
  EXPECT_TRUE(f32.sentinels_intact(&where)) << "numel=0 fp32: " << where;
  EXPECT_TRUE(bf16.sentinels_intact(&where)) << "numel=0 bf16: " << where;
}

TEST(Quant4Cpu, RejectsBadArguments) {
  const uint8_t packed[64] = {};
  const float absmax[4] = {1.0f, 1.0f, 1.0f, 1.0f};
  float out[128];
  uint16_t out16[128];
  for (int32_t bs : {0, -64, 16, 31, 33, 63, 4097, 8192}) {
    EXPECT_THROW(dequantize_4bit_cpu(packed, absmax, 128, bs, QuantType::nf4, out),
                 std::invalid_argument)
        << "blocksize=" << bs;
    EXPECT_THROW(dequantize_4bit_bf16_cpu(packed, absmax, 128, bs, QuantType::nf4, out16),
                 std::invalid_argument)
        << "blocksize=" << bs;
  }
  EXPECT_THROW(dequantize_4bit_cpu(packed, absmax, -1, 64, QuantType::nf4, out),
               std::invalid_argument);
  EXPECT_THROW(dequantize_4bit_cpu(packed, absmax, 128, 64, static_cast<QuantType>(7), out),
               std::invalid_argument);
  try {
    dequantize_4bit_bf16_cpu(packed, absmax, 128, 49, QuantType::fp4, out16);
    ADD_FAILURE() << "blocksize=49 accepted";
  } catch (const std::invalid_argument& e) {
    // The message names the function and the offending value.
    const std::string what = e.what();
    EXPECT_NE(what.find("dequantize_4bit_bf16_cpu"), std::string::npos) << what;
    EXPECT_NE(what.find("49"), std::string::npos) << what;
  }
  if (cpu_has_avx2()) {
    EXPECT_THROW(dequantize_4bit_avx2(packed, absmax, 128, 33, QuantType::nf4, out),
                 std::invalid_argument);
    EXPECT_THROW(dequantize_4bit_bf16_avx2(packed, absmax, 128, 64, static_cast<QuantType>(-1),
                                           out16),
                 std::invalid_argument);
  }
}

// Half the widest gap between neighbouring codes: the worst a nearest-code rounding can do.
float max_half_gap(QuantType type) {
  const Quant4Traits t = quant4_traits(type);
  float gap = 0.0f;
  for (int k = 0; k + 1 < 16; ++k) {
    gap = std::max(gap, t.code[t.order[k + 1]] - t.code[t.order[k]]);
  }
  return gap / 2;
}

// A sanity property of the reference (not a bitsandbytes check, the reference tests do that):
// |x - dequantize(quantize(x))| <= absmax_b * max_gap/2, up to the few roundings of x / absmax.
TEST(Quant4Ref, RoundTripErrorWithinHalfCodeGap) {
  // x / absmax and code * absmax each round once: a relative 2^-22 covers both with margin.
  constexpr float kRoundingSlack = 0x1p-22f;
  std::mt19937 rng(kSeed + 4);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int64_t numel :
       {int64_t{1}, int64_t{7}, int64_t{65}, int64_t{4097}, int64_t{3 * 4096 + 17}}) {
    for (int32_t bs : kBlocksizes) {
      for (QuantType type : kTypes) {
        std::vector<float> x(static_cast<size_t>(numel));
        for (auto& v : x) v = normal(rng);
        std::vector<uint8_t> packed(static_cast<size_t>(packed_nbytes(numel)));
        std::vector<float> absmax(static_cast<size_t>(num_blocks(numel, bs)));
        quantize_4bit_ref(x.data(), numel, bs, type, packed.data(), absmax.data());
        std::vector<float> y(x.size());
        dequantize_4bit_ref(packed.data(), absmax.data(), numel, bs, type, y.data());
        const float half_gap = max_half_gap(type);
        for (int64_t i = 0; i < numel; ++i) {
          const float am = absmax[static_cast<size_t>(i / bs)];
          const float err = std::fabs(x[i] - y[i]);
          const float bound = am * half_gap * (1.0f + kRoundingSlack) + am * kRoundingSlack;
          if (!(err <= bound)) {
            ADD_FAILURE() << params(numel, bs, type, "fp32") << " index=" << i << " x=" << x[i]
                          << " y=" << y[i] << " absmax=" << am << " err=" << err
                          << " bound=" << bound;
            break;
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace qlora::kernels
