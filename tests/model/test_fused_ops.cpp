// The fused block ops (model/fused_ops.h) against the ATen op sequences transformers runs
// (LlamaRMSNorm / Gemma3RMSNorm, apply_rotary_pos_emb, act(gate) * up, x + a), forward values
// and gradients of a random upstream gradient through autograd, fp32 and bf16, in every compiled
// kernel variant this CPU runs, with odd sizes (rows not a multiple of a thread's chunk, widths
// not a multiple of any vector width). Then whole blocks with fused vs unfused ops.
//
// Tolerances (named below) and where they come from:
// - Exact (bitwise) where both sides make the same roundings with no reduction: RoPE forward and
//   backward (fp32 and bf16), the residual add's hidden output.
// - RMSNorm: the only difference is the order of the fp32 sum of squares (and of sum(dn * x) in
//   the backward), so rstd differs by an ulp or two: fp32 outputs within kF32Ulps ulp of each
//   element; bf16 outputs equal or one bf16 ulp apart (a rounding boundary crossed). Backward
//   values come from a difference of two terms; compared against the largest |grad| of the
//   tensor: kF32GradRel in fp32, one bf16 ulp of the element plus that in bf16.
// - SwiGLU / GeGLU: our exp / tanh (fused_rows.inc, < 1 ulp) vs Sleef's in ATen (1 ulp): fp32
//   within kF32Ulps ulp or kF32GradRel of the largest |value|; bf16 within one bf16 ulp.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <string>
#include <vector>

#include "expect_error.h"
#include "model/decoder.h"
#include "model/fused_ops.h"
#include "model_test_util.h"
#include "temp_dir.h"

namespace qlora::model {
namespace {

using namespace qlora::model::testing;

constexpr double kF32Ulps = 8;        // elementwise, in units of the reference's fp32 ulp
constexpr double kF32GradRel = 2e-6;  // of the largest |reference| element (~16 fp32 ulp)
constexpr double kBf16Ulps = 1;       // elementwise, in units of the reference's bf16 ulp

// ---- references: transformers' op sequences, as decoder.cpp's unfused path runs them ----
at::Tensor ref_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool gemma) {
  const at::ScalarType input_dtype = x.scalar_type();
  at::Tensor h = x.to(at::kFloat);
  const at::Tensor variance = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(variance + eps);
  if (gemma) return (h * (weight.to(at::kFloat) + 1.0)).to(input_dtype);
  if (weight.scalar_type() != input_dtype) return (weight * h).to(input_dtype);
  return weight * h.to(input_dtype);
}
at::Tensor ref_rope(const at::Tensor& x4, const at::Tensor& cos, const at::Tensor& sin) {
  const at::Tensor q = x4.transpose(1, 2);  // [B, n, T, D]
  const int64_t half = q.size(-1) / 2;
  const at::Tensor rot = at::cat({-q.narrow(-1, half, half), q.narrow(-1, 0, half)}, -1);
  return (q * cos.unsqueeze(1) + rot * sin.unsqueeze(1)).transpose(1, 2);  // [B, T, n, D]
}
at::Tensor ref_glu(const at::Tensor& gate, const at::Tensor& up, fused::GluAct act) {
  return (act == fused::GluAct::silu ? at::silu(gate) : at::gelu(gate, "tanh")) * up;
}

// ---- comparisons ----
at::Tensor randn(at::IntArrayRef shape, uint64_t seed, at::ScalarType dtype, double scale = 1.0) {
  at::Generator gen = test_gen(seed);
  return (at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat)) * scale).to(dtype);
}

// ulp of |v| in a format with `mantissa` stored bits (23 fp32, 7 bf16), elementwise, fp64.
at::Tensor ulp_of(const at::Tensor& v, int mantissa) {
  const at::Tensor a = v.to(at::kDouble).abs().clamp_min(1e-30);
  return at::exp2(at::floor(at::log2(a)) - mantissa);
}

