// The one reader of a Hugging Face model directory, for every loader (DecoderModel::load and the
// sharded trainer's Hugging Face unit source): config.json (HfConfig, ModelConfig), the
// safetensors weights, whether the checkpoint is bitsandbytes 4-bit pre-quantized; every tensor
// the config implies checked before any is read; plain tensors by name, and each block linear as
// quant::Quantized, read from its bitsandbytes tensors (with their checks) or quantized on load.
// What a loader accepts beyond that (quantization methods, 4-bit settings) is its own policy.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <optional>
#include <string>

#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/model_config.h"
#include "quant/quantize.h"

namespace qlora::model {

class ModelReader {
 public:
  // Reads config.json only, so that a caller refuses what it cannot take (a quantization method)
  // in its own words before any weight file is opened. Throws naming the file.
  explicit ModelReader(const std::string& dir);
  const std::string& dir() const { return dir_; }
  const io::HfConfig& hf_config() const { return hf_; }
  const ModelConfig& config() const { return config_; }
  // config.json says bitsandbytes 4-bit: block linears with a quant_state are read as stored.
  bool prequantized() const;

  // Opens the safetensors files and checks every tensor config() implies, before any is read:
  // present; a usable dtype (F32, BF16 or F16 for a linear to quantize, also F64 for the others);
  // the shape config.json implies (a 4-bit linear's from its quant_state). Throws
  // std::invalid_argument naming the directory, the tensor and both shapes. A checkpoint that is
  // neither unquantized nor bitsandbytes 4-bit is std::logic_error: the caller refuses it first.
  void weights_open();

  // Whether block linear weight `weight_name` is stored 4-bit (a bitsandbytes checkpoint may keep
  // some unquantized, as llm_int8_skip_modules does).
  bool linear_is_quantized(const std::string& weight_name) const;
  // A tensor as stored (an owned CPU copy). "lm_head.weight" of a tied model is the embedding.
  at::Tensor tensor(const std::string& name);
  // A block linear weight: its bitsandbytes tensors, cross-checked (errors name dir()), or the
  // stored weight quantized with `quant`.
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
};

}  // namespace qlora::model
