// The fused block ops of fused_ops.h: argument checks, the autograd functions, and the
// parallel_for over rows that runs the row kernels of fused_rows.h (variant picked at run time).
#include "model/fused_ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <stdexcept>
#include <string>

#include "quant/tensor_io.h"  // shape_str

namespace qlora::model {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Rows per parallel_for chunk: at least ~16k elements, so that a chunk is worth a thread.
constexpr int64_t kGrainElems = 16384;
int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, n)); }

fused::Elem elem_of(const at::Tensor& t, const char* what) {
  if (t.scalar_type() == at::kFloat) return fused::Elem::f32;
  if (t.scalar_type() == at::kBFloat16) return fused::Elem::bf16;
  throw std::invalid_argument(std::string(what) + ": dtype " + c10::toString(t.scalar_type()) +
                              " is not supported (expected float32 or bfloat16)");
}

void check_cpu(const at::Tensor& t, const char* what) {
  if (!t.device().is_cpu())
    throw std::invalid_argument(std::string(what) + ": tensors must be on the CPU, not " +
                                t.device().str());
}

// The effective per-column multiplier in fp32: w, or 1 + w (Gemma), as torch forms it.
at::Tensor weight_f32(const at::Tensor& weight, bool gemma) {
  const at::Tensor w = weight.to(at::kFloat);
  return (gemma ? w + 1.0 : w).contiguous();
}

// transformers rounds the normalized value to the input dtype before the weight only when the
// weight has that dtype and is not Gemma's offset (LlamaRMSNorm: weight * h.to(input_dtype)).
bool round_h(const at::Tensor& x, const at::Tensor& weight, bool gemma) {
  return !gemma && weight.scalar_type() == x.scalar_type() && x.scalar_type() != at::kFloat;
}

}  // namespace

bool fused_ops_support(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16;
}

// ------------------------------------------------------------------------------------------
// RMSNorm (and the residual add before it)

variable_list FusedRmsNorm::forward(AutogradContext* ctx, const at::Tensor& x,
                                    const std::optional<at::Tensor>& residual_opt,
                                    const at::Tensor& weight,
                                    double eps, bool gemma) {
  const fused::Elem elem = elem_of(x, "fused_rms_norm");
  check_cpu(x, "fused_rms_norm");
  const int64_t n = x.dim() > 0 ? x.size(-1) : 0;
  if (weight.dim() != 1 || weight.size(0) != n ||
      (weight.scalar_type() != x.scalar_type() && weight.scalar_type() != at::kFloat))
    throw std::invalid_argument("fused_rms_norm: weight must be [" + std::to_string(n) + "] " +
                                c10::toString(x.scalar_type()) + " or float32, not " +
                                quant::shape_str(weight.sizes().vec()) + " " +
                                c10::toString(weight.scalar_type()));
  if (weight.requires_grad())
    throw std::invalid_argument(
        "fused_rms_norm: the norm weight requires grad; the fused norm gives it none (norm "
        "weights are frozen here)");
  const at::Tensor residual = residual_opt.has_value() ? *residual_opt : at::Tensor();
  const bool has_residual = residual.defined();
  if (has_residual && (residual.sizes() != x.sizes() || residual.scalar_type() != x.scalar_type()))
    throw std::invalid_argument("fused_add_rms_norm: a must be " + quant::shape_str(x.sizes().vec()) +
                                " " + c10::toString(x.scalar_type()) + " like x, not " +
                                quant::shape_str(residual.sizes().vec()) + " " +
                                c10::toString(residual.scalar_type()));
  const at::Tensor xc = x.contiguous();
  const int64_t rows = n > 0 ? xc.numel() / n : 0;
  const at::Tensor wf = weight_f32(weight, gemma);
  at::Tensor y = at::empty_like(xc);
  at::Tensor rstd = at::empty({rows}, xc.options().dtype(at::kFloat));
  at::Tensor rc, hidden;
  fused::RmsNormFwdArgs a;
  a.elem = elem;
  a.x = xc.const_data_ptr();
  if (has_residual) {
    rc = residual.contiguous();
    hidden = at::empty_like(xc);
    a.residual = rc.const_data_ptr();
    a.hidden = hidden.mutable_data_ptr();
  }
  a.w = wf.const_data_ptr<float>();
  a.round_h = round_h(x, weight, gemma);
  a.eps = static_cast<float>(eps);  // torch adds eps as an fp32 scalar
  a.y = y.mutable_data_ptr();
  a.rstd = rstd.mutable_data_ptr<float>();
  a.n = n;
  const fused::RowKernels& k = fused::row_kernels_best();
  at::parallel_for(0, rows, grain_rows(n),
                   [&](int64_t r0, int64_t r1) { k.rms_norm_fwd(a, r0, r1); });
  ctx->save_for_backward({has_residual ? hidden : xc, rstd, weight});
  ctx->saved_data["gemma"] = gemma;
  ctx->saved_data["has_residual"] = has_residual;
  if (has_residual) return {hidden, y};
  return {y};
}

