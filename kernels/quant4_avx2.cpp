// AVX2 4-bit dequantize, bit-identical to dequantize_4bit_ref / dequantize_4bit_bf16_ref:
//   y_i = code[q_i] * absmax[i / bs]   (one fp32 multiply, never fused), bf16 = RNE(y_i)
// Within a block y_i takes only 16 values, so each block first computes its 16 outputs
// t[k] = code[k] * absmax (the very multiply of the reference, then its bf16 rounding) and the
// elements become table lookups: fp32 by two 8-entry permutes blended on bit 3 of the code,
// bf16 by two byte shuffles (low and high byte of each bf16 value). Lookups move bits, so FP4
// code 8 keeps the -0.0 of its product, as in the reference.
// This file alone is compiled with -mavx2 -mfma -ffp-contract=off; its functions may only be
// reached after cpu_has_avx2() (quant4_cpu.cpp). It therefore calls no inline function with
// external linkage: not std::string (errors are thrown by quant4_cpu.cpp), not num_blocks or
// float_to_bf16_bits from the headers. Unoptimized builds would emit AVX-encoded copies of those
// here, and the linker may keep such a copy for every other caller, on CPUs without AVX too.
#include <immintrin.h>

#include <cfloat>
#include <cstddef>
#include <cstdint>

#include "quant4_check.h"
#include "quant4_cpu.h"

namespace qlora::kernels {
namespace {

// An output this large would mostly leave this CPU's caches (1 MiB L2 per core, 32 MiB L3
// shared by every core and rank) before the GEMM that reads it, so it is written with
// non-temporal stores: they skip the read-for-ownership of every output line, which is nearly
// half the memory traffic of an fp32 dequantize. Smaller outputs use ordinary stores and stay
// cached for their consumer. (Measured in bench/README.md.)
constexpr size_t kStreamMinNbytes = size_t{8} << 20;

const float* code_table(QuantType type) {
  if (type == QuantType::nf4) {
    return kNF4Code;
  } else if (type == QuantType::fp4) {
    return kFP4Code;
  } else {
    detail::throw_bad_quant_type("dequantize_4bit_avx2", type);
  }
}

// Packed bytes -> nibbles in element order: byte k holds element 2k in its HIGH nibble.
// b: 8 bytes (low half) -> 16 nibbles, one per byte, elements 0..15.
inline __m128i nibbles16(__m128i b) {
  const __m128i mask = _mm_set1_epi8(0x0f);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
  const __m128i lo = _mm_and_si128(b, mask);
  return _mm_unpacklo_epi8(hi, lo);
}

template <bool kStream>
inline void store256(void* out, __m256i v) {
  if constexpr (kStream) {
    _mm256_stream_si256(static_cast<__m256i*>(out), v);
  } else {
    _mm256_storeu_si256(static_cast<__m256i*>(out), v);
  }
}

// ---- fp32 -------------------------------------------------------------------------------------

// A block's 16 outputs code[k] * absmax as two registers: k = 0..7 and k = 8..15.
struct Fp32Table {
  __m256 lo;
  __m256 hi;
};

inline Fp32Table fp32_table(__m256 code_lo, __m256 code_hi, float am) {
  const __m256 scale = _mm256_set1_ps(am);
  return {_mm256_mul_ps(code_lo, scale), _mm256_mul_ps(code_hi, scale)};
}

// 8 nibbles (bytes 0..7 of n) -> t[q]. permutevar8x32 uses only the low 3 bits of q; bit 3,
// moved to the sign bit, picks the half.
inline __m256i lookup8(const Fp32Table& t, __m128i n) {
  const __m256i q = _mm256_cvtepu8_epi32(n);
  const __m256 lo = _mm256_permutevar8x32_ps(t.lo, q);
  const __m256 hi = _mm256_permutevar8x32_ps(t.hi, q);
  return _mm256_castps_si256(
      _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(q, 28))));
}

// packed[0..8) -> out[0..16)
template <bool kStream>
inline void store16(const Fp32Table& t, const uint8_t* packed, float* out) {
  const __m128i n = nibbles16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed)));
  store256<kStream>(out, lookup8(t, n));
  store256<kStream>(out + 8, lookup8(t, _mm_srli_si128(n, 8)));
}

// packed[0..16) -> out[0..32)
template <bool kStream>
inline void store32(const Fp32Table& t, const uint8_t* packed, float* out) {
  store16<kStream>(t, packed, out);
  store16<kStream>(t, packed + 8, out + 16);
}

// ---- bf16 -------------------------------------------------------------------------------------

// Round to nearest even, bf16 bits in the HIGH half of each 32-bit lane (the byte shuffles
// that follow pick them there, so no shift is needed): + 0x7fff, + 1 more when the kept lsb
// (bit 16) is set. Exactly float_to_bf16_bits for every lane that is not NaN.
inline __m256i bf16_round_high(__m256i u) {
  const __m256i lsb_set = _mm256_cmpeq_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x10000)),
                                             _mm256_set1_epi32(0x10000));
  return _mm256_sub_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb_set);
}

