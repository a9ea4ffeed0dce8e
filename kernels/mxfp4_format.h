// The one definition of the MXFP4 format (OCP Microscaling, as transformers reads it): 4-bit
// E2M1 elements in blocks of 32, two per byte with the FIRST element in the LOW nibble (the
// opposite of bitsandbytes' packing), and one E8M0 scale byte per block: scale = 2^(byte - 127).
// Values are those of transformers' integrations/mxfp4.py FP4_VALUES (exact binary fractions).
// Torch-free.
#pragma once

#include <cstdint>

namespace qlora::kernels {

constexpr int64_t kMxfp4BlockSize = 32;                         // elements per scale
constexpr int64_t kMxfp4BlockBytes = kMxfp4BlockSize / 2;       // packed bytes per block
constexpr int32_t kE8M0Bias = 127;                              // scale = 2^(byte - bias)

// E2M1 code, index 0..15: bit 3 is the sign, bits 2..1 the exponent, bit 0 the mantissa.
constexpr float kE2M1Code[16] = {0x0p+0f,  0x1p-1f,  0x1p+0f,  0x1.8p+0f,  0x1p+1f,  0x1.8p+1f,
                                 0x1p+2f,  0x1.8p+2f, -0x0p+0f, -0x1p-1f, -0x1p+0f, -0x1.8p+0f,
                                 -0x1p+1f, -0x1.8p+1f, -0x1p+2f, -0x1.8p+2f};
static_assert(kMxfp4BlockSize % 2 == 0, "two elements per byte");

}  // namespace qlora::kernels
