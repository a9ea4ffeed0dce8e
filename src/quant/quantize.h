// 4-bit quantize / dequantize on torch tensors, bitsandbytes-exact (kernels/quant4_ref.h has the
// rules). Packed codes live in a "storage" tensor whose dtype may be uint8, bf16, fp16 or fp32:
// the bytes are the same in every case ([(n+1)/2] bytes, zero-padded to a whole element, shape
// [nbytes / itemsize, 1]); only the dtype the bytes are viewed as changes (FSDP's rule that quant
// storage equals the compute dtype lets a packed weight shard like any other tensor).
#pragma once

#include <ATen/core/Tensor.h>

#include "quant_state.h"

namespace qlora::quant {

struct Quantized {
  at::Tensor packed;  // storage dtype [nbytes / itemsize, 1]
  QuantState state;
};

struct QuantizeOptions {
  int32_t blocksize = 64;
  QuantType quant_type = QuantType::nf4;
  bool double_quant = false;
  at::ScalarType storage = at::kByte;
};

// Any float dtype in (fp32, bf16, fp16; on any device: computed on the CPU). Throws
// std::invalid_argument for an unsupported blocksize, dtype or storage dtype.
Quantized quantize_4bit(const at::Tensor& weight, const QuantizeOptions& options);

// Back to `dtype` (default: the state's dtype) with the shape of the state, on the packed
// weight's device (through dequantize_4bit_into).
at::Tensor dequantize_4bit(const at::Tensor& packed, const QuantState& state,
                           std::optional<at::ScalarType> dtype = std::nullopt);

// The same into a given contiguous tensor of the state's numel (any shape, dtype fp32, bf16 or
// fp16) on the packed weight's device: lets a caller reuse one buffer instead of paying for fresh
// pages on every call. Dispatches on out's device: the CPU kernels (AVX2 where the CPU has it),
// the CUDA kernels (CUDA builds; std::invalid_argument elsewhere), and for any other device
// dequantize_4bit_torch (bit-identical to the CPU kernels: tests/quant/test_quant.cpp).
void dequantize_4bit_into(const at::Tensor& packed, const QuantState& state, const at::Tensor& out);
void dequantize_4bit_into_cuda(const at::Tensor& packed, const QuantState& state,
                               const at::Tensor& out);

// The same with libtorch ops only (code-table lookup and scale): works on any device, and is the
// second opinion that every kernel is tested against.
at::Tensor dequantize_4bit_torch(const at::Tensor& packed, const QuantState& state,
                                 std::optional<at::ScalarType> dtype = std::nullopt);

// The packed bytes [(n+1)/2 rounded up to the storage itemsize] as uint8, whatever the storage.
at::Tensor packed_bytes(const at::Tensor& packed);
// The same bytes viewed as `storage` ([nbytes / itemsize, 1]), zero-padded to a whole element.
at::Tensor pack_storage(const at::Tensor& bytes, at::ScalarType storage);

// bitsandbytes' quant_map [16] fp32, bit for bit: the kernels' code table with every zero +0.0
// (they decode FP4 code 8 as -0.0), and its signed dynamic map [256] fp32 for the nested absmax
// (nested_quant_map).
at::Tensor code_table(QuantType type);
at::Tensor nested_code_table();

// Storage dtypes by name: uint8, bf16/bfloat16, fp16/float16, fp32/float32.
at::ScalarType storage_dtype_from_name(const std::string& name);

}  // namespace qlora::quant
