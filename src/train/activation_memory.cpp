#include "train/activation_memory.h"

#include <c10/core/ScalarType.h>

#include <algorithm>

namespace qlora::train {

int64_t block_activation_bytes_per_token(const model::ModelConfig& c, const ActivationShape& s) {
  const int64_t e = static_cast<int64_t>(c10::elementSize(s.compute_dtype));
  const int64_t f32 = 4;
  const int64_t hidden = c.hidden_size, ffn = c.intermediate_size;
  const int64_t q = c.num_attention_heads * c.head_dim, kv = c.num_key_value_heads * c.head_dim;
  const int64_t norms = c.gemma_norms ? 4 : 2;
  // Block input; per norm its output, and its fp32 input copy unless the compute dtype is fp32.
  int64_t bytes = hidden * e + norms * hidden * (e + (e == f32 ? 0 : f32));
  if (c.qk_norm) bytes += (q + kv) * (e + (e == f32 ? 0 : f32));
  bytes += (q + 2 * kv) * e;  // q, k after RoPE and v: the attention's inputs
  bytes += 2 * q * e;         // the attention output and its [T, heads * D] copy (o_proj input)
  bytes += c.num_attention_heads * f32;  // the attention's log-sum-exp per head
  bytes += 4 * ffn * e;                  // gate, up, act(gate), act(gate) * up
  // LoRA: the rank-r intermediate of each adapted linear (fp32), the fp32 copy of its input
  // where the compute dtype is not fp32, and a dropout mask per adapted linear.
  for (const std::string& t : s.lora_targets) {
    const int64_t in = t == "o_proj" ? q : t == "down_proj" ? ffn : hidden;
    bytes += s.lora_rank * f32;
    if (e != f32) bytes += in * f32;        // the input cast to lora_A's dtype
    if (s.lora_dropout) bytes += 2 * in * f32;  // the mask and the masked input
  }
  return bytes;
}

int64_t step_activation_bytes(const model::ModelConfig& c, const ActivationShape& s,
                              int64_t tokens, bool gradient_checkpointing, int64_t chunk_tokens) {
  const int64_t e = static_cast<int64_t>(c10::elementSize(s.compute_dtype));
  const int64_t block = block_activation_bytes_per_token(c, s);
  const int64_t layers = c.num_hidden_layers;
  const int64_t per_token = gradient_checkpointing ? layers * c.hidden_size * e + block
                                                   : layers * block;
  const int64_t chunk = std::min(tokens, std::max<int64_t>(chunk_tokens, 1));
  return tokens * per_token + 2 * chunk * c.vocab_size * 4;
}

}  // namespace qlora::train