// float_to_bf16_bits on 8 lanes, NaN included (every NaN -> 0x7fc0, whatever its sign and
// payload), bits in the HIGH half of each lane.
inline __m256i bf16_bits_high(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i rounded = bf16_round_high(u);
  // |u| > +inf as signed ints: both sides are non-negative, so the signed compare is exact.
  const __m256i is_nan = _mm256_cmpgt_epi32(
      _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc00000), is_nan);
}

// A block's 16 bf16 outputs as two byte tables, each in both 128-bit lanes (vpshufb looks up
// within a lane): the low bytes of t[0..15] and the high bytes of t[0..15].
struct Bf16Table {
  __m256i lo_bytes;
  __m256i hi_bytes;
};

inline Bf16Table bf16_table(__m256 code_lo, __m256 code_hi, float am) {
  const __m256 scale = _mm256_set1_ps(am);
  const __m256 t_lo = _mm256_mul_ps(code_lo, scale);
  const __m256 t_hi = _mm256_mul_ps(code_hi, scale);
  // t[0..3 | 4..7] and t[8..11 | 12..15], bf16 bits in bytes 2 (low) and 3 (high) of each lane.
  // The code is finite, so a product can only be NaN when absmax is NaN or +-inf (inf * 0):
  // a finite absmax (false for NaN) skips the NaN handling.
  __m256i a, b;
  if (am >= -FLT_MAX && am <= FLT_MAX) {
    a = bf16_round_high(_mm256_castps_si256(t_lo));
    b = bf16_round_high(_mm256_castps_si256(t_hi));
  } else {
    a = bf16_bits_high(t_lo);
    b = bf16_bits_high(t_hi);
  }
  // Gather per lane into dwords: a -> [lo bytes, -, hi bytes, -], b -> [-, lo bytes, -, hi bytes]
  // (-1 zeroes a byte), so that a | b = lane 0: [L0..3, L8..11, H0..3, H8..11],
  //                                     lane 1: [L4..7, L12..15, H4..7, H12..15].
  const __m256i pick_a = _mm256_setr_epi8(2, 6, 10, 14, -1, -1, -1, -1, 3, 7, 11, 15, -1, -1, -1,
                                          -1, 2, 6, 10, 14, -1, -1, -1, -1, 3, 7, 11, 15, -1, -1,
                                          -1, -1);
  const __m256i pick_b = _mm256_setr_epi8(-1, -1, -1, -1, 2, 6, 10, 14, -1, -1, -1, -1, 3, 7, 11,
                                          15, -1, -1, -1, -1, 2, 6, 10, 14, -1, -1, -1, -1, 3, 7,
                                          11, 15);
  const __m256i ab =
      _mm256_or_si256(_mm256_shuffle_epi8(a, pick_a), _mm256_shuffle_epi8(b, pick_b));
  // dwords of ab: 0 = L0..3, 1 = L8..11, 2 = H0..3, 3 = H8..11, 4 = L4..7, 5 = L12..15, ...
  return {_mm256_permutevar8x32_epi32(ab, _mm256_setr_epi32(0, 4, 1, 5, 0, 4, 1, 5)),
          _mm256_permutevar8x32_epi32(ab, _mm256_setr_epi32(2, 6, 3, 7, 2, 6, 3, 7))};
}

// packed[0..16) -> out[0..32). The nibbles are laid out as lane 0: elements 0..7, 16..23 and
// lane 1: elements 8..15, 24..31, so that the in-lane unpacks below emit elements 0..15 and
// 16..31 as two contiguous registers without a cross-lane fix-up.
template <bool kStream>
inline void store32(const Bf16Table& t, const uint8_t* packed, uint16_t* out) {
  const __m256i raw = _mm256_castsi128_si256(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed)));
  // byte dwords 0..3 -> lane 0 low 8 bytes: dwords 0, 2; lane 1 low 8 bytes: dwords 1, 3
  const __m256i b = _mm256_permutevar8x32_epi32(raw, _mm256_setr_epi32(0, 2, 0, 0, 1, 3, 0, 0));
  const __m256i mask = _mm256_set1_epi8(0x0f);
  const __m256i n = _mm256_unpacklo_epi8(_mm256_and_si256(_mm256_srli_epi16(b, 4), mask),
                                         _mm256_and_si256(b, mask));
  const __m256i lo = _mm256_shuffle_epi8(t.lo_bytes, n);
  const __m256i hi = _mm256_shuffle_epi8(t.hi_bytes, n);
  store256<kStream>(out, _mm256_unpacklo_epi8(lo, hi));       // elements 0..7 | 8..15
  store256<kStream>(out + 16, _mm256_unpackhi_epi8(lo, hi));  // elements 16..23 | 24..31
}

