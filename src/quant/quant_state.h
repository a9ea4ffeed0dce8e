// QuantState: everything needed to turn packed 4-bit codes back into weights, as bitsandbytes
// defines it (functional.QuantState), plus its packed JSON form used in Hugging Face checkpoints:
//   w[i] = code[q_i] * scale[i / blocksize]
//   scale = absmax (fp32)   or, double quantized,
//   scale[b] = nested_code[absmax_q[b]] * nested_absmax[b / 256] + offset
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "quant4_format.h"

namespace qlora::quant {

using kernels::QuantType;

QuantType quant_type_from_name(const std::string& name);  // "nf4" / "fp4", else throws
const char* quant_type_name(QuantType type);

// Float dtypes by the names torch and bitsandbytes write ("float32", "bfloat16", "float16").
at::ScalarType float_dtype_from_name(const std::string& name);  // throws on anything else
std::string float_dtype_name(at::ScalarType dtype);

struct NestedState {
  at::Tensor absmax;  // fp32 [ceil(blocks / 256)]
  at::Tensor code;    // fp32 [256], the signed dynamic map
  int32_t blocksize = kernels::kNestedBlocksize;
  float offset = 0.0f;  // mean of the first-level absmax, subtracted before quantizing
};

struct QuantState {
  std::vector<int64_t> shape;  // of the original weight
  int32_t blocksize = 64;
  QuantType quant_type = QuantType::nf4;
  at::ScalarType dtype = at::kFloat;  // of the original weight (what dequantize returns by default)
  at::Tensor absmax;                  // fp32 [blocks], or uint8 [blocks] when nested
  at::Tensor code;                    // fp32 [16]: the quant_map
  std::optional<NestedState> nested;

  int64_t numel() const;
  int64_t blocks() const { return kernels::num_blocks(numel(), blocksize); }
  bool is_nested() const { return nested.has_value(); }

  // The fp32 per-block scales [blocks] (decodes the double quantization when nested).
  at::Tensor absmax_fp32() const;

  // Throws std::invalid_argument, naming `where`, when tensors disagree with the fields.
  void validate(const std::string& where) const;
};

// The bytes of bitsandbytes' `quant_state.bitsandbytes__<type>` tensor: UTF-8 JSON written as
// Python's json.dumps writes it, keys quant_type, blocksize, dtype, shape and, when nested,
// nested_blocksize, nested_dtype, nested_offset.
std::string quant_state_json(const QuantState& state);

// The scalar fields parsed back from that JSON (tensors are left empty). Throws
// std::invalid_argument naming `where` on malformed JSON, missing keys or bad values.
QuantState quant_state_from_json(const std::string& json, const std::string& where);

// Python's repr() of a float64: shortest round-trip digits, fixed notation for 1e-4 <= |x| < 1e16.
std::string python_float_repr(double value);

}  // namespace qlora::quant