variable_list FusedRmsNorm::backward(AutogradContext* ctx, variable_list grad_outputs) {
  const variable_list saved = ctx->get_saved_variables();
  const at::Tensor& s = saved[0];
  const at::Tensor& rstd = saved[1];
  const at::Tensor& weight = saved[2];
  const bool gemma = ctx->saved_data["gemma"].toBool();
  const bool has_residual = ctx->saved_data["has_residual"].toBool();
  const at::Tensor dy = grad_outputs[has_residual ? 1 : 0].defined()
                            ? grad_outputs[has_residual ? 1 : 0].to(s.scalar_type()).contiguous()
                            : at::Tensor();
  const at::Tensor dh = has_residual && grad_outputs[0].defined()
                            ? grad_outputs[0].to(s.scalar_type()).contiguous()
                            : at::Tensor();
  if (!dy.defined() && !dh.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(),
                                               at::Tensor(), at::Tensor()};
  const int64_t n = s.size(-1);
  const int64_t rows = n > 0 ? s.numel() / n : 0;
  const at::Tensor wf = weight_f32(weight, gemma);
  at::Tensor dx = at::empty_like(s);
  fused::RmsNormBwdArgs a;
  a.elem = elem_of(s, "fused_rms_norm");
  a.s = s.const_data_ptr();
  a.rstd = rstd.const_data_ptr<float>();
  a.w = wf.const_data_ptr<float>();
  a.round_h = round_h(s, weight, gemma);
  a.dy = dy.defined() ? dy.const_data_ptr() : nullptr;
  a.dhidden = dh.defined() ? dh.const_data_ptr() : nullptr;
  a.dx = dx.mutable_data_ptr();
  a.n = n;
  const fused::RowKernels& k = fused::row_kernels_best();
  at::parallel_for(0, rows, grain_rows(n),
                   [&](int64_t r0, int64_t r1) { k.rms_norm_bwd(a, r0, r1); });
  // Every forward argument gets one: x, residual (the same gradient), weight, eps, gemma.
  return {dx, has_residual ? dx : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
}

at::Tensor fused_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool gemma) {
  return FusedRmsNorm::apply(x, std::nullopt, weight, eps, gemma)[0];
}

std::pair<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& a,
                                                     const at::Tensor& weight, double eps,
                                                     bool gemma) {
  if (!a.defined())
    throw std::invalid_argument("fused_add_rms_norm: the tensor to add is undefined");
  const variable_list out = FusedRmsNorm::apply(x, std::optional<at::Tensor>(a), weight, eps, gemma);
  return {out[0], out[1]};
}

// ------------------------------------------------------------------------------------------
// RoPE

namespace {

at::Tensor rope_run(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                    bool backward) {
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  fused::RopeArgs a;
  a.elem = elem_of(xc, "fused_rope");
  a.backward = backward;
  a.x = xc.const_data_ptr();
  a.cos = cos.const_data_ptr();
  a.sin = sin.const_data_ptr();
  a.seq = xc.size(1);
  a.heads = xc.size(2);
  a.head_dim = xc.size(3);
  a.cos_batch_stride = cos.size(0) == 1 ? 0 : a.seq * a.head_dim;
  a.out = out.mutable_data_ptr();
  const int64_t rows = xc.size(0) * xc.size(1);
  const fused::RowKernels& k = fused::row_kernels_best();
  at::parallel_for(0, rows, grain_rows(a.heads * a.head_dim),
                   [&](int64_t r0, int64_t r1) { k.rope(a, r0, r1); });
  return out;
}

}  // namespace

