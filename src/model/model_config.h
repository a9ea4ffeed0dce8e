// The decoder-only model families we train, read from a Hugging Face config.json, and the names
// of their weights (which of them are the block linears that QLoRA quantizes).
#pragma once

#include "io/shape_str.h"

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

namespace qlora::model {

enum class Architecture { llama, mistral, qwen2, qwen3, gemma3 };

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
  // Sliding-window attention (Mistral; Qwen2 / Qwen3 with use_sliding_window; Gemma 3's local
  // layers): a query at position t sees keys t - sliding_window + 1 .. t. 0: none.
  // sliding_layers[i] says whether layer i uses it (all layers for Mistral; layer_types, else
  // max_window_layers for Qwen; layer_types, else sliding_window_pattern for Gemma 3).
  int64_t sliding_window = 0;
  std::vector<bool> sliding_layers;
  std::string torch_dtype = "float32";

  // Qwen3 and Gemma 3: an RMSNorm over head_dim on every query and key head before RoPE
  // (model.layers.{i}.self_attn.q_norm / k_norm, [head_dim]).
  bool qk_norm = false;
  // Gemma 3 ("gemma" norms):
  //   - every RMSNorm weight is stored as an offset from one: out = (x32 * rsqrt(..)) *
  //     (1 + w32), cast to x's dtype at the end;
  //   - four norms per block: input_layernorm before attention, post_attention_layernorm on the
  //     attention output before the residual add, pre_feedforward_layernorm before the MLP and
  //     post_feedforward_layernorm on the MLP output before the residual add;
  //   - the embedding multiplied by sqrt(hidden_size) rounded to the compute dtype;
  //   - scores scaled by query_pre_attn_scalar^-0.5 instead of head_dim^-0.5;
  //   - the MLP's activation GELU with the tanh approximation.
  bool gemma_norms = false;
  std::string hidden_act = "silu";      // "silu" or "gelu_pytorch_tanh"
  double embed_scale = 0.0;             // 0: none (Gemma 3: sqrt(hidden_size))
  double query_pre_attn_scalar = 0.0;   // 0: head_dim (scores * query_pre_attn_scalar^-0.5)
  // Gemma 3's local (sliding) layers have their own RoPE: rope_parameters.sliding_attention (or
  // rope_local_base_freq of older files, default scaling). sliding_rope_theta 0: every layer
  // uses rope_theta / rope_scaling.
  double sliding_rope_theta = 0.0;
  RopeScaling sliding_rope_scaling;
  // Where the checkpoint keeps the decoder's tensors and where peft names its modules: "" for
  // the *ForCausalLM models (model.embed_tokens, model.layers.{i}, ...: the names used
  // everywhere inside), "model.language_model." for Gemma3ForConditionalGeneration, whose
  // model.X is stored as model.language_model.X (transformers 5) or language_model.model.X (the
  // published files) and whose adapter modules are model.language_model.layers.{i}....
  std::string weights_prefix;

  // The window of layer i (0: full causal attention).
  int64_t attention_window(int64_t layer) const;
  // Whether the block linear `short_name` ("q_proj", ...) has a bias [out].
  bool linear_has_bias(const std::string& short_name) const;
  // The RoPE base and scaling of layer i (Gemma 3's local layers have their own).
  double layer_rope_theta(int64_t layer) const;
  const RopeScaling& layer_rope_scaling(int64_t layer) const;
  // Attention score scale: query_pre_attn_scalar^-0.5 (Gemma 3), else head_dim^-0.5.
  double attention_scaling() const;
};

// The RMSNorm weights of every block, by name under model.layers.{i}. with their size:
// input_layernorm and post_attention_layernorm [hidden]; Gemma 3's pre_feedforward_layernorm and
// post_feedforward_layernorm [hidden]; self_attn.q_norm and self_attn.k_norm [head_dim] (Qwen3,
// Gemma 3). In this order (the order of a block unit's segments).
std::vector<std::pair<std::string, int64_t>> block_norms(const ModelConfig& config);

// "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM,
// Gemma3ForConditionalGeneration (its language model)".
std::string supported_architectures();
// The inside name ("model.layers.0....") of a stored tensor name: for a weights_prefix, both
// stored spellings of the decoder's tensors map back to model.X; anything else (a vision tower's
// tensors) is returned as it is.
std::string canonical_weight_name(const ModelConfig& config, const std::string& stored);
// What the decoder does for this config, in one line: "Gemma3ForCausalLM: GELU-tanh MLP, q/k
// norm, (1 + w) norms x4 per block, embeddings x sqrt(hidden), scores x query_pre_attn_scalar^-0.5
// (256); 22 of 26 layers local (window 512, rope base 10000), global rope base 1e+06, tied".
std::string architecture_summary(const ModelConfig& config);

// Gemma3ForConditionalGeneration: its text_config (under Gemma3TextConfig's defaults), with
// weights_prefix set. Throws std::invalid_argument naming `where` (the config.json path): an architecture we do not
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
// embeddings, lm_head (unless tied), per layer its norms (block_norms), seven linear weights [out, in] and
// the biases the config calls for, and the final norm. Bitsandbytes 4-bit weights are checked
// against these shapes through their quant_state.
std::map<std::string, std::vector<int64_t>> expected_weight_shapes(const ModelConfig& config);

// "[4096, 11008]"
using io::shape_str;

}  // namespace qlora::model
