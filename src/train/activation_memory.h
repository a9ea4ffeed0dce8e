// Activation memory of a training micro-batch, estimated from the model's shapes: what the
// autograd graph of one decoder block keeps per token (the tensors its backward reads), and how
// much of it a step holds with and without recompute. The trainer refuses, before any heavy work,
// a configuration whose estimate exceeds a share of the node's memory (train_command.cpp).
#pragma once

#include <ATen/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <vector>

#include "model/model_config.h"

namespace qlora::train {

struct ActivationShape {
  at::ScalarType compute_dtype = at::kFloat;
  int64_t lora_rank = 8;
  std::vector<std::string> lora_targets;  // short names of the adapted linears ("q_proj", ...)
  bool lora_dropout = false;
};

// Bytes one token's pass through one block leaves in its autograd graph (gradient_checkpointing
// = false keeps this for every block): 1.6x the tensors counted in the .cpp (block input,
// residual sum, norm outputs, q / k / v after RoPE, attention output twice, gate, up, product,
// LoRA intermediates, fp32 copies and dropout masks), the factor measured on SmolLM2 (README,
// "Sharded training"). Never the base weights (they are dequantized again in backward).
int64_t block_activation_bytes_per_token(const model::ModelConfig& c, const ActivationShape& s);

// The activations a step holds at its peak for `tokens` tokens of one micro-batch:
//   recompute:    tokens * (L * hidden * dtype size  +  one block's graph)
//   no recompute: tokens * L * one block's graph
// plus the logits of one loss chunk (chunk_rows x vocab fp32, twice: forward and gradient).
int64_t step_activation_bytes(const model::ModelConfig& c, const ActivationShape& s,
                              int64_t tokens, bool gradient_checkpointing, int64_t chunk_tokens);

}  // namespace qlora::train