at::Tensor FusedRope::forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos,
                              const at::Tensor& sin) {
  check_cpu(x, "fused_rope");
  elem_of(x, "fused_rope");
  const bool shapes_ok = x.dim() == 4 && x.size(3) % 2 == 0 && cos.dim() == 3 &&
                         cos.sizes() == sin.sizes() && (cos.size(0) == 1 || cos.size(0) == x.size(0)) &&
                         cos.size(1) == x.size(1) && cos.size(2) == x.size(3);
  if (!shapes_ok)
    throw std::invalid_argument("fused_rope: x must be [B, T, heads, D] with D even and cos / sin [B or 1, T, D]; got x " +
                                quant::shape_str(x.sizes().vec()) + ", cos " +
                                quant::shape_str(cos.sizes().vec()) + ", sin " +
                                quant::shape_str(sin.sizes().vec()));
  const at::Tensor c = cos.to(x.scalar_type()).contiguous();
  const at::Tensor s = sin.to(x.scalar_type()).contiguous();
  ctx->save_for_backward({c, s});
  return rope_run(x, c, s, /*backward=*/false);
}

variable_list FusedRope::backward(AutogradContext* ctx, variable_list grad_outputs) {
  const variable_list saved = ctx->get_saved_variables();
  const at::Tensor& g = grad_outputs[0];
  if (!g.defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
  return {rope_run(g.to(saved[0].scalar_type()), saved[0], saved[1], /*backward=*/true),
          at::Tensor(), at::Tensor()};
}

at::Tensor fused_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return FusedRope::apply(x, cos, sin);
}

// ------------------------------------------------------------------------------------------
// GLU (SwiGLU, GeGLU)

at::Tensor FusedGlu::forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up,
                             int64_t act) {
  check_cpu(gate, "fused_glu");
  const fused::Elem elem = elem_of(gate, "fused_glu");
  if (up.sizes() != gate.sizes() || up.scalar_type() != gate.scalar_type())
    throw std::invalid_argument("fused_glu: up must be " + quant::shape_str(gate.sizes().vec()) + " " +
                                c10::toString(gate.scalar_type()) + " like gate, not " +
                                quant::shape_str(up.sizes().vec()) + " " +
                                c10::toString(up.scalar_type()));
  const at::Tensor g = gate.contiguous(), u = up.contiguous();
  at::Tensor out = at::empty_like(g);
  fused::GluArgs a;
  a.elem = elem;
  a.act = static_cast<fused::GluAct>(act);
  a.gate = g.const_data_ptr();
  a.up = u.const_data_ptr();
  a.out = out.mutable_data_ptr();
  const fused::RowKernels& k = fused::row_kernels_best();
  at::parallel_for(0, g.numel(), kGrainElems,
                   [&](int64_t e0, int64_t e1) { k.glu_fwd(a, e0, e1); });
  ctx->save_for_backward({g, u});
  ctx->saved_data["act"] = act;
  return out;
}

variable_list FusedGlu::backward(AutogradContext* ctx, variable_list grad_outputs) {
  const variable_list saved = ctx->get_saved_variables();
  const at::Tensor& g = saved[0];
  const at::Tensor& u = saved[1];
  if (!grad_outputs[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
  const at::Tensor d = grad_outputs[0].to(g.scalar_type()).contiguous();
  at::Tensor dg = at::empty_like(g), du = at::empty_like(u);
  fused::GluArgs a;
  a.elem = elem_of(g, "fused_glu");
  a.act = static_cast<fused::GluAct>(ctx->saved_data["act"].toInt());
  a.gate = g.const_data_ptr();
  a.up = u.const_data_ptr();
  a.dout = d.const_data_ptr();
  a.dgate = dg.mutable_data_ptr();
  a.dup = du.mutable_data_ptr();
  const fused::RowKernels& k = fused::row_kernels_best();
  at::parallel_for(0, g.numel(), kGrainElems,
                   [&](int64_t e0, int64_t e1) { k.glu_bwd(a, e0, e1); });
  return {dg, du, at::Tensor()};
}

at::Tensor fused_glu(const at::Tensor& gate, const at::Tensor& up, fused::GluAct act) {
  if (act != fused::GluAct::silu && act != fused::GluAct::gelu_tanh)
    throw std::invalid_argument("fused_glu: unknown activation " +
                                std::to_string(static_cast<int>(act)));
  return FusedGlu::apply(gate, up, static_cast<int64_t>(act));
}

}  // namespace qlora::model
