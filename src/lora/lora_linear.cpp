// The QLoRA linear and its base-product autograd function:
//   y[M, out] = x[M, in] @ W^T + b + (s * ((dropout(x) @ A^T) @ B^T)).to(x dtype)
// with W [out, in] dequantized from 4-bit for each product and dropped right after, A [r, in] and
// B [out, r] fp32. This is peft's LoRA forward on a bitsandbytes Linear4bit, step for step.
#include "lora/lora_linear.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>

#include "lora/qlora_base_matmul.h"
#include "quant/tensor_io.h"

namespace qlora::lora {

namespace {

using quant::shape_str;

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// The quantization state travels in ctx->saved_data as plain IValues (no custom classes), so a
// test can list every tensor the node keeps.
void state_save(torch::autograd::AutogradContext* ctx, const quant::Quantized& w) {
  auto& d = ctx->saved_data;
  d["packed"] = w.packed;
  d["shape"] = w.state.shape;
  d["blocksize"] = static_cast<int64_t>(w.state.blocksize);
  d["quant_type"] = static_cast<int64_t>(w.state.quant_type);
  d["dtype"] = w.state.dtype;
  d["absmax"] = w.state.absmax;
  d["code"] = w.state.code;
  d["nested"] = w.state.is_nested();
  if (w.state.is_nested()) {
    d["nested_absmax"] = w.state.nested->absmax;
    d["nested_code"] = w.state.nested->code;
    d["nested_blocksize"] = static_cast<int64_t>(w.state.nested->blocksize);
    d["nested_offset"] = static_cast<double>(w.state.nested->offset);
  }
}

quant::Quantized state_load(torch::autograd::AutogradContext* ctx) {
  auto& d = ctx->saved_data;
  quant::Quantized w;
  w.packed = d.at("packed").toTensor();
  w.state.shape = d.at("shape").toIntVector();
  w.state.blocksize = static_cast<int32_t>(d.at("blocksize").toInt());
  w.state.quant_type = static_cast<quant::QuantType>(d.at("quant_type").toInt());
  w.state.dtype = d.at("dtype").toScalarType();
  w.state.absmax = d.at("absmax").toTensor();
  w.state.code = d.at("code").toTensor();
  if (d.at("nested").toBool()) {
    quant::NestedState nested;
    nested.absmax = d.at("nested_absmax").toTensor();
    nested.code = d.at("nested_code").toTensor();
    nested.blocksize = static_cast<int32_t>(d.at("nested_blocksize").toInt());
    nested.offset = static_cast<float>(d.at("nested_offset").toDouble());
    w.state.nested = nested;
  }
  return w;
}

// A weight source in ctx->saved_data (an IValue capsule).
struct SourceHolder : torch::CustomClassHolder {
  std::shared_ptr<const WeightSource> source;
};

}  // namespace

// ------------------------------------------------------------------------------------------
// LoraConfig

double LoraConfig::scale() const {
  if (rank < 1) throw std::invalid_argument("LoRA rank " + std::to_string(rank) + " must be >= 1");
  return use_rslora ? alpha / std::sqrt(static_cast<double>(rank))
                    : alpha / static_cast<double>(rank);
}

void LoraConfig::validate(const std::string& where) const {
  if (rank < 1)
    throw std::invalid_argument(where + ": LoRA rank " + std::to_string(rank) + " must be >= 1");
  if (!std::isfinite(alpha))
    throw std::invalid_argument(where + ": lora_alpha must be a finite number");
  if (!(dropout >= 0.0 && dropout < 1.0))
    throw std::invalid_argument(where + ": lora_dropout " + std::to_string(dropout) +
                                " must be in [0, 1)");
}

// ------------------------------------------------------------------------------------------
// QLoraBaseMatmul

// W for one product. On the CPU it goes into one reusable buffer per thread and dtype, sized
// for the largest weight seen: a fresh [out, in] tensor per call would come from a new mmap and
// page-fault on every 4 KiB (~33 ms per 64 MiB here, more than the dequantize itself; see
// bench/README.md). The buffer is overwritten by the next product, so the returned view must
// not outlive the matmul it feeds. Elsewhere the device's caching allocator does this already.
static at::Tensor dequantize_for_product(const quant::Quantized& w, at::ScalarType dtype) {
  if (!w.packed.device().is_cpu() || (dtype != at::kFloat && dtype != at::kBFloat16))
    return quant::dequantize_4bit(w.packed, w.state, dtype);
  thread_local at::Tensor buffer_fp32, buffer_bf16;
  at::Tensor& buffer = dtype == at::kFloat ? buffer_fp32 : buffer_bf16;
  const int64_t n = w.state.numel();
  if (!buffer.defined() || buffer.numel() < n)
    buffer = at::empty({n}, at::TensorOptions().dtype(dtype));
  at::Tensor out = buffer.narrow(0, 0, n).view(w.state.shape);
  quant::dequantize_4bit_into(w.packed, w.state, out);
  return out;
}

at::Tensor QLoraBaseMatmul::forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                    const std::optional<at::Tensor>& bias,
                                    const quant::Quantized* weight,
                                    const std::shared_ptr<const WeightSource>& source) {
  // Grad mode is off in here: W is a plain temporary, freed when this scope ends.
  at::Tensor y;
  {
    const at::Tensor w = dequantize_for_product(*weight, x.scalar_type());
    y = at::linear(x, w, bias);  // [..., out]
  }
  if (source) {
    auto holder = c10::make_intrusive<SourceHolder>();
    holder->source = source;
    ctx->saved_data["source"] = c10::IValue::make_capsule(std::move(holder));
    ctx->saved_data["shape"] = weight->state.shape;
  } else {
    state_save(ctx, *weight);
  }
  ctx->saved_data["x_dtype"] = x.scalar_type();
  ctx->saved_data["has_bias"] = bias.has_value();
  return y;
}

