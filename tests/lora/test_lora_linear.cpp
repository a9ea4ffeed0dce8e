// lora_linear unit tests. The reference is plain libtorch on the dequantized weight W:
//   base:  y = x @ W^T (+ b), dL/dx = g @ W, no gradient for W
//   QLoRA: y = x @ W^T + b + s (x @ A^T) @ B^T,  dL/dB = s g^T (x A^T),  dL/dA = s (g B)^T x
// plus what the graph keeps (never a dequantized W), dropout, shapes, the merge and target names.
// peft's init is tested with the adapter lifecycle (test_adapter_slots.cpp).
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "lora/lora_linear.h"
#include "lora/qlora_base_matmul.h"
#include "quant/quantize.h"

#include "expect_error.h"

namespace qlora::lora {
namespace {

using qlora::testing::contains;
using qlora::testing::invalid_argument_message;

// fp32 tolerances for "the same products summed in another order" (libtorch's autograd vs our
// backward; fused vs separate bias add): a few ulps of the largest partial sum, and these sums
// run over at most ~100 terms of size ~1.
constexpr double kRtolF32 = 1e-5;
constexpr double kAtolF32 = 1e-6;

at::Generator gen_seeded(uint64_t seed) { return at::detail::createCPUGenerator(seed); }

at::Tensor randn(at::IntArrayRef shape, uint64_t seed, double stddev = 1.0) {
  return at::randn(shape, gen_seeded(seed), at::TensorOptions().dtype(at::kFloat)) * stddev;
}

std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

// Largest violation of |a - b| <= atol + rtol |b| (<= 0 when close), for failure messages.
double excess(const at::Tensor& a, const at::Tensor& b, double rtol, double atol) {
  const at::Tensor af = a.detach().to(at::kDouble), bf = b.detach().to(at::kDouble);
  return ((af - bf).abs() - (bf.abs() * rtol + atol)).max().item<double>();
}

#define EXPECT_CLOSE(a, b, rtol, atol)                                                     \
  EXPECT_TRUE(at::allclose((a).to(at::kDouble), (b).to(at::kDouble), rtol, atol))          \
      << #a " vs " #b " " << shape_str(a) << ": worst excess " << excess(a, b, rtol, atol) \
      << " (rtol " << rtol << ", atol " << atol << ")"

struct WeightCase {
  int64_t out, in;
  quant::QuantType type;
  bool double_quant;
  at::ScalarType storage;
};

std::string case_name(const WeightCase& c) {
  return std::to_string(c.out) + "x" + std::to_string(c.in) + "_" + quant::quant_type_name(c.type) +
         (c.double_quant ? "_dq" : "") + "_" + c10::toString(c.storage);
}

// A random [out, in] weight quantized to 4 bits, and its dequantized fp32 value.
struct TestWeight {
  quant::Quantized q;
  at::Tensor w;  // [out, in] fp32, what every reference multiplies with
};

TestWeight weight_make(const WeightCase& c, uint64_t seed = 1) {
  quant::QuantizeOptions options;
  options.quant_type = c.type;
  options.double_quant = c.double_quant;
  options.storage = c.storage;
  TestWeight t;
  t.q = quant::quantize_4bit(randn({c.out, c.in}, seed, 0.05), options);
  t.w = quant::dequantize_4bit(t.q.packed, t.q.state, at::kFloat);
  return t;
}

// Odd shapes (partial last block: 37 * 83 = 3071 elements at blocksize 64), both formats,
// double quantization and every storage dtype.
const std::vector<WeightCase> kCases = {
    {37, 83, quant::QuantType::nf4, false, at::kByte},
    {37, 83, quant::QuantType::fp4, true, at::kBFloat16},
    {64, 48, quant::QuantType::nf4, true, at::kFloat},
    {5, 130, quant::QuantType::nf4, false, at::kHalf},
};

// ------------------------------------------------------------------------------------------
// qlora_base_matmul

TEST(QLoraBaseMatmul, ForwardAndGradMatchPlainLibtorch) {
  for (const WeightCase& c : kCases) {
    SCOPED_TRACE(case_name(c));
    const TestWeight tw = weight_make(c);
    const at::Tensor x0 = randn({2, 3, c.in}, 2);
    const at::Tensor g = randn({2, 3, c.out}, 3);  // upstream gradient

    const at::Tensor x = x0.clone().requires_grad_(true);
    const at::Tensor y = qlora_base_matmul(x, tw.q);
    (y * g).sum().backward();

    const at::Tensor x_ref = x0.clone().requires_grad_(true);
    const at::Tensor y_ref = at::linear(x_ref, tw.w);
    (y_ref * g).sum().backward();

    ASSERT_EQ(y.sizes(), y_ref.sizes());
    EXPECT_TRUE(at::equal(y, y_ref)) << "same at::linear on the same W must be bit-identical";
    EXPECT_CLOSE(x.grad(), x_ref.grad(), kRtolF32, kAtolF32);
  }
}

// Central differences of L = sum(y * g) in fp64 (dequantize to fp64 is exact: fp32 values). L is
// linear in x, so the difference quotient is exact up to rounding: 1e-9 relative.
TEST(QLoraBaseMatmul, FiniteDifferencesFp64) {
  const TestWeight tw = weight_make({37, 83, quant::QuantType::nf4, true, at::kByte});
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor x0 = randn({4, 83}, 4).to(at::kDouble);
  const at::Tensor g = randn({4, 37}, 5).to(at::kDouble);
  const at::Tensor x = x0.clone().requires_grad_(true);
  (qlora_base_matmul(x, tw.q) * g).sum().backward();
  ASSERT_EQ(x.grad().scalar_type(), at::kDouble);
  const double eps = 1e-3;
  for (uint64_t k = 0; k < 5; ++k) {
    const at::Tensor v = at::randn({4, 83}, gen_seeded(10 + k), f64);
    at::NoGradGuard no_grad;
    const double lp = (qlora_base_matmul(x0 + eps * v, tw.q) * g).sum().item<double>();
    const double lm = (qlora_base_matmul(x0 - eps * v, tw.q) * g).sum().item<double>();
    const double numeric = (lp - lm) / (2 * eps);
    const double analytic = (x.grad() * v).sum().item<double>();
    EXPECT_NEAR(numeric, analytic, 1e-9 * std::max(1.0, std::fabs(analytic))) << "direction " << k;
  }
}

TEST(QLoraBaseMatmul, BaseWeightIsNotAnAutogradInput) {
  const TestWeight tw = weight_make({37, 83, quant::QuantType::nf4, false, at::kFloat});
  const at::Tensor x = randn({3, 83}, 6).requires_grad_(true);
  const at::Tensor y = qlora_base_matmul(x, tw.q);
  ASSERT_TRUE(y.grad_fn());
  // One edge per tensor input: x only (no bias here); the weight is not an input at all.
  const auto& edges = y.grad_fn()->next_edges();
  ASSERT_EQ(edges.size(), 1u);
  EXPECT_TRUE(edges[0].is_valid());
  y.sum().backward();
  EXPECT_TRUE(x.grad().defined());
  EXPECT_FALSE(tw.q.packed.grad().defined());
  EXPECT_FALSE(tw.q.packed.requires_grad());
}

TEST(QLoraBaseMatmul, NodeSavesNoDequantizedWeight) {
  for (const WeightCase& c : kCases) {
    SCOPED_TRACE(case_name(c));
    const TestWeight tw = weight_make(c);
    const at::Tensor x = randn({3, c.in}, 7).requires_grad_(true);
    const at::Tensor y = qlora_base_matmul(x, tw.q);
    auto* node = dynamic_cast<torch::autograd::CppNode<QLoraBaseMatmul>*>(y.grad_fn().get());
    ASSERT_TRUE(node) << "grad_fn is " << y.grad_fn()->name();
    std::vector<at::Tensor> kept = node->ctx_.get_saved_variables();
    for (const auto& [key, value] : node->ctx_.saved_data)
      if (value.isTensor()) kept.push_back(value.toTensor());
    int64_t kept_bytes = 0;
    for (const at::Tensor& t : kept) {
      if (!t.defined()) continue;
      kept_bytes += t.numel() * t.element_size();
      EXPECT_LT(t.numel(), c.out * c.in)
          << "a saved tensor " << shape_str(t) << " " << t.scalar_type() << " as large as W";
    }
    // n/2 packed bytes + scales + code tables (16 and, nested, 256 floats): below half of W's
    // 4n bytes even at these small n.
    EXPECT_LT(kept_bytes, c.out * c.in * 4 / 2) << "bytes kept by the node";
    EXPECT_TRUE(node->ctx_.saved_data.at("packed").toTensor().is_same(tw.q.packed))
        << "the packed weight is shared, not copied";
  }
}

// Counts the bytes the CPU allocator hands out and gets back while installed.
class CountingAllocator final : public c10::Allocator {
 public:
  explicit CountingAllocator(c10::Allocator* base) : base_(base) {}
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr inner = base_->allocate(n);
    void* ptr = inner.get();
    live_ += static_cast<int64_t>(n);
    return {ptr, new Held{std::move(inner), n, this}, &Held::release, c10::Device(c10::kCPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
  int64_t live() const { return live_; }

 private:
  struct Held {
    c10::DataPtr inner;
    size_t n;
    CountingAllocator* owner;
    static void release(void* p) {
      auto* h = static_cast<Held*>(p);
      h->owner->live_ -= static_cast<int64_t>(h->n);
      delete h;
    }
  };
  c10::Allocator* base_;
  std::atomic<int64_t> live_{0};
};

// Installs a CountingAllocator as the CPU allocator for one scope. It must outlive every tensor
// allocated through it, hence the static storage.
class AllocatorScope {
 public:
  AllocatorScope() : base_(c10::GetCPUAllocator()) {
    static CountingAllocator* counting = new CountingAllocator(base_);
    counting_ = counting;
    c10::SetCPUAllocator(counting_, kPriority);
  }
  ~AllocatorScope() { c10::SetCPUAllocator(base_, kPriority); }
  CountingAllocator& counting() { return *counting_; }

 private:
  static constexpr uint8_t kPriority = 200;
  c10::Allocator* base_;
  CountingAllocator* counting_;
};

// The whole graph of a QLoRA forward (base node, adapter products, bias add) holds nothing of
// W's size: memory allocated during forward and still held after it (y and the graph) stays
// below W's fp32 bytes / 4. One forward + backward runs first, outside the count, so that a
// dequantize workspace that is reused across products (allowed: it is not part of any graph)
// already exists; a dequantized W saved as a view of such a workspace allocates nothing, which
// NodeSavesNoDequantizedWeight catches instead.
TEST(QLoraLinear, GraphHoldsNoDequantizedWeight) {
  const int64_t out = 256, in = 320, tokens = 3;
  const int64_t w_bytes = out * in * 4;
  const TestWeight tw = weight_make({out, in, quant::QuantType::nf4, true, at::kByte});
  QLoraLinear layer("model.layers.0.mlp.up_proj", tw.q, randn({out}, 8));
  layer.adapter_set({8, 16.0, 0.0, false}, randn({8, in}, 9, 0.1), randn({out, 8}, 10, 0.1));
  const at::Tensor x = randn({tokens, in}, 11).requires_grad_(true);
  layer.forward(x).sum().backward();  // warm-up

  AllocatorScope scope;
  CountingAllocator& counter = scope.counting();
  const int64_t before = counter.live();
  at::Tensor y = layer.forward(x, /*training=*/false);
  const int64_t held = counter.live() - before;
  EXPECT_GE(held, y.numel() * 4) << "the counter sees at least y itself";
  EXPECT_LT(held, w_bytes / 4) << "bytes held by y and its graph after forward";

  y.sum().backward();
  y = at::Tensor();  // frees the graph
  EXPECT_LT(counter.live() - before, w_bytes / 4) << "bytes held after backward (the grads)";
  EXPECT_TRUE(x.grad().defined());
  EXPECT_TRUE(layer.lora_A().grad().defined());
}

// Late binding (no recompute in the trainer): the node keeps no tensor of the weight at all,
// only its source, and the backward uses the weight the source gives then; the gradients are
// those of the early-bound linear. No weight bound at backward time is std::logic_error.
TEST(QLoraLinear, LateBoundWeightIsFetchedInBackward) {
  const int64_t out = 64, in = 96;
  const TestWeight tw = weight_make({out, in, quant::QuantType::nf4, true, at::kByte});
  const at::Tensor a = randn({4, in}, 9, 0.1), b = randn({out, 4}, 10, 0.1);
  QLoraLinear early("model.layers.0.mlp.up_proj", tw.q, at::Tensor());
  early.adapter_set({4, 8.0, 0.0, false}, a, b);
  const at::Tensor x1 = randn({5, in}, 11).requires_grad_(true);
  const at::Tensor dy = randn({5, out}, 12);
  early.forward(x1).backward(dy);

  // The late linear's weight is a copy that is dropped after the forward; the backward finds an
  // equal weight in another buffer through the source.
  quant::Quantized copy = tw.q;
  copy.packed = tw.q.packed.clone();
  const quant::Quantized* bound = nullptr;
  QLoraLinear late("model.layers.0.mlp.up_proj", copy, at::Tensor());
  late.adapter_set({4, 8.0, 0.0, false}, a, b);
  late.set_weight_source([&bound] { return bound; });
  const at::Tensor x2 = x1.detach().clone().requires_grad_(true);
  const at::Tensor y = late.forward(x2);
  auto* node = dynamic_cast<torch::autograd::CppNode<QLoraBaseMatmul>*>(
      y.grad_fn()->next_edges()[0].function.get());
  ASSERT_TRUE(node) << "the base product's node";
  for (const auto& [key, value] : node->ctx_.saved_data)
    EXPECT_FALSE(value.isTensor()) << "the late-bound node keeps tensor " << key;
  copy.packed.fill_(0);  // what a buffer pool may do to the forward's buffer

  EXPECT_THROW(y.backward(dy, /*retain_graph=*/true), std::logic_error);  // nothing bound
  bound = &tw.q;
  x2.mutable_grad() = at::Tensor();  // the failed backward may have reached the adapter's leaves
  late.lora_A().mutable_grad() = at::Tensor();
  late.lora_B().mutable_grad() = at::Tensor();
  y.backward(dy);
  EXPECT_TRUE(at::equal(x2.grad(), x1.grad()));
  EXPECT_TRUE(at::equal(late.lora_A().grad(), early.lora_A().grad()));
  EXPECT_TRUE(at::equal(late.lora_B().grad(), early.lora_B().grad()));
}

// ------------------------------------------------------------------------------------------
// QLoraLinear forward and gradients

TEST(QLoraLinear, ForwardMatchesHandFp32) {
  for (const WeightCase& c : kCases) {
    SCOPED_TRACE(case_name(c));
    const TestWeight tw = weight_make(c);
    const at::Tensor bias = randn({c.out}, 12);
    const LoraConfig config{4, 8.0, 0.0, false};
    const at::Tensor a = randn({4, c.in}, 13, 0.1), b = randn({c.out, 4}, 14, 0.1);
    QLoraLinear layer("model.layers.0.self_attn.q_proj", tw.q, bias);
    layer.adapter_set(config, a, b);
    EXPECT_EQ(layer.in_features(), c.in);
    EXPECT_EQ(layer.out_features(), c.out);

    const at::Tensor x = randn({2, 3, c.in}, 15);
    const at::Tensor y = layer.forward(x);
    const at::Tensor want =
        x.matmul(tw.w.t()) + bias + 2.0 * x.matmul(a.t()).matmul(b.t());  // s = 8 / 4
    ASSERT_EQ(y.sizes(), want.sizes());
    EXPECT_EQ(y.scalar_type(), at::kFloat);
    EXPECT_CLOSE(y, want, kRtolF32, kAtolF32);
  }
}

// bf16 compute: W is dequantized to bf16 (exact: the same rounding as W.to(bf16)), x @ W^T and the
// bias add run in bf16, the adapter in fp32 and its result is rounded to bf16 before the sum.
// Reference in fp64 on the same bf16 inputs; a handful of bf16 roundings (2^-9 each) of values
// whose partial sums are up to ~|y|max: rtol 2^-6, atol 2^-7 * max|y|.
TEST(QLoraLinear, ForwardMatchesHandBf16) {
  for (const WeightCase& c : kCases) {
    SCOPED_TRACE(case_name(c));
    const TestWeight tw = weight_make(c);
    const at::Tensor bias = randn({c.out}, 16);
    const at::Tensor a = randn({4, c.in}, 17, 0.1), b = randn({c.out, 4}, 18, 0.1);
    QLoraLinear layer("model.layers.1.mlp.down_proj", tw.q, bias);
    layer.adapter_set({4, 8.0, 0.0, false}, a, b);

    const at::Tensor x = randn({2, 3, c.in}, 19).to(at::kBFloat16);
    const at::Tensor y = layer.forward(x);
    ASSERT_EQ(y.scalar_type(), at::kBFloat16);
    const at::Tensor xd = x.to(at::kDouble);
    const at::Tensor wd = tw.w.to(at::kBFloat16).to(at::kDouble);
    const at::Tensor want = xd.matmul(wd.t()) + bias.to(at::kBFloat16).to(at::kDouble) +
                            2.0 * xd.matmul(a.to(at::kDouble).t()).matmul(b.to(at::kDouble).t());
    const double atol = std::ldexp(want.abs().max().item<double>(), -7);
    EXPECT_CLOSE(y, want, std::ldexp(1.0, -6), atol);
  }
}

TEST(QLoraLinear, GradsMatchHandDerived) {
  for (const WeightCase& c : kCases) {
    SCOPED_TRACE(case_name(c));
    const TestWeight tw = weight_make(c);
    const double s = 16.0 / 8.0;
    const at::Tensor a = randn({8, c.in}, 20, 0.1), b = randn({c.out, 8}, 21, 0.1);
    QLoraLinear layer("model.layers.0.self_attn.o_proj", tw.q, at::Tensor());
    layer.adapter_set({8, 16.0, 0.0, false}, a, b);

    const at::Tensor x0 = randn({5, c.in}, 22);
    const at::Tensor g = randn({5, c.out}, 23);
    const at::Tensor x = x0.clone().requires_grad_(true);
    (layer.forward(x) * g).sum().backward();

    const at::Tensor h = x0.matmul(a.t());            // [M, r]
    const at::Tensor gb = g.matmul(b);                // [M, r]
    const at::Tensor want_b = s * g.t().matmul(h);    // [out, r]
    const at::Tensor want_a = s * gb.t().matmul(x0);  // [r, in]
    const at::Tensor want_x = g.matmul(tw.w) + s * gb.matmul(a);
    ASSERT_TRUE(layer.lora_A().grad().defined());
    ASSERT_TRUE(layer.lora_B().grad().defined());
    EXPECT_CLOSE(layer.lora_A().grad(), want_a, kRtolF32, kAtolF32);
    EXPECT_CLOSE(layer.lora_B().grad(), want_b, kRtolF32, kAtolF32);
    EXPECT_CLOSE(x.grad(), want_x, kRtolF32, kAtolF32);
  }
}

TEST(QLoraLinear, BiasGetsGradWhenTrainable) {
  const TestWeight tw = weight_make({37, 83, quant::QuantType::nf4, false, at::kByte});
  const at::Tensor bias = randn({37}, 24).requires_grad_(true);
  QLoraLinear layer("l", tw.q, bias);
  const at::Tensor g = randn({2, 4, 37}, 25);
  (layer.forward(randn({2, 4, 83}, 26)) * g).sum().backward();
  ASSERT_TRUE(bias.grad().defined());
  EXPECT_CLOSE(bias.grad(), g.sum(at::IntArrayRef{0, 1}), kRtolF32, kAtolF32);
}

TEST(QLoraLinear, NoAdapterIsTheBaseLinear) {
  const TestWeight tw = weight_make({37, 83, quant::QuantType::nf4, false, at::kByte});
  const at::Tensor bias = randn({37}, 27);
  QLoraLinear layer("l", tw.q, bias);
  EXPECT_FALSE(layer.has_adapter());
  const at::Tensor x = randn({6, 83}, 28);
  EXPECT_CLOSE(layer.forward(x, /*training=*/true), at::linear(x, tw.w, bias), kRtolF32, kAtolF32);
}

// ------------------------------------------------------------------------------------------
// Dropout (adapter input only, only when training, mask from the given generator)

TEST(QLoraLinear, DropoutOnlyWhenTrainingAndDeterministicByGenerator) {
  const TestWeight tw = weight_make({37, 83, quant::QuantType::nf4, false, at::kByte});
  const at::Tensor a = randn({4, 83}, 29, 0.1), b = randn({37, 4}, 30, 0.1);
  const double p = 0.3, s = 2.0;
  QLoraLinear layer("model.layers.0.self_attn.v_proj", tw.q, at::Tensor());
  layer.adapter_set({4, 8.0, p, false}, a, b);
  const at::Tensor x = randn({5, 83}, 31);

  const at::Tensor base = at::linear(x, tw.w);
  const at::Tensor eval = layer.forward(x, /*training=*/false, gen_seeded(1));
  EXPECT_CLOSE(eval, base + s * x.matmul(a.t()).matmul(b.t()), kRtolF32, kAtolF32);

  const at::Tensor t1 = layer.forward(x, true, gen_seeded(42));
  const at::Tensor t2 = layer.forward(x, true, gen_seeded(42));
  const at::Tensor t3 = layer.forward(x, true, gen_seeded(43));
  EXPECT_TRUE(at::equal(t1, t2)) << "same generator seed, same mask";
  EXPECT_FALSE(at::equal(t1, t3)) << "another seed, another mask";
  EXPECT_FALSE(at::allclose(t1, eval));

  // The mask at::dropout would draw from the same generator: bernoulli(1 - p) / (1 - p).
  const at::Tensor noise = at::empty({5, 83}).bernoulli_(1.0 - p, gen_seeded(42)).div_(1.0 - p);
  const double kept = (noise > 0).to(at::kFloat).mean().item<double>();
  EXPECT_NEAR(kept, 1.0 - p, 0.06) << "fraction kept over 415 draws";
  EXPECT_CLOSE(t1, base + s * (x * noise).matmul(a.t()).matmul(b.t()), kRtolF32, kAtolF32);

  const std::string msg = invalid_argument_message([&] { layer.forward(x, true); });
  EXPECT_TRUE(contains(msg, "model.layers.0.self_attn.v_proj") && contains(msg, "generator"))
      << msg;

  // p = 0: training needs no generator and changes nothing.
  QLoraLinear plain("l", tw.q, at::Tensor());
  plain.adapter_set({4, 8.0, 0.0, false}, a, b);
  EXPECT_TRUE(at::equal(plain.forward(x, true), plain.forward(x, false)));
}

// ------------------------------------------------------------------------------------------
// Scale, init, shapes

TEST(LoraConfig, Scale) {
  EXPECT_DOUBLE_EQ((LoraConfig{8, 16.0, 0.0, false}.scale()), 2.0);
  EXPECT_DOUBLE_EQ((LoraConfig{16, 8.0, 0.0, false}.scale()), 0.5);
  EXPECT_DOUBLE_EQ((LoraConfig{16, 8.0, 0.0, true}.scale()), 2.0);  // 8 / sqrt(16)
  EXPECT_DOUBLE_EQ((LoraConfig{2, 3.0, 0.0, true}.scale()), 3.0 / std::sqrt(2.0));
  EXPECT_TRUE(contains(invalid_argument_message([] { LoraConfig{0, 8.0}.scale(); }), "rank 0"));
  EXPECT_TRUE(contains(invalid_argument_message([] {
                         LoraConfig{4, 8.0, 1.0}.validate("here");
                       }),
                       "here: lora_dropout"));
}

TEST(QLoraLinear, RsLoraScaleInForward) {
  const TestWeight tw = weight_make({37, 83, quant::QuantType::nf4, false, at::kByte});
  const at::Tensor a = randn({16, 83}, 32, 0.1), b = randn({37, 16}, 33, 0.1);
  QLoraLinear layer("l", tw.q, at::Tensor());
  layer.adapter_set({16, 8.0, 0.0, true}, a, b);
  const at::Tensor x = randn({3, 83}, 34);
  const at::Tensor lora = layer.forward(x) - at::linear(x, tw.w);
  EXPECT_CLOSE(lora, 2.0 * x.matmul(a.t()).matmul(b.t()), 1e-4, 1e-5);  // the difference cancels
}

TEST(QLoraLinear, ConstructorAndAdapterShapeErrors) {
  const TestWeight tw = weight_make({37, 83, quant::QuantType::nf4, false, at::kByte});
  const std::string name = "model.layers.2.self_attn.k_proj";

  std::string msg = invalid_argument_message([&] { QLoraLinear(name, tw.q, randn({36}, 1)); });
  EXPECT_TRUE(contains(msg, name) && contains(msg, "[36]") && contains(msg, "[37]")) << msg;

  quant::Quantized flat = tw.q;
  flat.state.shape = {37 * 83};
  msg = invalid_argument_message([&] { QLoraLinear(name, flat, at::Tensor()); });
  EXPECT_TRUE(contains(msg, name) && contains(msg, "[3071]") && contains(msg, "2-D")) << msg;

  QLoraLinear layer(name, tw.q, at::Tensor());
  msg = invalid_argument_message([&] {
    layer.adapter_set({4, 8.0}, randn({4, 82}, 1), randn({37, 4}, 2));
  });
  EXPECT_TRUE(contains(msg, name) && contains(msg, "[4, 82]") && contains(msg, "[37, 4]") &&
              contains(msg, "[4, 83]"))
      << msg;
  msg = invalid_argument_message([&] {
    layer.adapter_set({4, 8.0}, randn({4, 83}, 1), randn({4, 37}, 2));
  });
  EXPECT_TRUE(contains(msg, name) && contains(msg, "[4, 83]") && contains(msg, "[4, 37]")) << msg;
  msg = invalid_argument_message(  // rank of the tensors is 4, the config says 8
      [&] {
        layer.adapter_set({8, 8.0}, randn({4, 83}, 1), randn({37, 4}, 2));
      });
  EXPECT_TRUE(contains(msg, name) && contains(msg, "rank 8")) << msg;
  msg = invalid_argument_message([&] {
    layer.adapter_set({4, 8.0, 1.5}, randn({4, 83}, 1), randn({37, 4}, 2));
  });
  EXPECT_TRUE(contains(msg, name) && contains(msg, "lora_dropout")) << msg;
  EXPECT_FALSE(layer.has_adapter()) << "a failed set leaves the layer as it was";

  msg = invalid_argument_message([&] { layer.forward(randn({2, 84}, 1)); });
  EXPECT_TRUE(contains(msg, name) && contains(msg, "[2, 84]") && contains(msg, "83")) << msg;
  msg = invalid_argument_message([&] { qlora_base_matmul(randn({2, 84}, 1), tw.q); });
  EXPECT_TRUE(contains(msg, "[2, 84]") && contains(msg, "[37, 83]")) << msg;
}

TEST(QLoraLinear, AdapterSetConvertsToFp32AndKeepsFp32Storage) {
  const TestWeight tw = weight_make({37, 83, quant::QuantType::nf4, false, at::kByte});
  QLoraLinear layer("l", tw.q, at::Tensor());
  const at::Tensor a = randn({4, 83}, 1), b = randn({37, 4}, 2).to(at::kBFloat16);
  layer.adapter_set({4, 8.0}, a, b);
  EXPECT_EQ(layer.lora_B().scalar_type(), at::kFloat);
  EXPECT_TRUE(at::equal(layer.lora_B().detach(), b.to(at::kFloat)));
  // fp32 input is kept as given (e.g. a view into a flat master-weight buffer).
  EXPECT_EQ(layer.lora_A().data_ptr(), a.data_ptr());
  EXPECT_TRUE(layer.lora_A().requires_grad() && layer.lora_A().is_leaf());
  EXPECT_FALSE(a.requires_grad()) << "the caller's tensor is not changed";
}

// ------------------------------------------------------------------------------------------
// merged_weight

TEST(QLoraLinear, MergedWeight) {
  for (const WeightCase& c : kCases) {
    SCOPED_TRACE(case_name(c));
    const TestWeight tw = weight_make(c);
    QLoraLinear layer("l", tw.q, randn({c.out}, 3));
    EXPECT_TRUE(at::equal(layer.merged_weight(at::kFloat), tw.w)) << "no adapter: W itself";
    const at::Tensor a = randn({4, c.in}, 36, 0.1), b = randn({c.out, 4}, 37, 0.1);
    layer.adapter_set({4, 12.0, 0.1, false}, a, b);
    const at::Tensor want = tw.w + b.matmul(a) * 3.0;
    const at::Tensor merged = layer.merged_weight(at::kFloat);
    EXPECT_FALSE(merged.requires_grad());
    EXPECT_CLOSE(merged, want, kRtolF32, kAtolF32);
    EXPECT_TRUE(at::equal(layer.merged_weight(at::kBFloat16), merged.to(at::kBFloat16)));
    EXPECT_TRUE(at::equal(lora_merge(tw.w, a, b, 3.0), merged)) << "the one merge (export's)";
    // The merged linear computes what the adapted one does (same products, regrouped).
    const at::Tensor x = randn({4, c.in}, 38);
    EXPECT_CLOSE(at::linear(x, merged, layer.bias()), layer.forward(x), 1e-4, 1e-5);
  }
}

// ------------------------------------------------------------------------------------------
// Targets

TEST(LoraTarget, Parse) {
  const std::vector<std::string> all = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                        "gate_proj", "up_proj", "down_proj"};
  EXPECT_EQ(block_linear_names(), all);
  EXPECT_EQ(lora_target_parse("all"), all);
  EXPECT_EQ(lora_target_parse(" all "), all);
  EXPECT_EQ(lora_target_parse("q_proj,v_proj"), (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_EQ(lora_target_parse(" v_proj , q_proj,v_proj "),
            (std::vector<std::string>{"v_proj", "q_proj"}));
  EXPECT_EQ(lora_target_parse("down_proj"), (std::vector<std::string>{"down_proj"}));

  EXPECT_EQ(invalid_argument_message([] { lora_target_parse("q_proj,foo"); }),
            "lora_target 'foo' is not a linear of the model (valid: all, q_proj, k_proj, v_proj, "
            "o_proj, gate_proj, up_proj, down_proj)");
  for (const std::string bad : {"", " ", "q_proj,,v_proj", "q_proj,", "all,q_proj", "Q_PROJ",
                                "lm_head", "self_attn.q_proj"}) {
    const std::string msg = invalid_argument_message([&] { lora_target_parse(bad); });
    EXPECT_TRUE(contains(msg, "lora_target") && contains(msg, "(valid: all, q_proj"))
        << bad << ": " << msg;
  }
}

}  // namespace
}  // namespace qlora::lora
