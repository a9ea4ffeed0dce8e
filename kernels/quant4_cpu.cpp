// CPU dispatch for 4-bit dequantize: the AVX2 kernels when the running CPU has AVX2 and FMA,
// else the scalar reference. Compiled without -mavx2, so nothing here may execute AVX code
// before cpu_has_avx2() has said yes.
#include "quant4_cpu.h"

#include <stdexcept>
#include <string>

#include "quant4_check.h"
#include "quant4_ref.h"

namespace qlora::kernels {

namespace detail {

void check_quant4_args(const char* fn, int64_t numel, int32_t blocksize, QuantType type) {
  if (numel < 0) {
    throw std::invalid_argument(std::string(fn) + ": numel must be >= 0, got " +
                                std::to_string(numel));
  }
  if (blocksize < kMinBlocksize || blocksize > kMaxBlocksize || blocksize % 2 != 0) {
    throw std::invalid_argument(std::string(fn) + ": blocksize must be an even number in [" +
                                std::to_string(kMinBlocksize) + ", " +
                                std::to_string(kMaxBlocksize) +
                                "] (bitsandbytes uses powers of two), got " +
                                std::to_string(blocksize));
  }
  if (type != QuantType::nf4 && type != QuantType::fp4) throw_bad_quant_type(fn, type);
}

void throw_bad_quant_type(const char* fn, QuantType type) {
  throw std::invalid_argument(std::string(fn) + ": quant type must be nf4 (0) or fp4 (1), got " +
                              std::to_string(static_cast<int32_t>(type)));
}

}  // namespace detail

bool cpu_has_avx2() {
  // The AVX2 kernels are compiled with -mavx2 -mfma, so the compiler may emit FMA encodings
  // anywhere in them (never as contractions: -ffp-contract=off); require both.
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}

void dequantize_4bit_cpu(const uint8_t* packed, const float* absmax, int64_t numel,
                         int32_t blocksize, QuantType type, float* out) {
  detail::check_quant4_args("dequantize_4bit_cpu", numel, blocksize, type);
  if (cpu_has_avx2()) {
    dequantize_4bit_avx2(packed, absmax, numel, blocksize, type, out);
  } else {
    dequantize_4bit_ref(packed, absmax, numel, blocksize, type, out);
  }
}

void dequantize_4bit_bf16_cpu(const uint8_t* packed, const float* absmax, int64_t numel,
                              int32_t blocksize, QuantType type, uint16_t* out) {
  detail::check_quant4_args("dequantize_4bit_bf16_cpu", numel, blocksize, type);
  if (cpu_has_avx2()) {
    dequantize_4bit_bf16_avx2(packed, absmax, numel, blocksize, type, out);
  } else {
    dequantize_4bit_bf16_ref(packed, absmax, numel, blocksize, type, out);
  }
}

}  // namespace qlora::kernels
