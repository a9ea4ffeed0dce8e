// Scalar reference quantize/dequantize; see quant4_ref.h for the exact rules. Compiled with
// -ffp-contract=off so that no multiply-add is fused: every rounding is the one torch makes.
#include "quant4_ref.h"

#include <algorithm>
#include <cmath>

namespace qlora::kernels {
namespace {

// torch.max over a block propagates NaN.
float block_absmax(const float* x, int64_t n) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    if (std::isnan(a)) return a;
    m = a > m ? a : m;
  }
  return n > 0 ? m : 0.0f;
}

// torch.clamp(v, lo, hi) keeps NaN.
inline float clamp_keep_nan(float v, float lo, float hi) {
  if (std::isnan(v)) return v;
  return v < lo ? lo : (v > hi ? hi : v);
}
inline float floor_keep_nan(float v) { return std::isnan(v) ? v : (v < kAbsmaxFloor ? kAbsmaxFloor : v); }

// torch.bucketize(v, bounds, right=False): number of bounds strictly below v; NaN -> 15.
inline uint8_t bucket4(float v, const float* bounds) {
  if (std::isnan(v)) return 15;
  uint8_t k = 0;
  while (k < 15 && bounds[k] < v) ++k;
  return k;
}

}  // namespace

void quantize_4bit_ref(const float* x, int64_t numel, int32_t blocksize, QuantType type,
                       uint8_t* packed, float* absmax) {
  const Quant4Traits t = quant4_traits(type);
  const int64_t blocks = num_blocks(numel, blocksize);
  const uint8_t zero_code = t.order[bucket4(0.0f, t.bounds)];
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * blocksize;
    const int64_t n = std::min<int64_t>(blocksize, numel - begin);
    const float am = block_absmax(x + begin, n);
    const bool full = n == blocksize;
    absmax[b] = full ? am : floor_keep_nan(am);
    const float inv = 1.0f / floor_keep_nan(am);
    const float div = floor_keep_nan(am);
    for (int64_t i = 0; i < n; ++i) {
      const float s = full ? x[begin + i] * inv : x[begin + i] / div;
      const uint8_t q = t.order[bucket4(clamp_keep_nan(s, -1.0f, 1.0f), t.bounds)];
      const int64_t j = begin + i;
      uint8_t& byte = packed[j >> 1];
      if ((j & 1) == 0) byte = static_cast<uint8_t>(q << 4);
      else byte = static_cast<uint8_t>(byte | q);
    }
  }
  if (numel & 1) packed[numel >> 1] = static_cast<uint8_t>(packed[numel >> 1] | zero_code);
}

void dequantize_4bit_ref(const uint8_t* packed, const float* absmax, int64_t numel,
                         int32_t blocksize, QuantType type, float* out) {
  const float* code = quant4_traits(type).code;
  for (int64_t i = 0; i < numel; ++i) {
    const uint8_t byte = packed[i >> 1];
    const uint8_t q = (i & 1) ? (byte & 0x0f) : (byte >> 4);
    out[i] = code[q] * absmax[i / blocksize];
  }
}

void dequantize_4bit_bf16_ref(const uint8_t* packed, const float* absmax, int64_t numel,
                              int32_t blocksize, QuantType type, uint16_t* out) {
  const float* code = quant4_traits(type).code;
  for (int64_t i = 0; i < numel; ++i) {
    const uint8_t byte = packed[i >> 1];
    const uint8_t q = (i & 1) ? (byte & 0x0f) : (byte >> 4);
    out[i] = float_to_bf16_bits(code[q] * absmax[i / blocksize]);
  }
}

// bitsandbytes' CUDA dQuantize<0>: a binary search over the sorted 256-entry code from the
// middle, then the nearer of the two neighbours by an fp32 midpoint. NaN (also 0 * inf in an
// all-zero block) ends at index 0, as on CUDA.
static int quantize_8bit_nearest(const float* code, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = code[pivot];
  for (int step = 64; step > 0; step >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += step;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= step;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > val) return x > (upper + val) * 0.5f ? upper_pivot : pivot;
  return x < (lower + val) * 0.5f ? lower_pivot : pivot;
}

void quantize_8bit_blockwise_ref(const float* x, int64_t numel, int32_t blocksize,
                                 const float* code, uint8_t* q, float* absmax) {
  const int64_t blocks = num_blocks(numel, blocksize);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * blocksize;
    const int64_t n = std::min<int64_t>(blocksize, numel - begin);
    float am = 0.0f;  // fmaxf, as the CUDA reduction: NaN does not win
    for (int64_t i = 0; i < n; ++i) am = std::fmax(am, std::fabs(x[begin + i]));
    absmax[b] = am;
    const float inv = 1.0f / am;
    for (int64_t i = 0; i < n; ++i)
      q[begin + i] = static_cast<uint8_t>(quantize_8bit_nearest(code, x[begin + i] * inv));
  }
}

void dequantize_8bit_blockwise_ref(const uint8_t* q, const float* absmax, int64_t numel,
                                   int32_t blocksize, const float* code, float* out) {
  for (int64_t i = 0; i < numel; ++i) out[i] = code[q[i]] * absmax[i / blocksize];
}

}  // namespace qlora::kernels
