// The one reader of a Hugging Face model directory, for every loader (DecoderModel::load and the
// sharded trainer's Hugging Face unit source): config.json (HfConfig, ModelConfig), the
// safetensors weights, whether the checkpoint is bitsandbytes 4-bit pre-quantized; every tensor
// the config implies checked before any is read; plain tensors by name, and each block linear as
// quant::Quantized, read from its bitsandbytes tensors (with their checks) or quantized on load.
// FP8 and MXFP4 checkpoints (quant/fp8_mxfp4.h) are dequantized here, one linear at a time, into
// the dtype transformers' dequantizing loader gives, so every loader takes them like a float model.
// What a loader accepts beyond that (quantization methods, 4-bit settings) is its own policy.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/model_config.h"
#include "quant/fp8_mxfp4.h"
#include "quant/quantize.h"

namespace qlora::model {

class ModelReader {
 public:
  // Reads config.json only, so that a caller refuses what it cannot take (a quantization method)
  // in its own words before any weight file is opened; an fp8 / mxfp4 quantization_config is
  // checked here (quant::dequant_format_from). Throws naming the file.
  explicit ModelReader(const std::string& dir);
  const std::string& dir() const { return dir_; }
  const io::HfConfig& hf_config() const { return hf_; }
  const ModelConfig& config() const { return config_; }
  // config.json says bitsandbytes 4-bit: block linears with a quant_state are read as stored.
  bool prequantized() const;
  // config.json says fp8 or mxfp4: block linears stored so are dequantized on load.
  bool dequantizes() const { return dequant_.has_value(); }
  const quant::DequantFormat& dequant_format() const;  // std::logic_error unless dequantizes()

  // Opens the safetensors files and checks every tensor config() implies, before any is read:
  // present; a usable dtype (F32, BF16 or F16 for a linear to quantize, also F64 for the others);
  // the shape config.json implies (a 4-bit linear's from its quant_state; an FP8 / MXFP4 linear's
  // from its stored tensors, quant::dequant_source_check). Throws std::invalid_argument naming
  // the directory, the tensor and both shapes. A checkpoint that is neither unquantized,
  // bitsandbytes 4-bit, fp8 nor mxfp4 is std::logic_error: the caller refuses it first.
  void weights_open();
  // The dtype dequantized linears get (after weights_open): config.json's dtype (torch_dtype),
  // else the embedding's stored dtype, as transformers' dtype="auto" takes the first float tensor.
  at::ScalarType dequant_dtype() const { return dequant_dtype_; }
  // The stored tensors block linear `weight_name` is dequantized from (weight and scales, blocks
  // and scales, an unused activation_scale); empty when it is stored as it is.
  std::vector<std::string> dequant_sources(const std::string& weight_name) const;

  // Whether block linear weight `weight_name` is stored 4-bit (a bitsandbytes checkpoint may keep
  // some unquantized, as llm_int8_skip_modules does).
  bool linear_is_quantized(const std::string& weight_name) const;
  // A tensor as stored (an owned CPU copy). "lm_head.weight" of a tied model is the embedding.
  at::Tensor tensor(const std::string& name);
  // A float block linear weight [out, in]: as stored, or dequantized from FP8 / MXFP4.
  at::Tensor linear_weight(const std::string& weight_name);
  // A block linear weight: its bitsandbytes tensors, cross-checked (errors name dir()), or
  // linear_weight() quantized with `quant`.
  quant::Quantized linear(const std::string& weight_name, const quant::QuantizeOptions& quant);
  // Bytes of the tensors tensor() and linear() have read (not the quant_state JSON that
  // weights_open checks).
  size_t bytes_read() const { return bytes_read_; }

 private:
  const io::ModelWeights& weights() const;  // std::logic_error before weights_open

  std::string dir_;
  io::HfConfig hf_;
  ModelConfig config_;
  std::optional<io::ModelWeights> weights_;
  size_t bytes_read_ = 0;
  std::optional<quant::DequantFormat> dequant_;
  at::ScalarType dequant_dtype_ = at::kFloat;
  struct DequantLinear {
    std::vector<int64_t> shape;        // [out, in]
    std::vector<std::string> tensors;  // quant::DequantSource::tensors
  };
  std::map<std::string, DequantLinear> dequant_linears_;  // weight name -> how it is read
};

}  // namespace qlora::model
