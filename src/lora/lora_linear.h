// The QLoRA linear: a frozen 4-bit base weight W [out, in] (bitsandbytes layout, never kept
// dequantized), an optional bias, and an optional LoRA adapter A [r, in], B [out, r]:
//   y[M, out] = x[M, in] @ W^T + b + s * (dropout(x) @ A^T) @ B^T,   s = alpha / r
//   (alpha / sqrt(r) with rsLoRA)
// The base product runs through a custom autograd function that saves only the packed weight
// and dequantizes it again in backward to get dL/dx (bitsandbytes' MatMul4Bit does the same);
// the base never receives a gradient. A and B are fp32 master weights with requires_grad.
#pragma once

#include "lora/lora_target.h"

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "quant/quantize.h"

namespace qlora::lora {

struct LoraConfig {
  int64_t rank = 8;
  double alpha = 16.0;
  double dropout = 0.0;
  bool use_rslora = false;
  double scale() const;  // alpha / rank, or alpha / sqrt(rank) with use_rslora
  // Throws std::invalid_argument, naming `where`, unless rank >= 1, alpha finite and
  // 0 <= dropout < 1.
  void validate(const std::string& where) const;
};

// W' = W + s * B @ A in fp32, peft's merge: weight [out, in] (any float dtype), A [r, in],
// B [out, r]; no autograd. The one merge, of QLoraLinear::merged_weight and `qlora_dist export`.
at::Tensor lora_merge(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                      double scale);

// x @ W^T for a packed 4-bit W, in x's dtype, through the custom autograd function described
// above (gradient for x only). `weight` must hold a 2-D state [out, in].
at::Tensor qlora_base_matmul(const at::Tensor& x, const quant::Quantized& weight);

// Where a late-bound linear finds its base weight when its backward runs: the linear bound at that
// moment (a trainer without recompute binds each block's gathered weights again for the
// backward). Returns nullptr when none is bound, which the backward reports as std::logic_error.
using WeightSource = std::function<const quant::Quantized*()>;

class QLoraLinear {
 public:
  // base: the quantized weight, state shape [out_features, in_features]. bias: [out] or undefined.
  QLoraLinear(std::string name, quant::Quantized base, at::Tensor bias);

  const std::string& name() const { return name_; }  // e.g. model.layers.0.self_attn.q_proj
  int64_t in_features() const { return in_features_; }
  int64_t out_features() const { return out_features_; }
  const quant::Quantized& base() const { return base_; }
  const at::Tensor& bias() const { return bias_; }

  // Sets the adapter from given tensors (A [r, in], B [out, r]); throws std::invalid_argument
  // naming this layer and both shapes when they do not fit. fp32 tensors on the base's device
  // are kept as given (detached, sharing storage: e.g. views into a flat master-weight buffer);
  // other float dtypes are converted to fp32.
  void adapter_set(const LoraConfig& config, const at::Tensor& lora_A, const at::Tensor& lora_B);
  bool has_adapter() const { return lora_A_.defined(); }
  const LoraConfig& adapter_config() const { return config_; }
  at::Tensor& lora_A() { return lora_A_; }  // [r, in] fp32
  at::Tensor& lora_B() { return lora_B_; }  // [out, r] fp32
  const at::Tensor& lora_A() const { return lora_A_; }
  const at::Tensor& lora_B() const { return lora_B_; }

  // x [..., in] in the compute dtype -> [..., out] in the same dtype. Dropout on the adapter
  // input only when `training` (mask from `dropout_gen`, which may be null for p = 0; with
  // p > 0 a missing generator is std::invalid_argument, so runs stay deterministic by seed).
  at::Tensor forward(const at::Tensor& x, bool training = false,
                     std::optional<at::Generator> dropout_gen = std::nullopt) const;

  // Late binding: the autograd node of the base product keeps `source` (and the weight's shape)
  // instead of the packed weight and its state, and asks `source` for the weight in backward.
  // For graphs that live longer than the buffer the weight is a view of (no recompute: the
  // gathered unit goes back to its pool after the forward). Unset: the node keeps the weight.
  void set_weight_source(WeightSource source) {
    weight_source_ = source ? std::make_shared<WeightSource>(std::move(source)) : nullptr;
  }
  // lora_merge(dequantize(W), A, B, s) in `dtype` (W itself without an adapter).
  at::Tensor merged_weight(at::ScalarType dtype) const;

 private:
  std::string name_;
  quant::Quantized base_;
  at::Tensor bias_;
  int64_t in_features_ = 0;
  int64_t out_features_ = 0;
  LoraConfig config_;
  at::Tensor lora_A_;
  at::Tensor lora_B_;
  std::shared_ptr<const WeightSource> weight_source_;
};

}  // namespace qlora::lora
