// The decoder-only model families we train, read from a Hugging Face config.json, and the names
// of their weights (which of them are the block linears that QLoRA quantizes).
#pragma once

#include "io/shape_str.h"

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace qlora::model {

enum class Architecture { llama, mistral, qwen2 };

// RoPE frequency scaling, as transformers' rope_parameters (transformers 5) or rope_scaling (older
// files) holds it. "default": inv_freq = 1 / theta^(2i/d); "linear": inv_freq / factor;
// "llama3" (Llama 3.1+): low frequencies (wavelength > original_max / low_freq_factor) divided
// by factor, high ones (wavelength < original_max / high_freq_factor) kept, smooth in between.
struct RopeScaling {
  std::string rope_type = "default";             // "default", "linear" or "llama3"
  double factor = 1.0;                           // linear, llama3
  double low_freq_factor = 1.0;                  // llama3
  double high_freq_factor = 4.0;                 // llama3
  int64_t original_max_position_embeddings = 0;  // llama3 (max_position_embeddings when absent)
};

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
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  // Biases of the block linears: Qwen2 always has q/k/v biases (no o_proj bias); LLaMA's
  // attention_bias puts them on q/k/v/o and mlp_bias on gate/up/down; Mistral has none.
  bool attention_bias = false;
  bool mlp_bias = false;  // LLaMA only
  // Sliding-window attention (Mistral; Qwen2 with use_sliding_window): a query at position t sees
  // keys t - sliding_window + 1 .. t. 0: none. sliding_layers[i] says whether layer i uses it
  // (all layers for Mistral; Qwen2's layer_types or max_window_layers).
  int64_t sliding_window = 0;
  std::vector<bool> sliding_layers;
  std::string torch_dtype = "float32";

  // The window of layer i (0: full causal attention).
  int64_t attention_window(int64_t layer) const;
  // Whether the block linear `short_name` ("q_proj", ...) has a bias [out].
  bool linear_has_bias(const std::string& short_name) const;
};

// "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM".
std::string supported_architectures();

// Throws std::invalid_argument naming `where` (the config.json path): an architecture we do not
// support names the supported ones; missing or non-positive sizes name the key; an activation
// other than silu, a rope_type other than default / linear / llama3 or an incomplete llama3
// rope_scaling names the key and the value.
ModelConfig model_config_from_json(const nlohmann::json& config, const std::string& where);

// model.layers.{i}.self_attn.{q,k,v,o}_proj.weight and
// model.layers.{i}.mlp.{gate,up,down}_proj.weight
bool is_block_linear_weight(const std::string& name);
// "model.layers.3.self_attn.q_proj" for (3, "q_proj"); "mlp." for gate/up/down_proj.
std::string block_linear_module(int64_t layer, const std::string& short_name);

// Every tensor a checkpoint of this config must hold, with the shape the config implies:
// embeddings, lm_head (unless tied), per layer the two norms, seven linear weights [out, in] and
// the biases the config calls for, and the final norm. Bitsandbytes 4-bit weights are checked
// against these shapes through their quant_state.
std::map<std::string, std::vector<int64_t>> expected_weight_shapes(const ModelConfig& config);

// "[4096, 11008]"
using io::shape_str;

}  // namespace qlora::model