torch::autograd::variable_list QLoraBaseMatmul::backward(
    torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grad_outputs) {
  const at::Tensor& grad_y = grad_outputs[0];  // [..., out]
  at::Tensor grad_x, grad_bias;
  if (ctx->needs_input_grad(0)) {
    const at::ScalarType dtype = ctx->saved_data.at("x_dtype").toScalarType();
    at::Tensor weight;  // [out, in]
    if (ctx->saved_data.count("source")) {
      const auto holder = c10::static_intrusive_pointer_cast<SourceHolder>(
          ctx->saved_data.at("source").toCapsule());
      const quant::Quantized* w = (*holder->source)();
      const std::vector<int64_t> shape = ctx->saved_data.at("shape").toIntVector();
      if (w == nullptr || !w->packed.defined() || w->state.shape != shape)
        throw std::logic_error(
            "QLoraBaseMatmul backward: the late-bound weight " + shape_str(shape) +
            " is not bound (bind the block's weights again before its backward)");
      weight = dequantize_for_product(*w, dtype);
    } else {
      weight = dequantize_for_product(state_load(ctx), dtype);
    }
    grad_x = at::matmul(grad_y, weight);  // [..., in]
  }
  if (ctx->saved_data.at("has_bias").toBool() && ctx->needs_input_grad(1))
    grad_bias = grad_y.reshape({-1, grad_y.size(-1)}).sum(0);  // [out]
  return {grad_x, grad_bias, at::Tensor(), at::Tensor()};
}

at::Tensor qlora_base_matmul(const at::Tensor& x, const quant::Quantized& weight) {
  if (weight.state.shape.size() != 2)
    throw std::invalid_argument("qlora_base_matmul: the weight's state shape " +
                                shape_str(weight.state.shape) + " is not 2-D [out, in]");
  if (!is_float_dtype(x.scalar_type()) || x.dim() < 1 || x.size(-1) != weight.state.shape[1])
    throw std::invalid_argument("qlora_base_matmul: x " + shape_str(x.sizes()) + " " +
                                c10::toString(x.scalar_type()) + " does not fit the weight " +
                                shape_str(weight.state.shape) + " (expected a float tensor [..., " +
                                std::to_string(weight.state.shape[1]) + "])");
  return QLoraBaseMatmul::apply(x, std::optional<at::Tensor>(), &weight,
                                std::shared_ptr<const WeightSource>());
}

// ------------------------------------------------------------------------------------------
// QLoraLinear

QLoraLinear::QLoraLinear(std::string name, quant::Quantized base, at::Tensor bias)
    : name_(std::move(name)), base_(std::move(base)), bias_(std::move(bias)) {
  const auto& shape = base_.state.shape;
  if (shape.size() != 2)
    throw std::invalid_argument(name_ + ": the quantized weight has shape " + shape_str(shape) +
                                ", a linear needs a 2-D [out_features, in_features] weight");
  base_.state.validate(name_);
  if (!base_.packed.defined() ||
      quant::packed_bytes(base_.packed).numel() < (base_.state.numel() + 1) / 2)
    throw std::invalid_argument(name_ + ": the packed weight holds fewer than the " +
                                std::to_string((base_.state.numel() + 1) / 2) +
                                " bytes its shape " + shape_str(shape) + " needs");
  out_features_ = shape[0];
  in_features_ = shape[1];
  if (bias_.defined() && (bias_.dim() != 1 || bias_.size(0) != out_features_))
    throw std::invalid_argument(name_ + ": bias has shape " + shape_str(bias_.sizes()) +
                                ", expected [" + std::to_string(out_features_) + "]");
}

