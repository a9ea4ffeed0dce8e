// The autograd function behind qlora_base_matmul (lora_linear.h), exposed for QLoraLinear and
// for tests that inspect what its graph node keeps:
//   forward:  y[..., out] = x[..., in] @ W^T (+ b),  W = dequantize(packed) in x's dtype, dropped
//   backward: dL/dx = dL/dy @ W (W dequantized again), dL/db = sum of dL/dy; W gets no gradient.
// The node keeps only the packed weight and its quantization state (ctx->saved_data), never a
// dequantized weight, as bitsandbytes' MatMul4Bit does; with a weight source (late binding,
// lora_linear.h) not even those: the source and the weight's shape, asked again in backward.
#pragma once

#include <torch/csrc/autograd/custom_function.h>

#include "lora/lora_linear.h"
#include "quant/quantize.h"

namespace qlora::lora {

struct QLoraBaseMatmul : public torch::autograd::Function<QLoraBaseMatmul> {
  // x [..., in] float; bias [out] in x's dtype, or nullopt (then it is no autograd input: an
  // undefined at::Tensor would be); weight: state shape [out, in] (not an autograd input: it is
  // frozen and only its tensors are saved). source: nullptr, or where backward finds the weight.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const std::optional<at::Tensor>& bias, const quant::Quantized* weight,
                            const std::shared_ptr<const WeightSource>& source = nullptr);
  // One gradient per forward argument: (dL/dx, dL/db, undefined for the weight and source).
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs);
};

}  // namespace qlora::lora
