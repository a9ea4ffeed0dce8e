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

// Device memory of one rank at its peak on cuda (README, "GPU memory"): the caching allocator's
// peak (metrics.jsonl max_gpu_memory_bytes) is expected below total(). Not yet checked on a GPU
// here; tests/gpu/test_gpu_train.py compares the two where a GPU is visible.
struct DeviceMemoryPlan {
  int64_t shard = 0;           // this rank's base shards at rest
  int64_t lora_state = 0;      // LoRA shard, its gradient and AdamW's two moments: 16 B a parameter
  int64_t gather_buffers = 0;  // (prefetch + 2) x the largest gathered base unit
  int64_t lora_gathered = 0;   // (prefetch + 2) x the largest LoRA unit, fp32, weights and gradient
  int64_t dequantized = 0;     // 2 x the largest block linear in the compute dtype
  int64_t head_fp32 = 0;       // the loss's fp32 lm_head: vocab x hidden x 4
  int64_t activations = 0;     // step_activation_bytes x 1.5 (the GPU runs the unfused block ops)
  int64_t workspace = 64ll << 20;  // cuBLAS workspaces (through the caching allocator)
  int64_t total() const;
  std::string describe() const;  // "shard 12.3 + LoRA state 1.2 + ... = 80.1 MiB"
};

struct DeviceMemoryInputs {
  int64_t shard_bytes = 0;            // resident base bytes of this rank
  int64_t lora_shard_numel = 0;       // fp32 LoRA parameters this rank holds
  int64_t max_base_unit_bytes = 0;    // the largest gathered base unit (padded)
  int64_t max_lora_unit_numel = 0;    // the largest LoRA unit (padded)
  int prefetch = 1;
  int64_t tokens = 0;                 // of one micro-batch (rows x sequence length)
  bool gradient_checkpointing = true;
  int64_t chunk_tokens = 1024;
};
DeviceMemoryPlan device_memory_plan(const model::ModelConfig& c, const ActivationShape& s,
                                    const DeviceMemoryInputs& in);

}  // namespace qlora::train
