// `qlora_dist export`: base model (pre-quantized bitsandbytes 4-bit, or plain) + a PEFT LoRA
// adapter -> one merged Hugging Face checkpoint that transformers loads without peft:
//   W' = dequantize(W) + s * B @ A   (computed in fp32, stored in the chosen dtype)
// Everything else (embeddings, norms, biases, lm_head) is converted to that dtype.
#pragma once

#include <ATen/core/ScalarType.h>

#include <string>

namespace qlora::app {

struct ExportOptions {
  std::string model_dir;
  std::string adapter_dir;
  std::string out_dir;
  at::ScalarType dtype = at::kBFloat16;  // bf16, fp16 or fp32
};

struct ExportReport {
  int64_t layers_merged = 0;
  int64_t tensors_written = 0;
  size_t bytes_out = 0;
};

// Like quantize: written beside out_dir first and renamed into place when complete; an existing
// non-empty out_dir is an error.
ExportReport export_merged(const ExportOptions& options);

}  // namespace qlora::app
