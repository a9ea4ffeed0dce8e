// The decoder-only model families we train, read from a Hugging Face config.json, and the names
// of their weights (which of them are the block linears that QLoRA quantizes).
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace qlora::model {

enum class Architecture { llama, mistral, qwen2 };

struct ModelConfig {
  Architecture arch = Architecture::llama;
  std::string architecture;  // "LlamaForCausalLM", ...
  std::string model_type;    // "llama", ...
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v bias (Qwen2 always)
  std::string torch_dtype = "float32";
};

// "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM".
std::string supported_architectures();

// Throws std::invalid_argument naming `where` (the config.json path): an architecture we do not
// support names the supported ones; missing or non-positive sizes name the key.
ModelConfig model_config_from_json(const nlohmann::json& config, const std::string& where);

// model.layers.{i}.self_attn.{q,k,v,o}_proj.weight and model.layers.{i}.mlp.{gate,up,down}_proj.weight
bool is_block_linear_weight(const std::string& name);

}  // namespace qlora::model
