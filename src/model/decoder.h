// Decoder-only LLaMA-family model (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
// Qwen3ForCausalLM, Gemma3ForCausalLM) on libtorch, with every block linear a QLoraLinear over a
// frozen 4-bit weight:
//   x0 = embed(tokens) (* sqrt(hidden) for Gemma 3);  x_{i+1} = block_i(x_i);
//   logits = lm_head(norm(x_L))
//   block(x) = h + mlp(rmsnorm(h)),  h = x + o_proj(attn(rmsnorm(x)))
//     Gemma 3: h = x + post_attention_norm(o_proj(attn(input_norm(x)))),
//              out = h + post_feedforward_norm(mlp(pre_feedforward_norm(h)))
//   attn: q/k/v projections (bias on Qwen2), per-head q/k RMSNorm (Qwen3, Gemma 3), RoPE
//         (rope_theta; rope_scaling linear / llama3; Gemma 3's local layers their own base),
//         grouped-query attention through scaled_dot_product_attention, causal
//   mlp(x) = down_proj(act(gate_proj(x)) * up_proj(x)), act = silu (GELU-tanh for Gemma 3)
// Embedding, norms and lm_head stay in the compute dtype (norms in fp32 with upcast_layernorm).
// The model knows nothing of ranks: the trainer drives it block by block.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lora/lora_linear.h"
#include "lora/peft_adapter.h"
#include "model/model_config.h"
#include "quant/quantize.h"

namespace qlora::model {

struct LoadOptions {
  at::ScalarType compute_dtype = at::kFloat;  // fp32 on the CPU by default; bf16 on CUDA
  // For a checkpoint that is not pre-quantized: quantize block linears on load with these.
  // A pre-quantized bitsandbytes 4-bit checkpoint is loaded as it is.
  quant::QuantizeOptions quant;
  bool upcast_layernorm = false;  // keep RMSNorm weights (and their math) in fp32
};

struct DecoderBlock {
  at::Tensor input_layernorm;                                // [hidden]
  at::Tensor post_attention_layernorm;                       // [hidden]
  at::Tensor pre_feedforward_layernorm;                      // [hidden] Gemma 3 only
  at::Tensor post_feedforward_layernorm;                     // [hidden] Gemma 3 only
  at::Tensor q_norm;                                         // [head_dim] Qwen3, Gemma 3
  at::Tensor k_norm;                                         // [head_dim] Qwen3, Gemma 3
  // The norm of block_norms' name ("input_layernorm", "self_attn.q_norm", ...).
  at::Tensor& norm(const std::string& name);
  std::vector<lora::QLoraLinear> linears;                    // in lora::block_linear_names() order
  lora::QLoraLinear& linear(const std::string& short_name);  // "q_proj", ...
  const lora::QLoraLinear& linear(const std::string& short_name) const;
};

// RoPE as transformers computes it (fp32): inv_freq [head_dim / 2] of layer `layer` from its
// rope_theta and rope_scaling (default, linear, llama3; Gemma 3's local layers have their own),
// and cos / sin [1, T, head_dim] of positions 0..T-1 in `dtype`. Exposed for tests.
at::Tensor rope_inv_freq(const ModelConfig& config, int64_t layer = -1);
std::pair<at::Tensor, at::Tensor> rope_cos_sin(const at::Tensor& inv_freq, int64_t seq_len,
                                               at::ScalarType dtype);
// The same at given positions: position_ids [B, T] integer -> cos / sin [B, T, head_dim].
std::pair<at::Tensor, at::Tensor> rope_cos_sin_at(const at::Tensor& inv_freq,
                                                  const at::Tensor& position_ids,
                                                  at::ScalarType dtype);

// Attention mask of packed rows (neat packing): a sample starts where its position id is 0, and a
// token attends to itself and earlier tokens of its own sample only (block-diagonal causal),
// within `window` tokens when window > 0 (keys t - window < j <= t). position_ids [B, T] ->
// bool [B, 1, T, T], true = attend. Exposed for tests.
at::Tensor packed_causal_mask(const at::Tensor& position_ids, int64_t window);

// Keys and values (after RoPE) of the tokens a model has already seen, per block: what
// DecoderModel::forward_step attends to. Starts empty; forward_step fills and extends it. Every
// row of the batch holds the same number of tokens (no padding).
struct KvCache {
  std::vector<at::Tensor> keys;    // per block [B, kv_heads, length, head_dim]
  std::vector<at::Tensor> values;  // per block [B, kv_heads, length, head_dim]
  int64_t length = 0;              // tokens cached = the position of the next token
};

struct LossResult {
  at::Tensor loss;          // scalar: sum of token losses / num_targets (autograd to hidden)
  int64_t num_targets = 0;  // labels != -100 after the shift
};

class DecoderModel {
 public:
  // Reads config.json and the weights through ModelReader (model_reader.h); throws
  // std::invalid_argument naming the tensor and both shapes on a missing tensor, a wrong shape or
  // a dtype that cannot be used. Takes an unquantized or a bitsandbytes 4-bit checkpoint (block
  // linears it keeps unquantized are quantized with options.quant).
  static DecoderModel load(const std::string& dir, const LoadOptions& options);
  // The configuration and no weights: for a trainer that binds each part's weights only while
  // it runs (the sharded trainer of src/train binds views into gathered units). Bind with
  // set_embedding, set_head and block(i) = ...; running an unbound part is std::logic_error.
  static DecoderModel skeleton(const ModelConfig& config, const LoadOptions& options);
  // [V, H] in any float dtype, or undefined: embed() converts the rows it looks up to the
  // compute dtype (the same numbers as converting the whole table first, without its copy).
  void set_embedding(at::Tensor embed_tokens);
  void set_head(at::Tensor norm, at::Tensor lm_head);   // [H] norm_dtype(), [V, H] compute dtype
  at::ScalarType norm_dtype() const { return upcast_layernorm_ ? at::kFloat : compute_dtype_; }

