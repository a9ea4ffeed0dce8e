// Argument checks shared by the CPU and CUDA 4-bit kernels (not by the *_ref functions, whose
// contract is "valid arguments in, exact answer out"). Internal to kernels/.
// Both are defined out of line in quant4_cpu.cpp on purpose: an inline definition would also be
// emitted by the AVX2 translation unit, and the linker could keep that copy for non-AVX2 callers.
#pragma once

#include <cstdint>

#include "quant4_format.h"

namespace qlora::kernels::detail {

// Throws std::invalid_argument naming `fn` and the offending value when numel < 0, blocksize is
// not an even number in [kMinBlocksize, kMaxBlocksize] (a block must start on a byte boundary;
// bitsandbytes itself only uses powers of two), or type is not a QuantType.
void check_quant4_args(const char* fn, int64_t numel, int32_t blocksize, QuantType type);

// The final else of a dispatch on QuantType: throws std::invalid_argument naming fn and type.
[[noreturn]] void throw_bad_quant_type(const char* fn, QuantType type);

}  // namespace qlora::kernels::detail
