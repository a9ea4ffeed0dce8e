// FP8 and MXFP4 checkpoints, dequantized on load (then quantized to 4-bit like any float weight).
//   fp8 (transformers' fine-grained FP8): `M.weight` float8_e4m3fn [out, in] and
//        `M.weight_scale_inv` [ceil(out/bn), ceil(in/bk)] (or [] when weight_block_size is null):
//        W[i, j] = float(q[i, j]) * s[i / bn, j / bk]                    (partial last blocks)
//   mxfp4 (OCP MX E2M1, kernels/mxfp4_format.h): `M.weight_blocks` uint8 [out, in/32, 16] and
//        `M.weight_scales` uint8 [out, in/32]. transformers stores MXFP4 only for GPT-OSS experts
//        (`<param>_blocks` / `<param>_scales`); for a dense linear we take the same convention on
//        the parameter `weight`, with no transpose (GPT-OSS transposes its expert layout only):
//        W[o, 32 g + 2 k]     = ldexp(E2M1[b[o, g, k] & 15], e[o, g] - 127)
//        W[o, 32 g + 2 k + 1] = ldexp(E2M1[b[o, g, k] >> 4], e[o, g] - 127)
// Each value is one fp32 product (ldexp for MXFP4, exact but for overflow), rounded once to the
// model's dtype: what transformers 5.23's dequantizing loaders compute (Fp8Dequantize,
// _convert_moe_packed_tensors). Their E8M0 byte 255 differs: FP8 uint8 scales read it as
// exp2(128) = inf (so 0 * inf = NaN), float8_e8m0fnu ones as NaN, MXFP4's torch.ldexp as 2^128.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "io/hf_config.h"
#include "io/safetensors.h"

namespace qlora::quant {

// What a checkpoint's quantization_config says, checked.
struct DequantFormat {
  io::QuantMethod method = io::QuantMethod::none;  // fp8 or mxfp4
  // fp8: weight_block_size [rows, cols]; both 0 when null (one scale per tensor).
  int64_t block_rows = 0;
  int64_t block_cols = 0;
  bool ue8m0_scales = false;  // fp8 scale_fmt "ue8m0": scales are E8M0 bytes
  // "fp8 (float8_e4m3fn, block 128x128, fp32 scales)", "mxfp4 (E2M1, blocks of 32, E8M0 scales)"
  std::string describe() const;
};

// Reads quantization_config of an fp8 or mxfp4 checkpoint and refuses, naming `path` and the
// key, what cannot be honoured: a weight_block_size that is not two positive integers, an
// activation_scheme other than dynamic/static (static only adds activation scales, which a
// dequantized model does not use), fmt other than e4m3, scale_fmt other than float/ue8m0,
// modules_to_convert (FP8 embeddings), and any key we do not know. std::invalid_argument.
DequantFormat dequant_format_from(const io::QuantizationConfig& quantization,
                                  const std::string& path);

// How one block linear weight (`M.weight`, [out, in] from config.json) is stored.
struct DequantSource {
  bool plain = true;                 // a float `M.weight` (modules_to_not_convert)
  std::vector<std::string> tensors;  // otherwise the stored tensors it is read from
};

// Decides and checks, before anything is read: every tensor the weight is read from present,
// with its dtype and shape. A weight is dequantized when its companion (`M.weight_scale_inv`,
// `M.weight_blocks`) is stored, as transformers' dequantizing loader decides; a plain one is left
// to the caller's float checks. Throws std::invalid_argument "tensor 'X' ..." (the caller prefixes
// the directory) naming the expected and actual dtype or shape.
DequantSource dequant_source_check(const DequantFormat& format, const std::string& weight_name,
                                   const std::vector<int64_t>& shape,
                                   const std::function<const io::TensorInfo*(const std::string&)>& find);

// The weight [out, in] in `dtype` (float32, bfloat16 or float16) from the tensors
// dequant_source_check listed, read through `get`.
at::Tensor dequant_read(const DequantFormat& format, const std::string& weight_name,
                        const std::vector<int64_t>& shape, at::ScalarType dtype,
                        const std::function<at::Tensor(const std::string&)>& get);

// The formulas above on tensors. fp8: weight Float8_e4m3fn [out, in]; scale_inv fp32 (bf16,
// fp16), Float8_e8m0fnu or uint8 E8M0 bytes, [ceil(out/block_rows), ceil(in/block_cols)], or one
// element when block_rows == 0. mxfp4: blocks uint8 [out, G, 16], scales uint8 [out, G].
at::Tensor fp8_dequantize(const at::Tensor& weight, const at::Tensor& scale_inv,
                          int64_t block_rows, int64_t block_cols, at::ScalarType dtype);
at::Tensor mxfp4_dequantize(const at::Tensor& blocks, const at::Tensor& scales,
                            at::ScalarType dtype);

}  // namespace qlora::quant
