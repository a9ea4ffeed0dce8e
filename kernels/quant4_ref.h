// Scalar reference 4-bit and 8-bit blockwise quantization: the ground truth every other kernel
// (AVX2, CUDA, the libtorch fallback) is tested against, and bitsandbytes-exact itself.
//   absmax[b] = max_i |x[b*bs + i]|;  q_i = order[#{bounds < x_i / absmax[b]}]
//   y_i = code[q_i] * absmax[i / bs]
#pragma once

#include <cstdint>

#include "quant4_format.h"

namespace qlora::kernels {

// x: [numel] fp32 -> packed: [(numel+1)/2] (first element in the high nibble), absmax: [blocks].
// Exactly bitsandbytes' quantize_4bit: a full block scales by x * (1 / max(absmax, 1e-38)) and
// stores absmax as it is; the partial last block divides by max(absmax, 1e-38) and stores that.
void quantize_4bit_ref(const float* x, int64_t numel, int32_t blocksize, QuantType type,
                       uint8_t* packed, float* absmax);

// packed: [(numel+1)/2], absmax: [blocks] -> out: [numel]. Every zero keeps the sign of the
// product: FP4 code 8 gives -0.0 * absmax, as bitsandbytes' CUDA kernel (quant4_format.h).
void dequantize_4bit_ref(const uint8_t* packed, const float* absmax, int64_t numel,
                         int32_t blocksize, QuantType type, float* out);
// Same, rounded to bfloat16 (round to nearest even, as torch does); out holds bf16 bit patterns.
void dequantize_4bit_bf16_ref(const uint8_t* packed, const float* absmax, int64_t numel,
                              int32_t blocksize, QuantType type, uint16_t* out);

// 8-bit blockwise with a 256-entry ascending code (double quantization of absmax uses the dynamic
// map, blocksize 256): the nearest code to x * (1 / absmax) exactly as bitsandbytes' CUDA kernel
// finds it. (Its CPU kernel uses a lookup table that is sometimes one code off.)
void quantize_8bit_blockwise_ref(const float* x, int64_t numel, int32_t blocksize,
                                 const float* code,  // [256], ascending
                                 uint8_t* q, float* absmax);
void dequantize_8bit_blockwise_ref(const uint8_t* q, const float* absmax, int64_t numel,
                                   int32_t blocksize, const float* code, float* out);

// float -> bfloat16 bits, round to nearest even, every NaN -> 0x7fc0 (torch's c10::BFloat16 rule).
QLORA_HD inline uint16_t float_to_bf16_bits(float f) {
  union { float f; uint32_t u; } v{f};
  if ((v.u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
  const uint32_t rounding_bias = 0x7fffu + ((v.u >> 16) & 1u);
  return static_cast<uint16_t>((v.u + rounding_bias) >> 16);
}

}  // namespace qlora::kernels
