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
  bool upcast_layernorm = false;
  int64_t lora_rank = 8;
  std::vector<std::string> lora_targets;  // short names of the adapted linears ("q_proj", ...)
  bool lora_dropout = false;
};

// Bytes one token's pass through one block leaves in its autograd graph (gradient_checkpointing
// = false keeps this for every block): the block input, the norms' fp32 inputs (where the compute
// dtype is not fp32) and outputs, q / k / v after RoPE, the attention output (twice: the kernel's
// and its reshaped copy for o_proj), the MLP's gate, up, activation and product, the LoRA inputs
// of rank r, and dropout masks. Never the base weights (they are dequantized again in backward).
int64_t block_activation_bytes_per_token(const model::ModelConfig& c, const ActivationShape& s);

// The activations a step holds at its peak for `tokens` tokens of one micro-batch:
//   recompute:    tokens * (L * hidden * dtype size  +  one block's graph)
//   no recompute: tokens * L * one block's graph
// plus the logits of one loss chunk (chunk_rows x vocab fp32, twice: forward and gradient).
int64_t step_activation_bytes(const model::ModelConfig& c, const ActivationShape& s,
                              int64_t tokens, bool gradient_checkpointing, int64_t chunk_tokens);

}  // namespace qlora::train
