// Random-initialized LLaMA-architecture models in Hugging Face format (config.json +
// model.safetensors), deterministic by seed: the demo and test models.
//   tiny:  hidden 256, 4 layers, GQA 8/4 heads, vocab 2048, untied   (3.95M params, fp32)
//   small: hidden 768, 12 layers, GQA 12/4 heads, vocab 32000, tied  (100.1M params, bf16)
#pragma once

#include <cstdint>
#include <string>

#include "model/model_config.h"

namespace qlora::model {

ModelConfig preset_config(const std::string& preset);  // throws naming the valid presets

struct InitReport {
  int64_t num_params = 0;
  size_t nbytes = 0;  // of model.safetensors
};

// Writes config.json and model.safetensors into out_dir (created if needed). Weights as
// transformers initializes them: linears and embeddings N(0, 0.02), RMSNorm weights 1, biases
// (when the config has them) 0.
InitReport init_model_write(const ModelConfig& config, uint64_t seed, const std::string& out_dir);

// config.json text as transformers writes it for this config.
std::string model_config_json(const ModelConfig& config);

}  // namespace qlora::model
