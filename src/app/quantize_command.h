// `qlora_dist quantize`: a Hugging Face model directory -> a pre-quantized bitsandbytes 4-bit
// checkpoint that transformers loads with from_pretrained. Block linears are quantized;
// embeddings, norms, biases and lm_head are copied as they are.
#pragma once

#include <cstdint>
#include <string>

#include "quant/quantize.h"

namespace qlora::app {

struct QuantizeCommandOptions {
  std::string model_dir;
  std::string out_dir;
  quant::QuantizeOptions quant;
};

struct QuantizeReport {
  int64_t tensors_quantized = 0;
  int64_t tensors_copied = 0;
  int64_t params_quantized = 0;
  size_t bytes_in = 0;   // weight bytes read
  size_t bytes_out = 0;  // model.safetensors written
  double seconds = 0.0;
};

// Writes everything into a temporary directory beside out_dir and renames it into place only
// when the whole run succeeded; an existing non-empty out_dir is an error, never overwritten.
QuantizeReport quantize_model_dir(const QuantizeCommandOptions& options);

}  // namespace qlora::app
