// The one definition of bitsandbytes' 4-bit formats: NF4 and FP4 code tables, the bucket
// bounds that quantization compares against, the packing rule (two codes per byte, FIRST
// element in the HIGH nibble) and the block rules. Shared by C++ and CUDA; torch-free.
// Values are the float32 numbers bitsandbytes 0.50 uses (bitsandbytes.functional.get_4bit_type
// and backends/default/ops.py), written as hex floats so no decimal rounding can creep in.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define QLORA_HD __host__ __device__
#else
#define QLORA_HD
#endif

namespace qlora::kernels {

enum class QuantType : int32_t { nf4 = 0, fp4 = 1 };

constexpr int32_t kMinBlocksize = 32;
constexpr int32_t kMaxBlocksize = 4096;
constexpr int32_t kNestedBlocksize = 256;  // double quantization of absmax: blocks of 256
constexpr float kAbsmaxFloor = 1e-38f;      // bitsandbytes clamps the divisor to this

// NF4 code, index 0..15. Zero is index 7. Sorted ascending.
constexpr float kNF4Code[16] = {
    -0x1p+0f,         -0x1.647362p-1f, -0x1.0cd66p-1f,  -0x1.94654p-2f,
    -0x1.23449ap-2f,  -0x1.7a6a7ep-3f, -0x1.74f0e2p-4f, 0x0p+0f,
    0x1.45f5fep-4f,   0x1.4995c6p-3f,  0x1.f809bap-3f,  0x1.5a0674p-2f,
    0x1.c3497p-2f,    0x1.200f56p-1f,  0x1.722766p-1f,  0x1p+0f};

// bitsandbytes FP4 (not OCP E2M1): [0, 0.0625, 8, 12, 4, 6, 2, 3, -0, ...] / 12, bit 3 = sign.
// Index 8 is -0.0: we decode as bitsandbytes' CUDA kernel does (lut[code & 7], negated when bit
// 3 is set, times absmax), so code 8 gives -0.0 * absmax. Its CPU kernels do not agree with each
// other (AVX-512: +0.0, AVX2: -0.0), so they cannot be the rule. The quant_map bitsandbytes
// stores in checkpoints is built from Python ints and has +0.0 there; quant::code_table writes
// that one, and a quant_map is compared by value, where the two zeros are equal.
constexpr float kFP4Code[16] = {
    0x0p+0f,         0x1.555556p-8f,  0x1.555556p-1f,  0x1p+0f,
    0x1.555556p-2f,  0x1p-1f,         0x1.555556p-3f,  0x1p-2f,
    -0x0p+0f,        -0x1.555556p-8f, -0x1.555556p-1f, -0x1p+0f,
    -0x1.555556p-2f, -0x1p-1f,        -0x1.555556p-3f, -0x1p-2f};

// Quantization: scaled value v in [-1, 1] goes to bucket k = #{bounds < v} (so a value exactly
// on a bound takes the lower bucket; NaN takes bucket 15), then code = order[k]. Bounds are the
// float32 midpoints (c[k] + c[k+1]) / 2 of the code sorted ascending.
constexpr float kNF4Bounds[15] = {
    -0x1.b239bp-1f,  -0x1.38a4ep-1f,  -0x1.d709p-2f,   -0x1.5bd4ecp-2f, -0x1.e079d8p-3f,
    -0x1.1a7178p-3f, -0x1.74f0e2p-5f, 0x1.45f5fep-5f,  0x1.ec90c4p-4f,  0x1.a0cfcp-3f,
    0x1.2b05a8p-2f,  0x1.8ea7f2p-2f,  0x1.00da08p-1f,  0x1.491b5ep-1f,  0x1.b913b4p-1f};
constexpr uint8_t kNF4Order[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

constexpr float kFP4Bounds[15] = {
    -0x1.aaaaacp-1f, -0x1.2aaaacp-1f, -0x1.aaaaacp-2f, -0x1.2aaaacp-2f, -0x1.aaaaacp-3f,
    -0x1.6p-4f,      -0x1.555556p-9f, 0x0p+0f,         0x1.555556p-9f,  0x1.6p-4f,
    0x1.aaaaacp-3f,  0x1.2aaaacp-2f,  0x1.aaaaacp-2f,  0x1.2aaaacp-1f,  0x1.aaaaacp-1f};
// Sorted FP4 codes: -1, -2/3, -1/2, -1/3, -1/4, -1/6, -1/192, +0 (index 0), -0 (index 8), ...
// (bitsandbytes' CPU quantizer sorts its quant_map, where both zeros are +0.0, so index 8 takes
// the bucket (0, 1/384]; the sign of index 8 in kFP4Code changes no quantized byte.)
constexpr uint8_t kFP4Order[16] = {11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3};

// Per-format traits, so that dispatch is one lookup and not a switch ladder per file.
struct Quant4Traits {
  const float* code;    // [16] value of each code
  const float* bounds;  // [15] ascending bucket bounds
  const uint8_t* order; // [16] bucket -> code
  const char* name;     // "nf4" / "fp4", as bitsandbytes spells it
};

QLORA_HD inline Quant4Traits quant4_traits(QuantType type) {
  if (type == QuantType::nf4) return {kNF4Code, kNF4Bounds, kNF4Order, "nf4"};
  return {kFP4Code, kFP4Bounds, kFP4Order, "fp4"};
}

// Packed bytes for n codes: an odd count is padded with the code of 0.0 in the low nibble.
QLORA_HD constexpr int64_t packed_nbytes(int64_t numel) { return (numel + 1) / 2; }
QLORA_HD constexpr int64_t num_blocks(int64_t numel, int64_t blocksize) {
  return (numel + blocksize - 1) / blocksize;
}
QLORA_HD constexpr bool valid_blocksize(int64_t blocksize) {
  return blocksize >= kMinBlocksize && blocksize <= kMaxBlocksize &&
         (blocksize & (blocksize - 1)) == 0;
}

static_assert(sizeof(kNF4Code) == 16 * sizeof(float), "NF4 code has 16 entries");
static_assert(sizeof(kFP4Bounds) == 15 * sizeof(float), "FP4 has 15 bounds");
static_assert(packed_nbytes(7) == 4 && packed_nbytes(8) == 4, "two codes per byte, odd padded");

}  // namespace qlora::kernels