// Max of |got - want| / (ulps * ulp(want) + rel_of_max * max|want|); <= 1 passes.
double worst(const at::Tensor& got, const at::Tensor& want, double ulps, double rel_of_max) {
  const int mantissa = want.scalar_type() == at::kBFloat16 ? 7 : 23;
  const at::Tensor w = want.to(at::kDouble), g = got.to(at::kDouble);
  const double max_w = w.abs().max().item<double>();
  const at::Tensor allowed = ulp_of(want, mantissa) * ulps + rel_of_max * max_w + 1e-30;
  return ((g - w).abs() / allowed).max().item<double>();
}

void expect_close(const at::Tensor& got, const at::Tensor& want, double ulps, double rel_of_max,
                  const std::string& what) {
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  ASSERT_EQ(got.scalar_type(), want.scalar_type()) << what;
  EXPECT_LE(worst(got, want, ulps, rel_of_max), 1.0)
      << what << ": max |diff| " << (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>()
      << ", max |want| " << want.to(at::kDouble).abs().max().item<double>();
}
void expect_equal(const at::Tensor& got, const at::Tensor& want, const std::string& what) {
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  EXPECT_TRUE(at::equal(got.contiguous(), want.contiguous()))
      << what << ": max |diff| " << (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
}
// Elementwise tolerance of a dtype: the forward one, and the gradient one (plus a share of max).
void expect_fwd(const at::Tensor& got, const at::Tensor& want, const std::string& what) {
  if (want.scalar_type() == at::kBFloat16) return expect_close(got, want, kBf16Ulps, 0, what);
  expect_close(got, want, kF32Ulps, 0, what);
}
void expect_grad(const at::Tensor& got, const at::Tensor& want, const std::string& what) {
  if (want.scalar_type() == at::kBFloat16)
    return expect_close(got, want, kBf16Ulps, kF32GradRel, what);
  expect_close(got, want, 0, kF32GradRel, what);
}

std::vector<at::Tensor> grads(const at::Tensor& out, const std::vector<at::Tensor>& inputs,
                              const at::Tensor& upstream) {
  return torch::autograd::grad({out}, inputs, {upstream}, /*retain_graph=*/true);
}

// Each compiled variant this CPU runs, as the active one for the test's body.
struct IsaCase {
  const fused::RowKernels* kernels;
  std::string name;
};
std::vector<IsaCase> isas() {
  std::vector<IsaCase> out;
  for (fused::Isa isa : {fused::Isa::generic, fused::Isa::avx2, fused::Isa::avx512})
    if (const fused::RowKernels* k = fused::row_kernels(isa)) out.push_back({k, k->isa});
  return out;
}
struct IsaScope {
  explicit IsaScope(const fused::RowKernels* k) { fused::set_row_kernels_override(k); }
  ~IsaScope() { fused::set_row_kernels_override(nullptr); }
};

const std::vector<at::ScalarType> kDtypes = {at::kFloat, at::kBFloat16};
std::string dname(at::ScalarType t) { return t == at::kFloat ? "fp32" : "bf16"; }

TEST(FusedOps, GenericVariantAlwaysThere) {
  ASSERT_NE(fused::row_kernels(fused::Isa::generic), nullptr);
  EXPECT_STREQ(fused::row_kernels(fused::Isa::generic)->isa, "generic");
}

// ------------------------------------------------------------------------------------------

struct NormCase {
  std::vector<int64_t> shape;
  bool gemma;
  bool upcast;  // fp32 weight with bf16 x (upcast_layernorm)
};

TEST(FusedOps, RmsNormMatchesTransformers) {
  const std::vector<NormCase> cases = {{{3, 37, 100}, false, false}, {{2, 5, 576}, false, false},
                                       {{1, 1, 13}, false, false},   {{4, 9, 130}, true, false},
                                       {{7, 64}, false, true},       {{5, 3, 24}, true, true},
                                       {{2, 700, 40}, false, false}};
  for (const IsaCase& isa : isas()) {
    IsaScope scope(isa.kernels);
    for (at::ScalarType dtype : kDtypes)
      for (const NormCase& nc : cases) {
        if (nc.upcast && dtype == at::kFloat) continue;
        const std::string what = isa.name + " " + dname(dtype) + " " +
                                 quant::shape_str(nc.shape) + (nc.gemma ? " gemma" : "") +
                                 (nc.upcast ? " upcast" : "");
        const int64_t n = nc.shape.back();
        const at::Tensor x = randn(nc.shape, 1, dtype, 3.0).requires_grad_(true);
        const at::Tensor w = randn({n}, 2, nc.upcast ? at::kFloat : dtype, nc.gemma ? 0.3 : 1.0);
        const at::Tensor up = randn(nc.shape, 3, dtype);
        const at::Tensor want = ref_rms_norm(x, w, 1e-6, nc.gemma);
        const at::Tensor got = fused_rms_norm(x, w, 1e-6, nc.gemma);
        expect_fwd(got, want, what + " forward");
        expect_grad(grads(got, {x}, up)[0], grads(want, {x}, up)[0], what + " dx");
      }
  }
}

TEST(FusedOps, AddRmsNormMatchesTransformers) {
  for (const IsaCase& isa : isas()) {
    IsaScope scope(isa.kernels);
    for (at::ScalarType dtype : kDtypes)
      for (bool gemma : {false, true}) {
        const std::vector<int64_t> shape = {3, 29, 72};
        const std::string what = isa.name + " " + dname(dtype) + (gemma ? " gemma" : "");
        const at::Tensor x = randn(shape, 4, dtype).requires_grad_(true);
        const at::Tensor a = randn(shape, 5, dtype, 0.5).requires_grad_(true);
        const at::Tensor w = randn({72}, 6, dtype);
        const at::Tensor want_hidden = x + a;
        const at::Tensor want = ref_rms_norm(want_hidden, w, 1e-5, gemma);
        const auto [hidden, got] = fused_add_rms_norm(x, a, w, 1e-5, gemma);
        expect_equal(hidden, want_hidden, what + " hidden");
        expect_fwd(got, want, what + " normed");
        // Both outputs used downstream, as in the block (hidden feeds the next residual).
        const at::Tensor g1 = randn(shape, 7, dtype), g2 = randn(shape, 8, dtype);
        const auto want_g =
            torch::autograd::grad({want_hidden, want}, {x, a}, {g1, g2}, /*retain_graph=*/true);
        const auto got_g = torch::autograd::grad({hidden, got}, {x, a}, {g1, g2}, true);
        expect_grad(got_g[0], want_g[0], what + " dx");
        expect_grad(got_g[1], want_g[1], what + " da");
        // Only the normed output used.
        expect_grad(grads(got, {x}, g2)[0], grads(want, {x}, g2)[0], what + " dx (normed only)");
      }
  }
}

TEST(FusedOps, RmsNormRejectsTrainableWeightAndBadShapes) {
  const at::Tensor x = randn({2, 8}, 1, at::kFloat);
  const at::Tensor w = randn({8}, 2, at::kFloat).requires_grad_(true);
  EXPECT_THROW(fused_rms_norm(x, w, 1e-6, false), std::invalid_argument);
  EXPECT_THROW(fused_rms_norm(x, randn({7}, 2, at::kFloat), 1e-6, false), std::invalid_argument);
  EXPECT_THROW(fused_rms_norm(x.to(at::kHalf), randn({8}, 2, at::kHalf), 1e-6, false),
               std::invalid_argument);
  EXPECT_THROW(fused_add_rms_norm(x, randn({2, 9}, 3, at::kFloat), randn({8}, 2, at::kFloat), 1e-6,
                                  false),
               std::invalid_argument);
}

// ------------------------------------------------------------------------------------------

TEST(FusedOps, RopeIsExactlyTransformersRotation) {
  struct Case {
    int64_t b, t, n, d, cos_batch;
  };
  const std::vector<Case> cases = {{2, 37, 3, 64, 1}, {3, 5, 4, 10, 3}, {1, 1, 9, 2, 1},
                                   {2, 300, 2, 24, 2}};
  for (const IsaCase& isa : isas()) {
    IsaScope scope(isa.kernels);
    for (at::ScalarType dtype : kDtypes)
      for (const Case& c : cases) {
        const std::string what = isa.name + " " + dname(dtype) + " B" + std::to_string(c.b) +
                                 " T" + std::to_string(c.t) + " n" + std::to_string(c.n) + " D" +
                                 std::to_string(c.d) + " cos batch " + std::to_string(c.cos_batch);
        const at::Tensor x = randn({c.b, c.t, c.n, c.d}, 11, dtype, 2.0).requires_grad_(true);
        // Real angles (positions x inv_freq), as rope_cos_sin makes them.
        const at::Tensor pos =
            at::randint(0, 4096, {c.cos_batch, c.t}, test_gen(12), at::TensorOptions().dtype(at::kLong));
        ModelConfig cfg = tiny_config();
        cfg.head_dim = c.d;
        const auto [cos, sin] = rope_cos_sin_at(rope_inv_freq(cfg), pos, dtype);
        const at::Tensor want = ref_rope(x, cos, sin);
        const at::Tensor got = fused_rope(x, cos, sin);
        expect_equal(got, want, what + " forward");
        // The upstream gradient as attention hands it back: a [B, n, T, D]-strided tensor.
        const at::Tensor up = randn({c.b, c.n, c.t, c.d}, 13, dtype).transpose(1, 2);
        expect_equal(grads(got, {x}, up)[0], grads(want, {x}, up)[0], what + " dx");
      }
  }
}

TEST(FusedOps, RopeRejectsBadShapes) {
  const at::Tensor x = randn({1, 4, 2, 8}, 1, at::kFloat);
  const at::Tensor cs = randn({1, 4, 8}, 2, at::kFloat);
  EXPECT_THROW(fused_rope(x, randn({1, 5, 8}, 2, at::kFloat), randn({1, 5, 8}, 2, at::kFloat)),
               std::invalid_argument);
  EXPECT_THROW(fused_rope(x.view({1, 4, 16}), cs, cs), std::invalid_argument);
  EXPECT_NO_THROW(fused_rope(x, cs, cs));
}

// ------------------------------------------------------------------------------------------

TEST(FusedOps, GluMatchesTransformers) {
  const std::vector<std::vector<int64_t>> shapes = {{3, 17, 96}, {1, 1, 5}, {2, 9, 1536},
                                                    {1, 1, 40001}};
  for (const IsaCase& isa : isas()) {
    IsaScope scope(isa.kernels);
    for (at::ScalarType dtype : kDtypes)
      for (fused::GluAct act : {fused::GluAct::silu, fused::GluAct::gelu_tanh})
        for (const auto& shape : shapes) {
          const std::string what = isa.name + " " + dname(dtype) +
                                   (act == fused::GluAct::silu ? " silu " : " gelu_tanh ") +
                                   quant::shape_str(shape);
          // Gates over the whole useful range, the tails included (exp over- and underflow).
          at::Tensor gate = randn(shape, 21, at::kFloat, 4.0);
          gate.view(-1).narrow(0, 0, 4).copy_(at::tensor({-100.0f, 100.0f, -88.8f, 0.0f}).narrow(
              0, 0, std::min<int64_t>(4, gate.numel())));
          gate = gate.to(dtype).requires_grad_(true);
          const at::Tensor upt = randn(shape, 22, dtype).requires_grad_(true);
          const at::Tensor g = randn(shape, 23, dtype);
          const at::Tensor want = ref_glu(gate, upt, act);
          const at::Tensor got = fused_glu(gate, upt, act);
          // gelu's 1 + tanh cancels for very negative gates (an fp32 ulp of tanh near -1 is
          // all that is left): against the largest value too.
          expect_close(got, want, dtype == at::kBFloat16 ? kBf16Ulps : kF32Ulps, kF32GradRel,
                       what + " forward");
          const auto want_g = grads(want, {gate, upt}, g);
          const auto got_g = grads(got, {gate, upt}, g);
          expect_grad(got_g[0], want_g[0], what + " dgate");
          expect_grad(got_g[1], want_g[1], what + " dup");
        }
  }
}

// ------------------------------------------------------------------------------------------
// Whole blocks: fused vs the ATen sequence, forward and every gradient (x and LoRA A / B), on the
// tiny Llama, Qwen3 (q/k norms, head_dim 24) and Gemma 3 (four norms, GeGLU, windows) models.
// Tolerance: the sums above; over a block, fp32 within 1e-5 of the largest |value| (measured
// ~1e-7), bf16 within 2% (a bf16 ulp of an intermediate flips an output by ~0.4%, and through the
// attention and MLP products a few such flips add up).

TEST(FusedOps, BlocksMatchTheUnfusedOps) {
  io::testing::TempDir tmp;
  const std::vector<std::pair<std::string, ModelConfig>> models = {
      {"llama", tiny_config()}, {"qwen3", as_qwen3(tiny_config())}, {"gemma3", as_gemma3(tiny_config(), 3)}};
  for (const auto& [name, cfg] : models)
    for (at::ScalarType dtype : kDtypes) {
      const std::string dir = tmp.file(name);
      if (dtype == at::kFloat) init_model_write(cfg, 1, dir);
      LoadOptions o;
      o.compute_dtype = dtype;
      DecoderModel m = DecoderModel::load(dir, o);
      lora::LoraConfig lc;
      lc.rank = 4;
      lc.alpha = 8;
      m.adapters_init(lc, lora::block_linear_names(), 7);
      // Non-zero B so that gradients reach A and the LoRA path changes the output.
      for (at::Tensor& p : m.adapter_parameters())
        if (p.size(1) == 4) p.detach().copy_(randn(p.sizes().vec(), 8, at::kFloat, 0.1));
      const std::string what = name + " " + dname(dtype);
      const at::Tensor x0 = randn({2, 7, cfg.hidden_size}, 9, dtype).requires_grad_(true);
      const at::Tensor up = randn({2, 7, cfg.hidden_size}, 10, dtype);
      std::vector<at::Tensor> inputs = {x0};
      for (const at::Tensor& p : m.adapter_parameters()) inputs.push_back(p);
      std::vector<std::vector<at::Tensor>> results;
      for (bool fused : {true, false}) {
        m.set_fused_ops(fused);
        at::Tensor y = x0;
        for (int64_t i = 0; i < m.num_blocks(); ++i) y = m.block_forward(i, y);
        std::vector<at::Tensor> r = {y.detach()};
        for (const at::Tensor& g : grads(y, inputs, up)) r.push_back(g.defined() ? g : at::Tensor());
        results.push_back(r);
      }
      const double tol = dtype == at::kFloat ? 1e-5 : 2e-2;
      for (size_t k = 0; k < results[0].size(); ++k) {
        if (!results[1][k].defined()) continue;
        const at::Tensor a = results[0][k].to(at::kDouble), b = results[1][k].to(at::kDouble);
        const double diff = (a - b).abs().max().item<double>();
        const double scale = b.abs().max().item<double>();
        EXPECT_LE(diff, tol * scale) << what << " output/gradient #" << k << " diff " << diff
                                     << " of max " << scale;
      }
    }
}

}  // namespace
}  // namespace qlora::model
