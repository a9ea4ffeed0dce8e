// AdamW as torch.optim.adamw._single_tensor_adamw computes it (capturable = False).
#include "dist/adamw.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <stdexcept>

namespace qlora::dist {

AdamWState adamw_state_init(const at::Tensor& param) {
  return {at::zeros_like(param, at::MemoryFormat::Contiguous),
          at::zeros_like(param, at::MemoryFormat::Contiguous)};
}

void adamw_step(at::Tensor& param, const at::Tensor& grad, AdamWState& state, int64_t step,
                double lr, const AdamWOptions& o) {
  if (step < 1) throw std::invalid_argument("adamw_step: step must be >= 1");
  if (param.sizes() != grad.sizes() || param.sizes() != state.exp_avg.sizes())
    throw std::invalid_argument("adamw_step: param, grad and state sizes differ");
  at::AutoGradMode no_grad(false);
  param.mul_(1.0 - lr * o.weight_decay);
  state.exp_avg.lerp_(grad, 1.0 - o.beta1);
  state.exp_avg_sq.mul_(o.beta2).addcmul_(grad, grad, 1.0 - o.beta2);
  const double bias_correction1 = 1.0 - std::pow(o.beta1, static_cast<double>(step));
  const double bias_correction2 = 1.0 - std::pow(o.beta2, static_cast<double>(step));
  const double step_size = lr / bias_correction1;
  const double bias_correction2_sqrt = std::sqrt(bias_correction2);
  const at::Tensor denom = (state.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(o.eps);
  param.addcdiv_(state.exp_avg, denom, -step_size);
}

}  // namespace qlora::dist
