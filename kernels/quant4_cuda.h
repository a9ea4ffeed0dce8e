// CUDA versions of the 4-bit kernels, same arguments as the *_ref functions plus a stream
// (a cudaStream_t passed as void*, nullptr = default stream). Pointers are device pointers.
// Declared always; defined only when the build found nvcc (QLORA_HAVE_CUDA).
#pragma once

#include <cstdint>

#include "quant4_format.h"

namespace qlora::kernels {

void quantize_4bit_cuda(const float* x, int64_t numel, int32_t blocksize, QuantType type,
                        uint8_t* packed, float* absmax, void* stream = nullptr);
void dequantize_4bit_cuda(const uint8_t* packed, const float* absmax, int64_t numel,
                          int32_t blocksize, QuantType type, float* out, void* stream = nullptr);
void dequantize_4bit_bf16_cuda(const uint8_t* packed, const float* absmax, int64_t numel,
                               int32_t blocksize, QuantType type, uint16_t* out,
                               void* stream = nullptr);

// The NCCL library version the build linked (ncclGetVersion; needs no GPU).
int nccl_linked_version();
// NCCL_VERSION_CODE of the headers the build compiled against.
int nccl_header_version();

}  // namespace qlora::kernels