// packed[0..8) -> out[0..16)
template <bool kStream>
inline void store16(const Bf16Table& t, const uint8_t* packed, uint16_t* out) {
  const __m128i n = nibbles16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed)));
  const __m128i lo = _mm_shuffle_epi8(_mm256_castsi256_si128(t.lo_bytes), n);
  const __m128i hi = _mm_shuffle_epi8(_mm256_castsi256_si128(t.hi_bytes), n);
  store256<kStream>(out, _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi)));
}

// The value for code q (0..15) from the table, for the scalar rest of a block.
inline uint16_t table_value(const Bf16Table& t, unsigned q) {
  alignas(32) uint8_t lo[32];
  alignas(32) uint8_t hi[32];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lo), t.lo_bytes);
  _mm256_store_si256(reinterpret_cast<__m256i*>(hi), t.hi_bytes);
  return static_cast<uint16_t>(lo[q] | hi[q] << 8);
}

// ---- both -------------------------------------------------------------------------------------

inline Fp32Table block_table(Fp32Table*, __m256 code_lo, __m256 code_hi, float am) {
  return fp32_table(code_lo, code_hi, am);
}
inline Bf16Table block_table(Bf16Table*, __m256 code_lo, __m256 code_hi, float am) {
  return bf16_table(code_lo, code_hi, am);
}

inline float table_value(const Fp32Table&, unsigned q, const float* code, float am) {
  return code[q] * am;
}
inline uint16_t table_value(const Bf16Table& t, unsigned q, const float*, float) {
  return table_value(t, q);
}

// Out is float or uint16_t (bf16 bits), Table the matching per-block table. Each block starts
// on a byte boundary (even blocksize), so a block is whole bytes, except a partial odd last
// block whose final element, like any block rest under 16 elements, is done one at a time.
template <bool kStream, typename Table, typename Out>
void dequantize_blocks(const uint8_t* packed, const float* absmax, int64_t numel,
                       int32_t blocksize, const float* code, Out* out) {
  const __m256 code_lo = _mm256_loadu_ps(code);
  const __m256 code_hi = _mm256_loadu_ps(code + 8);
  const int64_t blocks = (numel + blocksize - 1) / blocksize;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * blocksize;
    const int64_t n = numel - begin < blocksize ? numel - begin : blocksize;
    const float am = absmax[b];
    const Table t = block_table(static_cast<Table*>(nullptr), code_lo, code_hi, am);
    const uint8_t* p = packed + begin / 2;  // [(n+1)/2]
    Out* o = out + begin;                   // [n]
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) store32<kStream>(t, p + i / 2, o + i);
    for (; i + 16 <= n; i += 16) store16<kStream>(t, p + i / 2, o + i);
    for (; i < n; ++i) {
      const uint8_t byte = p[i / 2];
      const unsigned q = (i & 1) ? (byte & 0x0f) : (byte >> 4);
      o[i] = table_value(t, q, code, am);
    }
  }
  if constexpr (kStream) _mm_sfence();  // order the weakly-ordered stores before any reader
}

template <typename Table, typename Out>
void dequantize_avx2(const char* fn, const uint8_t* packed, const float* absmax, int64_t numel,
                     int32_t blocksize, QuantType type, Out* out) {
  detail::check_quant4_args(fn, numel, blocksize, type);
  const float* code = code_table(type);
  const size_t out_nbytes = static_cast<size_t>(numel) * sizeof(Out);
  // Streaming needs every 16-element store group 32-byte aligned: out itself, and every block
  // start (blocksize * sizeof(Out) a multiple of 32 also means no scalar rest inside a block).
  const bool aligned = reinterpret_cast<uintptr_t>(out) % 32 == 0 &&
                       (static_cast<size_t>(blocksize) * sizeof(Out)) % 32 == 0;
  if (aligned && out_nbytes >= kStreamMinNbytes) {
    dequantize_blocks<true, Table>(packed, absmax, numel, blocksize, code, out);
  } else {
    dequantize_blocks<false, Table>(packed, absmax, numel, blocksize, code, out);
  }
}

}  // namespace

void dequantize_4bit_avx2(const uint8_t* packed, const float* absmax, int64_t numel,
                          int32_t blocksize, QuantType type, float* out) {
  dequantize_avx2<Fp32Table>("dequantize_4bit_avx2", packed, absmax, numel, blocksize, type,
                             out);
}

void dequantize_4bit_bf16_avx2(const uint8_t* packed, const float* absmax, int64_t numel,
                               int32_t blocksize, QuantType type, uint16_t* out) {
  dequantize_avx2<Bf16Table>("dequantize_4bit_bf16_avx2", packed, absmax, numel, blocksize,
                             type, out);
}

}  // namespace qlora::kernels
