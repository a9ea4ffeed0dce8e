// CPU kernels for 4-bit dequantize: AVX2 (+FMA-free, exact) versions of the *_ref functions and
// a dispatcher that picks AVX2 when the running CPU has it, else the scalar reference.
#pragma once

#include <cstdint>

#include "quant4_format.h"

namespace qlora::kernels {

bool cpu_has_avx2();  // runtime check (cpuid), cached

// Bit-identical to dequantize_4bit_ref / dequantize_4bit_bf16_ref, any numel (odd ones too),
// any valid blocksize; never writes outside out[0..numel).
void dequantize_4bit_avx2(const uint8_t* packed, const float* absmax, int64_t numel,
                          int32_t blocksize, QuantType type, float* out);
void dequantize_4bit_bf16_avx2(const uint8_t* packed, const float* absmax, int64_t numel,
                               int32_t blocksize, QuantType type, uint16_t* out);

// Dispatch: AVX2 when available, else the reference.
void dequantize_4bit_cpu(const uint8_t* packed, const float* absmax, int64_t numel,
                         int32_t blocksize, QuantType type, float* out);
void dequantize_4bit_bf16_cpu(const uint8_t* packed, const float* absmax, int64_t numel,
                              int32_t blocksize, QuantType type, uint16_t* out);

}  // namespace qlora::kernels