void QLoraLinear::adapter_set(const LoraConfig& config, const at::Tensor& lora_A,
                              const at::Tensor& lora_B) {
  config.validate(name_);
  const bool a_ok = lora_A.defined() && lora_A.dim() == 2 && lora_A.size(0) == config.rank &&
                    lora_A.size(1) == in_features_ && is_float_dtype(lora_A.scalar_type());
  const bool b_ok = lora_B.defined() && lora_B.dim() == 2 && lora_B.size(0) == out_features_ &&
                    lora_B.size(1) == config.rank && is_float_dtype(lora_B.scalar_type());
  if (!a_ok || !b_ok) {
    auto describe = [](const at::Tensor& t) {
      return t.defined() ? shape_str(t.sizes()) + " " + c10::toString(t.scalar_type())
                         : std::string("undefined");
    };
    throw std::invalid_argument(
        name_ + ": LoRA weights lora_A " + describe(lora_A) + " and lora_B " + describe(lora_B) +
        " do not fit this layer; rank " + std::to_string(config.rank) + " needs lora_A [" +
        std::to_string(config.rank) + ", " + std::to_string(in_features_) + "] and lora_B [" +
        std::to_string(out_features_) + ", " + std::to_string(config.rank) + "] (float)");
  }
  // fp32 tensors on the right device are kept as given (sharing storage, e.g. views into a flat
  // buffer); anything else is converted.
  const at::Device device = base_.packed.device();
  config_ = config;
  lora_A_ = lora_A.detach().to(device, at::kFloat).requires_grad_(true);
  lora_B_ = lora_B.detach().to(device, at::kFloat).requires_grad_(true);
}

at::Tensor QLoraLinear::forward(const at::Tensor& x, bool training,
                                std::optional<at::Generator> dropout_gen) const {
  if (!is_float_dtype(x.scalar_type()) || x.dim() < 1 || x.size(-1) != in_features_)
    throw std::invalid_argument(name_ + ": input " + shape_str(x.sizes()) + " " +
                                c10::toString(x.scalar_type()) + " does not fit; expected a " +
                                "float tensor [..., " + std::to_string(in_features_) + "]");
  // bitsandbytes' Linear4bit casts its bias to the input's dtype.
  std::optional<at::Tensor> bias;
  if (bias_.defined()) bias = bias_.to(x.scalar_type());
  at::Tensor result = QLoraBaseMatmul::apply(x, bias, &base_, weight_source_);  // [..., out]
  if (!has_adapter()) return result;

  at::Tensor xa = x.to(lora_A_.scalar_type());  // peft casts the input to lora_A's dtype
  const double p = config_.dropout;
  if (training && p > 0.0) {
    // The default generator would make a run depend on everything else that draws from it.
    if (!dropout_gen.has_value() || !dropout_gen->defined())
      throw std::invalid_argument(name_ + ": lora_dropout " + std::to_string(p) +
                                  " in training needs a dropout generator (none was given)");
    // at::dropout's CPU path: noise = bernoulli(1 - p) / (1 - p); x * noise.
    at::Tensor noise = at::empty(xa.sizes(), xa.options());
    {
      at::NoGradGuard no_grad;
      noise.bernoulli_(1.0 - p, dropout_gen);
      noise.div_(1.0 - p);
    }
    xa = xa * noise;
  }
  const at::Tensor lora = at::linear(at::linear(xa, lora_A_), lora_B_) * config_.scale();
  return result + lora.to(result.scalar_type());
}

at::Tensor QLoraLinear::merged_weight(at::ScalarType dtype) const {
  at::Tensor w = quant::dequantize_4bit(base_.packed, base_.state, at::kFloat);  // [out, in]
  if (has_adapter()) w = lora_merge(w, lora_A_, lora_B_, config_.scale());
  return w.to(dtype);
}

at::Tensor lora_merge(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                      double scale) {
  at::NoGradGuard no_grad;
  return weight.to(at::kFloat) +
         at::matmul(lora_B.to(at::kFloat), lora_A.to(at::kFloat)) * scale;  // peft's order
}

}  // namespace qlora::lora
