// PEFT adapter files, named and shaped exactly as peft writes them:
//   adapter_config.json       {"peft_type": "LORA", "r", "lora_alpha", "lora_dropout",
//                              "target_modules", "bias": "none", "task_type": "CAUSAL_LM",
//                              "base_model_name_or_path", "use_rslora", ...}
//   adapter_model.safetensors base_model.model.<layer name>.lora_A.weight [r, in]
//                             base_model.model.<layer name>.lora_B.weight [out, r]
// where <layer name> is e.g. model.layers.0.self_attn.q_proj.
#pragma once

#include <map>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "lora/lora_linear.h"

namespace qlora::lora {

struct PeftAdapter {
  LoraConfig config;
  std::vector<std::string> target_modules;  // q_proj, ...
  std::string base_model_name_or_path;
  std::map<std::string, std::pair<at::Tensor, at::Tensor>> weights;  // layer name -> (A, B)
  // Where the base model keeps the decoder (model::ModelConfig::weights_prefix): "" for the
  // *ForCausalLM models; "model.language_model." (or "language_model.model.", older files) for
  // Gemma3ForConditionalGeneration. `weights` always names layers model.layers.{i}...; the file
  // names them <module_prefix>layers.{i}... and its target_modules is then a regex over the
  // language model's linears only (peft would otherwise also wrap the vision tower's q/k/v_proj).
  std::string module_prefix;
};

// Writes both files into dir (created if needed; files written to temporary names first).
void peft_adapter_write(const std::string& dir, const PeftAdapter& adapter);
// Reads both files; throws std::invalid_argument naming the file and key for anything peft would
// not have written (not LORA, bias other than none, missing A or B of a layer, rank mismatch).
PeftAdapter peft_adapter_read(const std::string& dir);

}  // namespace qlora::lora
