// AdamW on this rank's shard of the LoRA master weights (fp32), element for element what
// torch.optim.AdamW (single-tensor path) computes, so the update does not depend on how the
// weights are sharded:
//   p -= lr * wd * p;  m = m + (g - m) * (1 - b1);  v = b2 v + (1 - b2) g^2
//   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace qlora::dist {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

struct AdamWState {
  at::Tensor exp_avg;     // [S] fp32
  at::Tensor exp_avg_sq;  // [S] fp32
};

// Zero moments shaped, typed and placed like `param` (the fp32 shard they belong to).
AdamWState adamw_state_init(const at::Tensor& param);
// One update of `param` (fp32, in place) with `grad` at step `step` (1-based) and rate `lr`.
void adamw_step(at::Tensor& param, const at::Tensor& grad, AdamWState& state, int64_t step,
                double lr, const AdamWOptions& options);

}  // namespace qlora::dist