  const ModelConfig& config() const { return config_; }
  at::ScalarType compute_dtype() const { return compute_dtype_; }
  int64_t num_blocks() const { return static_cast<int64_t>(blocks_.size()); }
  DecoderBlock& block(int64_t i) { return blocks_.at(static_cast<size_t>(i)); }

  at::Tensor embed(const at::Tensor& tokens) const;  // [B, T] int64 -> [B, T, H]
  // [B, T, H] -> [B, T, H]. Dropout of LoRA inputs only when training.
  // Without position_ids: positions 0..T-1 and causal attention; a layer with a sliding window
  // (Mistral, Qwen2 use_sliding_window) shorter than T gets the windowed causal mask, as
  // transformers applies it. With position_ids [B, T] (packed rows): RoPE at those positions and
  // packed_causal_mask (each sample sees only itself), combined with the window.
  at::Tensor block_forward(int64_t i, const at::Tensor& x, bool training = false,
                           std::optional<at::Generator> dropout_gen = std::nullopt,
                           const at::Tensor& position_ids = at::Tensor()) const;
  at::Tensor final_norm(const at::Tensor& x) const;           // [B, T, H]
  at::Tensor logits(const at::Tensor& normed) const;          // [B, T, V] (for tests and eval)
  // All of the above; position_ids [B, T] or undefined as in block_forward.
  at::Tensor forward_logits(const at::Tensor& tokens,
                            const at::Tensor& position_ids = at::Tensor()) const;

  // Incremental decoding: tokens [B, T] at positions cache.length .. cache.length + T - 1, each
  // attending to every cached token and the earlier new ones (within a layer's sliding window),
  // -> logits [B, T, V] (of the last token only, [B, 1, V], with last_only); their keys and
  // values are appended to `cache`. Prefill with the prompt, then one token per call. The logits
  // equal forward_logits of the whole sequence at those positions up to rounding (the prompt's
  // call runs block_forward's very operations). No dropout, no autograd needed.
  at::Tensor forward_step(const at::Tensor& tokens, KvCache& cache, bool last_only = false) const;

  // Causal-LM cross-entropy of normed hidden states [B, T, H] against labels [B, T] (shifted
  // by one inside, -100 ignored), divided by `normalizer` (the number of target tokens when
  // <= 0; a batch without targets then has loss 0). Computed chunk_tokens rows at a time through
  // a custom autograd function: neither forward nor backward ever holds more than
  // [chunk_tokens, V] logits, nor more than 2^25 logits per buffer (a 262k vocabulary gets 128
  // rows per chunk; loss.cpp). Labels outside [0, V) other than -100 are std::invalid_argument.
  LossResult loss(const at::Tensor& normed, const at::Tensor& labels, int64_t chunk_tokens = 1024,
                  double normalizer = 0.0) const;

  // Per-row sums of the target tokens' log-probabilities (preference losses): normed [B, T, H],
  // labels [B, T] as for loss (shifted by one inside, -100 ignored) -> [B] fp32, differentiable
  // to `normed`, chunked the same way (never more than [chunk_tokens, V] logits). A row without
  // targets sums to 0.
  at::Tensor row_logps(const at::Tensor& normed, const at::Tensor& labels,
                       int64_t chunk_tokens = 1024) const;

  // The adapter lifecycle of lora/adapter_slots.h on this model's linears.
  // LoRA on the named linears of every block (peft's init from a CPU generator seeded `seed`).
  void adapters_init(const lora::LoraConfig& config, const std::vector<std::string>& targets,
                     uint64_t seed);
  // From / to peft's files. Loading checks that every adapter layer exists and fits (throws
  // std::invalid_argument naming the layer, before changing any layer); linears the adapter does
  // not name keep what they have. Exporting a model without adapters is std::logic_error.
  void adapters_load(const lora::PeftAdapter& adapter);
  lora::PeftAdapter adapters_export(const std::string& base_model_name_or_path) const;
  std::vector<at::Tensor> adapter_parameters();  // A, B of every adapted linear, block order

  // The block's norms, RoPE, gated activation and residual adds through the fused ops of
  // fused_ops.h (default; fp32 and bf16 on the CPU), or as the ATen op sequence of transformers
  // (false): tests and benchmarks compare the two; both give the same values up to rounding.
  void set_fused_ops(bool on) { fused_ops_ = on; }
  bool fused_ops() const { return fused_ops_; }

 private:
  // blocks_[i] after checking i, x [B, T, hidden] and that its weights are bound; `what` names
  // the caller in messages.
  const DecoderBlock& block_checked(int64_t i, const at::Tensor& x, const char* what) const;
  at::Tensor block_step(int64_t i, const at::Tensor& x, KvCache& cache) const;
  // fused_ops_ and the fused ops take x (CPU, fp32 / bf16) and no norm weight requires grad.
  bool use_fused_ops(const at::Tensor& x, const std::vector<at::Tensor>& norms) const;

  ModelConfig config_;
  at::ScalarType compute_dtype_ = at::kFloat;
  bool upcast_layernorm_ = false;
  bool fused_ops_ = true;
  at::Tensor embed_tokens_;  // [V, H]
  at::Tensor norm_;          // [H]
  at::Tensor lm_head_;       // [V, H] (the embedding when tied)
  std::vector<DecoderBlock> blocks_;
  std::vector<at::Tensor> rope_inv_freq_;  // per block [head_dim / 2] fp32
};

}  // namespace qlora::model
