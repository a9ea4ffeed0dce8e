// The decoder block's small ops as fused autograd functions: forward and backward each one pass
// over memory (fused_rows.h, parallel over rows with at::parallel_for), in fp32 or bf16, with
// transformers' op-by-op rounding (the formulas are in fused_rows.h):
//   rmsnorm:      y = norm(x) * w  (LlamaRMSNorm; Gemma3RMSNorm's (1 + w); fp32 w of
//                 upcast_layernorm), saving x and rstd [rows] fp32
//   add+rmsnorm:  hidden = x + a, y = norm(hidden) -> (hidden, y), saving hidden and rstd
//   rope:         x [B, T, n, D] -> x * cos + rotate_half(x) * sin, same layout, saving cos / sin
//   glu:          act(gate) * up, act = silu or gelu (tanh form), saving gate and up
// Norm weights, cos and sin get no gradient: a norm weight that requires grad is rejected.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/custom_function.h>

#include <optional>
#include <utility>

#include "model/fused_rows.h"

namespace qlora::model {

// Whether the fused ops take tensors of this dtype (fp32, bf16; fp16 runs the ATen sequence).
bool fused_ops_support(at::ScalarType dtype);

// x [..., n] fp32 or bf16; weight [n] in x's dtype or fp32 (upcast_layernorm), not requiring
// grad. gemma: multiply by (1 + w) in fp32 (Gemma3RMSNorm).
at::Tensor fused_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool gemma);
// hidden = x + a (same shape and dtype), y = fused_rms_norm(hidden) -> (hidden, y).
std::pair<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& a,
                                                     const at::Tensor& weight, double eps,
                                                     bool gemma);
// x [B, T, n, D] (contiguous; the projection's view before the transpose); cos / sin [B or 1, T, D]
// in x's dtype -> [B, T, n, D] contiguous (transpose(1, 2) gives attention's [B, n, T, D]).
at::Tensor fused_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
// gate, up [..., F] same shape and dtype -> act(gate) * up.
at::Tensor fused_glu(const at::Tensor& gate, const at::Tensor& up, fused::GluAct act);

struct FusedRmsNorm : public torch::autograd::Function<FusedRmsNorm> {
  // residual: nullopt for a plain norm (output {y}; an undefined tensor would be an autograd
  // input), else {hidden, y}.
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& x,
                                                const std::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps, bool gemma);
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs);
};

struct FusedRope : public torch::autograd::Function<FusedRope> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& cos, const at::Tensor& sin);
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs);
};

struct FusedGlu : public torch::autograd::Function<FusedGlu> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& gate,
                            const at::Tensor& up, int64_t act);
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs);
};

}  // namespace qlora::model
