// Row kernels of the decoder block's fused small ops (fused_ops.h), torch-free: each call works
// on rows [r0, r1) of contiguous row-major arrays, in fp32 or bf16 (uint16_t bits), every
// intermediate rounded where transformers' op-by-op sequence rounds it (ATen computes a bf16 op
// in fp32 and rounds once to nearest-even). The same source (fused_rows.inc) is compiled three
// times: plain C++ (any x86-64), AVX2+FMA and AVX-512; fused_rows_for() picks one after a runtime
// cpuid check. No fused multiply-add anywhere (-ffp-contract=off): every product rounds as
// torch's separate mul and add kernels round it.
//   rmsnorm:  s = x (+ a: hidden = R(x + a)),  rstd = 1 / sqrt(sum(s^2) / n + eps),
//             y = R(w * (round_h ? R(s * rstd) : s * rstd))
//   rmsnorm backward: dn = w * dy (R() when round_h), c = -0.5 * rstd^3 * sum(dn * s) / n,
//             ds = dn * rstd + c * 2 s;   dx = R(ds) (+ dhidden: R(dhidden + R(ds)))
//   rope:     o[j] = R(R(x[j] c[j]) - R(x[j+h] s[j])),  o[j+h] = R(R(x[j+h] c[j+h]) + R(x[j] s[j+h]))
//   rope backward: g[j] = R(R(d[j] c[j]) + R(d[j+h] s[j+h])),  g[j+h] = R(R(d[j+h] c[j+h]) - R(d[j] s[j]))
//   glu:      out = R(R(act(gate)) * up);  backward: a = R(act(gate)), dup = R(dout * a),
//             dgate = R(R(dout * up) * act'(gate)); act = silu or gelu (tanh form)
#pragma once

#include <cstdint>

namespace qlora::model::fused {

enum class Elem { f32, bf16 };
enum class GluAct { silu, gelu_tanh };

struct RmsNormFwdArgs {
  Elem elem = Elem::f32;
  const void* x = nullptr;         // [rows, n]
  const void* residual = nullptr;  // [rows, n] or null: normalize x + residual
  void* hidden = nullptr;          // [rows, n] written when residual is given
  const float* w = nullptr;        // [n] effective multiplier (Gemma: 1 + w)
  bool round_h = false;            // round s * rstd to the element type before the weight
  float eps = 0;
  void* y = nullptr;               // [rows, n]
  float* rstd = nullptr;           // [rows]
  int64_t n = 0;
};

struct RmsNormBwdArgs {
  Elem elem = Elem::f32;
  const void* s = nullptr;        // [rows, n] what was normalized (x, or hidden)
  const float* rstd = nullptr;    // [rows]
  const float* w = nullptr;       // [n]
  bool round_h = false;           // as in the forward: dn = R(w * dy)
  const void* dy = nullptr;       // [rows, n] or null (no gradient reached the normed output)
  const void* dhidden = nullptr;  // [rows, n] or null: gradient of the hidden output
  void* dx = nullptr;             // [rows, n]
  int64_t n = 0;
};

// Rows are (b, t) of x [B, T, heads, D]; cos / sin [B or 1, T, D].
struct RopeArgs {
  Elem elem = Elem::f32;
  bool backward = false;          // apply the transposed rotation (x is then dL/dout)
  const void* x = nullptr;        // [B * T, heads, D]
  const void* cos = nullptr;      // [Bc, T, D]
  const void* sin = nullptr;
  int64_t cos_batch_stride = 0;   // 0 when Bc = 1, else T * D
  void* out = nullptr;            // [B * T, heads, D]
  int64_t seq = 0, heads = 0, head_dim = 0;
};

struct GluArgs {
  Elem elem = Elem::f32;
  GluAct act = GluAct::silu;
  const void* gate = nullptr;  // [numel]
  const void* up = nullptr;    // [numel]
  const void* dout = nullptr;  // [numel] backward only
  void* out = nullptr;         // forward: act(gate) * up
  void* dgate = nullptr;       // backward
  void* dup = nullptr;         // backward
};

// One compiled variant. glu_* take element ranges [e0, e1), the others row ranges.
struct RowKernels {
  const char* isa;  // "generic", "avx2", "avx512"
  void (*rms_norm_fwd)(const RmsNormFwdArgs&, int64_t r0, int64_t r1);
  void (*rms_norm_bwd)(const RmsNormBwdArgs&, int64_t r0, int64_t r1);
  void (*rope)(const RopeArgs&, int64_t r0, int64_t r1);
  void (*glu_fwd)(const GluArgs&, int64_t e0, int64_t e1);
  void (*glu_bwd)(const GluArgs&, int64_t e0, int64_t e1);
};

enum class Isa { generic, avx2, avx512 };
// The variant for `isa`, or nullptr when this CPU (cpuid at run time) cannot run it.
const RowKernels* row_kernels(Isa isa);
// The widest variant this CPU runs, unless set_row_kernels_override (tests) chose another.
const RowKernels& row_kernels_best();
// Tests and benchmarks: force a variant (nullptr: back to the best). Not thread-safe against
// running ops.
void set_row_kernels_override(const RowKernels* k);

}  // namespace qlora::model::fused
