// The bitsandbytes tensor set of one quantized weight in a Hugging Face checkpoint (what
// transformers' save_pretrained writes for a Linear4bit and reads back in from_pretrained):
//   X.weight                                   packed, storage dtype [nbytes / itemsize, 1]
//   X.weight.absmax                            fp32 [blocks] (uint8 when double-quantized)
//   X.weight.quant_map                         fp32 [16]
//   X.weight.nested_absmax                     fp32 [ceil(blocks / 256)]   (double quant only)
//   X.weight.nested_quant_map                  fp32 [256]                  (double quant only)
//   X.weight.quant_state.bitsandbytes__nf4     uint8 bytes of JSON (or __fp4)
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "quant/quantize.h"

namespace qlora::quant {

// name -> tensor, nullopt when the checkpoint has no such tensor.
using TensorLookup = std::function<std::optional<at::Tensor>(const std::string& name)>;

// The tensors (full names, in the order transformers writes them) for `weight_name`.
std::vector<std::pair<std::string, at::Tensor>> bnb_checkpoint_tensors(
    const std::string& weight_name, const Quantized& q);

// The quant_state key of `weight_name` if the checkpoint has one (nf4 or fp4), else "".
std::string bnb_quant_state_key(const std::string& weight_name,
                                const std::function<bool(const std::string&)>& contains);

// True for the names of quant-state tensors (everything above except X.weight itself).
bool bnb_is_state_tensor(const std::string& name);

// Reads and cross-checks one quantized weight: the JSON against the tensors (shape vs packed
// bytes, blocks vs absmax, nested sizes). Throws std::invalid_argument naming the tensor and
// both sides of any disagreement.
Quantized bnb_read_quantized(const std::string& weight_name, const TensorLookup& get);

}  // namespace qlora::quant
