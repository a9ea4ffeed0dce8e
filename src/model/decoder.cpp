// The decoder: weight loading (quantize on load, or bitsandbytes 4-bit as it is), the forward of
// LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM op for op as transformers runs it, and
// the LoRA adapters of the block linears. The loss is in loss.cpp.
//   rmsnorm(x) = w * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)
//   rope:      inv_freq = 1 / theta^(arange(0, d, 2) / d)  (fp32),  f = pos * inv_freq,
//              q' = q * cos([f, f]) + rotate_half(q) * sin([f, f])
//   attention: softmax(q k^T / sqrt(d) + causal (sliding-window) mask) v, k/v heads repeated;
//              packed rows (position ids given): RoPE at those positions and a block-diagonal
//              causal mask, a sample starting where its position id is 0
//   KV cache:  forward_step runs the same block with RoPE at positions past..past+T-1 and the
//              queries attending to the cached keys / values plus the new ones
#include "model/decoder.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <map>
#include <stdexcept>
#include <tuple>
#include <utility>

#include "io/hf_config.h"
#include "lora/adapter_slots.h"
#include "model/fused_ops.h"
#include "model/model_reader.h"

namespace qlora::model {
namespace {

std::string layer_prefix(int64_t i) { return "model.layers." + std::to_string(i) + "."; }

std::string linear_names_list() {
  std::string s;
  for (const std::string& n : lora::block_linear_names()) s += (s.empty() ? "" : ", ") + n;
  return s;
}

// A zero A [r, in] and B [out, r] for linear `l`, fp32 on its device.
lora::AdapterSlot adapter_slot_zeros(const lora::QLoraLinear& l, int64_t rank) {
  const auto options = at::TensorOptions().dtype(at::kFloat).device(l.base().packed.device());
  return {l.name(), at::zeros({rank, l.in_features()}, options),
          at::zeros({l.out_features(), rank}, options)};
}

// transformers' LlamaRMSNorm. With upcast_layernorm the weight is fp32 and the product stays in
// fp32 until the cast back to the input's dtype. Gemma3RMSNorm (`gemma`): the weight is an offset
// from one, applied in fp32: (h * (1 + w32)).to(x.dtype).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool gemma = false) {
  const at::ScalarType input_dtype = x.scalar_type();
  at::Tensor h = x.to(at::kFloat);
  const at::Tensor variance = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(variance + eps);
  if (gemma) return (h * (weight.to(at::kFloat) + 1.0)).to(input_dtype);
  if (weight.scalar_type() != input_dtype) return (weight * h).to(input_dtype);
  return weight * h.to(input_dtype);
}

at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, half, x.size(-1) - half), x.narrow(-1, 0, half)}, -1);
}

// [B, kv_heads, T, D] -> [B, kv_heads * n_rep, T, D], each kv head n_rep times in a row.
at::Tensor repeat_kv(const at::Tensor& x, int64_t n_rep) {
  if (n_rep == 1) return x;
  const int64_t b = x.size(0), kv = x.size(1), t = x.size(2), d = x.size(3);
  return x.unsqueeze(2).expand({b, kv, n_rep, t, d}).reshape({b, kv * n_rep, t, d});
}

}  // namespace

// ------------------------------------------------------------------------------------------
// RoPE

at::Tensor rope_inv_freq(const ModelConfig& c, int64_t layer) {
  const int64_t dim = c.head_dim;
  const double rope_theta = c.layer_rope_theta(layer);
  // transformers: 1.0 / (base ** (arange(0, dim, 2, int64).float() / dim)); Python evaluates
  // `base ** t` as pow(base, t) and `1.0 / t` as t.reciprocal() * 1.0, all in fp32.
  const at::Tensor exponent = at::arange(0, dim, 2, at::kLong).to(at::kFloat) / dim;
  const at::Tensor inv_freq = at::reciprocal(at::pow(rope_theta, exponent)) * 1.0;  // [dim/2]
  const RopeScaling& r = c.layer_rope_scaling(layer);
  if (r.rope_type == "default") return inv_freq;
  if (r.rope_type == "linear") return inv_freq / r.factor;
  if (r.rope_type == "llama3") {
    // _compute_llama3_parameters, expression by expression.
    const double old_context_len = static_cast<double>(r.original_max_position_embeddings);
    const double low_freq_wavelen = old_context_len / r.low_freq_factor;
    const double high_freq_wavelen = old_context_len / r.high_freq_factor;
    const at::Tensor wavelen = at::reciprocal(inv_freq) * (2 * M_PI);
    at::Tensor inv_freq_llama =
        at::where(wavelen > low_freq_wavelen, inv_freq / r.factor, inv_freq);
    const at::Tensor smooth_factor =
        (at::reciprocal(wavelen) * r.original_max_position_embeddings - r.low_freq_factor) /
        (r.high_freq_factor - r.low_freq_factor);
    const at::Tensor smoothed_inv_freq =
        at::rsub(smooth_factor, 1) * inv_freq_llama / r.factor + smooth_factor * inv_freq_llama;
    const at::Tensor is_medium_freq = at::logical_and(at::logical_not(wavelen < high_freq_wavelen),
                                                      at::logical_not(wavelen > low_freq_wavelen));
    return at::where(is_medium_freq, smoothed_inv_freq, inv_freq_llama);
  }
  throw std::invalid_argument("rope_type '" + r.rope_type +
                              "' is not supported (supported: default, linear, llama3)");
}

std::pair<at::Tensor, at::Tensor> rope_cos_sin(const at::Tensor& inv_freq, int64_t seq_len,
                                               at::ScalarType dtype) {
  // LlamaRotaryEmbedding.forward with position_ids [1, T] = 0..T-1, in fp32.
  const at::Tensor position_ids =
      at::arange(seq_len, at::TensorOptions().dtype(at::kLong).device(inv_freq.device()))
          .unsqueeze(0);  // [1, T]
  return rope_cos_sin_at(inv_freq, position_ids, dtype);
}

std::pair<at::Tensor, at::Tensor> rope_cos_sin_at(const at::Tensor& inv_freq,
                                                  const at::Tensor& position_ids,
                                                  at::ScalarType dtype) {
  // transformers: (inv_freq[None, :, None] @ position_ids[:, None, :].float()).transpose(1, 2),
  // a matmul over a dimension of 1: the same single fp32 product per element as this one.
  const at::Tensor freqs = position_ids.unsqueeze(-1).to(at::kFloat) *
                           inv_freq.to(position_ids.device()).to(at::kFloat);  // [B, T, D/2]
  const at::Tensor emb = at::cat({freqs, freqs}, -1);                         // [B, T, D]
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

at::Tensor packed_causal_mask(const at::Tensor& position_ids, int64_t window) {
  if (position_ids.dim() != 2)
    throw std::invalid_argument("packed_causal_mask: position_ids must be [batch, seq], not " +
                                shape_str(position_ids.sizes().vec()));
  const int64_t seq = position_ids.size(1);
  const at::Tensor segment = (position_ids == 0).cumsum(-1);  // [B, T]: sample index in the row
  const at::Tensor pos =
      at::arange(seq, at::TensorOptions().dtype(at::kLong).device(position_ids.device()));
  const at::Tensor qi = pos.unsqueeze(1), kj = pos.unsqueeze(0);  // [T, 1], [1, T]
  at::Tensor allowed = kj <= qi;                                  // [T, T]
  if (window > 0) allowed = at::logical_and(allowed, kj > qi - window);
  const at::Tensor same = segment.unsqueeze(2) == segment.unsqueeze(1);  // [B, T, T]
  return at::logical_and(same, allowed.unsqueeze(0)).unsqueeze(1);     // [B, 1, T, T]
}

// ------------------------------------------------------------------------------------------
// DecoderBlock

const lora::QLoraLinear& DecoderBlock::linear(const std::string& short_name) const {
  const auto& names = lora::block_linear_names();
  for (size_t i = 0; i < names.size() && i < linears.size(); ++i)
    if (names[i] == short_name) return linears[i];
  throw std::invalid_argument("unknown block linear '" + short_name + "' (expected one of " +
                              linear_names_list() + ")");
}

lora::QLoraLinear& DecoderBlock::linear(const std::string& short_name) {
  return const_cast<lora::QLoraLinear&>(std::as_const(*this).linear(short_name));
}

at::Tensor& DecoderBlock::norm(const std::string& name) {
  if (name == "input_layernorm") return input_layernorm;
  if (name == "post_attention_layernorm") return post_attention_layernorm;
  if (name == "pre_feedforward_layernorm") return pre_feedforward_layernorm;
  if (name == "post_feedforward_layernorm") return post_feedforward_layernorm;
  if (name == "self_attn.q_norm") return q_norm;
  if (name == "self_attn.k_norm") return k_norm;
  throw std::invalid_argument("unknown block norm '" + name +
                              "' (expected input_layernorm, post_attention_layernorm, "
                              "pre_feedforward_layernorm, post_feedforward_layernorm, "
                              "self_attn.q_norm or self_attn.k_norm)");
}

// ------------------------------------------------------------------------------------------
// Loading

DecoderModel DecoderModel::load(const std::string& dir, const LoadOptions& options) {
  ModelReader reader(dir);
  const io::HfConfig& hf = reader.hf_config();
  DecoderModel m;
  m.config_ = reader.config();
  const ModelConfig& c = m.config_;
  const at::ScalarType compute = options.compute_dtype;
  if (compute != at::kFloat && compute != at::kBFloat16 && compute != at::kHalf)
    throw std::invalid_argument(std::string("compute dtype ") + c10::toString(compute) +
                                " is not supported (expected float32, bfloat16 or float16)");
  if (c.head_dim % 2 != 0)
    throw std::invalid_argument(hf.path + ": head_dim " + std::to_string(c.head_dim) +
                                " is odd; rotary embeddings need an even head_dim");
  if (!reader.prequantized() && !reader.dequantizes() &&
      hf.quantization.method != io::QuantMethod::none)
    throw std::invalid_argument(
        hf.path + ": quantization method '" + io::quant_method_name(hf.quantization.method) +
        "' (quant_method '" + hf.quantization.quant_method +
        "') cannot be loaded; supported: an unquantized (fp32/bf16/fp16) model, a bitsandbytes "
        "4-bit one, or an fp8 / mxfp4 one (dequantized on load)");
  m.compute_dtype_ = compute;
  m.upcast_layernorm_ = options.upcast_layernorm;

  reader.weights_open();  // every tensor and its shape first, before any heavy work
  const auto load_float = [&](const std::string& name, at::ScalarType dtype) {
    return reader.tensor(name).to(dtype).contiguous();
  };
  const at::ScalarType norm_dtype = options.upcast_layernorm ? at::kFloat : compute;

  m.embed_tokens_ = load_float("model.embed_tokens.weight", compute);  // [V, H]
  m.lm_head_ = c.tie_word_embeddings ? m.embed_tokens_ : load_float("lm_head.weight", compute);
  m.norm_ = load_float("model.norm.weight", norm_dtype);
  m.blocks_.resize(static_cast<size_t>(c.num_hidden_layers));
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    DecoderBlock& b = m.blocks_[static_cast<size_t>(i)];
    const std::string p = layer_prefix(i);
    for (const auto& [norm, size] : block_norms(c))
      b.norm(norm) = load_float(p + norm + ".weight", norm_dtype);
    for (const std::string& short_name : lora::block_linear_names()) {
      const std::string name = block_linear_module(i, short_name);  // model.layers.i.self_attn.q_proj
      // A pre-quantized checkpoint's 4-bit linears as they are; any other quantized on load.
      quant::Quantized q = reader.linear(name + ".weight", options.quant);
      at::Tensor bias;
      if (c.linear_has_bias(short_name)) bias = load_float(name + ".bias", compute);
      b.linears.emplace_back(name, std::move(q), std::move(bias));
    }
  }
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) m.rope_inv_freq_.push_back(rope_inv_freq(c, i));
  return m;
}

DecoderModel DecoderModel::skeleton(const ModelConfig& config, const LoadOptions& options) {
  const at::ScalarType compute = options.compute_dtype;
  if (compute != at::kFloat && compute != at::kBFloat16 && compute != at::kHalf)
    throw std::invalid_argument(std::string("compute dtype ") + c10::toString(compute) +
                                " is not supported (expected float32, bfloat16 or float16)");
  if (config.head_dim % 2 != 0)
    throw std::invalid_argument("head_dim " + std::to_string(config.head_dim) +
                                " is odd; rotary embeddings need an even head_dim");
  DecoderModel m;
  m.config_ = config;
  m.compute_dtype_ = compute;
  m.upcast_layernorm_ = options.upcast_layernorm;
  m.blocks_.resize(static_cast<size_t>(config.num_hidden_layers));
  for (int64_t i = 0; i < config.num_hidden_layers; ++i)
    m.rope_inv_freq_.push_back(rope_inv_freq(config, i));
  return m;
}

void DecoderModel::set_embedding(at::Tensor embed_tokens) { embed_tokens_ = std::move(embed_tokens); }

void DecoderModel::set_head(at::Tensor norm, at::Tensor lm_head) {
  norm_ = std::move(norm);
  lm_head_ = std::move(lm_head);
}

// ------------------------------------------------------------------------------------------
// Forward

at::Tensor DecoderModel::embed(const at::Tensor& tokens) const {
  if (tokens.dim() != 2 || !at::isIntegralType(tokens.scalar_type(), /*includeBool=*/false))
    throw std::invalid_argument("embed: tokens must be an integer tensor [batch, seq], not " +
                                shape_str(tokens.sizes().vec()) + " " +
                                c10::toString(tokens.scalar_type()));
  if (!embed_tokens_.defined())
    throw std::logic_error("embed: the embedding is not bound (DecoderModel::set_embedding)");
  const at::Tensor ids = tokens.to(at::kLong);
  // Checked where the ids are host memory; on a device this would stall the stream every
  // forward, and the trainer's rows were checked on the host when read (data::TokenDataset).
  if (ids.numel() > 0 && ids.device().is_cpu()) {
    const int64_t lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
    if (lo < 0 || hi >= config_.vocab_size)
      throw std::invalid_argument("token id " + std::to_string(lo < 0 ? lo : hi) +
                                  " is out of range [0, " + std::to_string(config_.vocab_size) +
                                  ") of the model's vocabulary");
  }
  const at::Tensor e = at::embedding(embed_tokens_, ids).to(compute_dtype_);  // [B, T, H]
  if (config_.embed_scale == 0.0) return e;
  // Gemma3TextScaledWordEmbedding: times torch.tensor(hidden_size**0.5) (fp32) cast to the
  // embedding's dtype.
  return e * at::scalar_tensor(config_.embed_scale, at::kFloat).to(e.scalar_type());
}

namespace {

// The attention of one block given its queries [B, heads, T, D] and keys / values
// [B, kv_heads, S, D] after RoPE -> [B, heads, T, D].
using AttendFn =
    std::function<at::Tensor(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v)>;

// One block around `attend`: norms, projections, RoPE with cos / sin [B or 1, T, D], MLP.
// `fused`: the small ops through fused_ops.h (same math, one pass each), else op by op.
at::Tensor block_apply(const ModelConfig& c, const DecoderBlock& b, const at::Tensor& x,
                       bool training, const std::optional<at::Generator>& dropout_gen,
                       at::Tensor cos, at::Tensor sin, const AttendFn& attend, bool fused) {
  const int64_t batch = x.size(0), seq = x.size(1), d = c.head_dim;
  const bool gemma = c.gemma_norms;
  const auto norm = [&](const at::Tensor& t, const at::Tensor& w) {
    return fused ? fused_rms_norm(t, w, c.rms_norm_eps, gemma)
                 : rms_norm(t, w, c.rms_norm_eps, gemma);
  };
  // Attention.
  const at::Tensor h = norm(x, b.input_layernorm);  // [B, T, H]
  const auto proj = [&](const char* name) {  // [B, T, n * D] -> [B, T, n, D]
    return b.linear(name).forward(h, training, dropout_gen).view({batch, seq, -1, d});
  };
  at::Tensor q = proj("q_proj"), k = proj("k_proj"), v = proj("v_proj");
  if (c.qk_norm) {  // over head_dim of each head, before RoPE
    q = norm(q, b.q_norm);
    k = norm(k, b.k_norm);
  }
  if (fused) {  // RoPE on [B, T, n, D] rows; attention gets the [B, n, T, D] view of it
    q = fused_rope(q, cos, sin).transpose(1, 2);
    k = fused_rope(k, cos, sin).transpose(1, 2);
  } else {
    q = q.transpose(1, 2);
    k = k.transpose(1, 2);
    cos = cos.unsqueeze(1);  // [B or 1, 1, T, D]
    sin = sin.unsqueeze(1);
    q = q * cos + rotate_half(q) * sin;
    k = k * cos + rotate_half(k) * sin;
  }
  v = v.transpose(1, 2);
  at::Tensor attn = attend(q, k, v);                      // [B, heads, T, D]
  attn = attn.transpose(1, 2).reshape({batch, seq, -1});  // [B, T, heads * D]
  at::Tensor attn_out = b.linear("o_proj").forward(attn, training, dropout_gen);
  if (gemma) attn_out = norm(attn_out, b.post_attention_layernorm);
  const at::Tensor& mlp_norm = gemma ? b.pre_feedforward_layernorm : b.post_attention_layernorm;
  at::Tensor hidden, h2;
  if (fused) {
    std::tie(hidden, h2) = fused_add_rms_norm(x, attn_out, mlp_norm, c.rms_norm_eps, gemma);
  } else {
    hidden = x + attn_out;
    h2 = norm(hidden, mlp_norm);
  }

  // MLP.
  const at::Tensor gate = b.linear("gate_proj").forward(h2, training, dropout_gen);
  const at::Tensor up = b.linear("up_proj").forward(h2, training, dropout_gen);
  const bool gelu = c.hidden_act == "gelu_pytorch_tanh";
  at::Tensor act;
  if (fused)
    act = fused_glu(gate, up, gelu ? fused::GluAct::gelu_tanh : fused::GluAct::silu);
  else
    act = (gelu ? at::gelu(gate, "tanh") : at::silu(gate)) * up;
  at::Tensor mlp_out = b.linear("down_proj").forward(act, training, dropout_gen);
  if (gemma) mlp_out = norm(mlp_out, b.post_feedforward_layernorm);
  return hidden + mlp_out;
}

std::vector<at::Tensor> block_norm_weights(const DecoderBlock& b) {
  return {b.input_layernorm, b.post_attention_layernorm, b.pre_feedforward_layernorm,
          b.post_feedforward_layernorm, b.q_norm, b.k_norm};
}

// Query positions q0..q0+T-1 against key positions 0..S-1 (S = q0 + T): key j is visible to
// query t when j <= t and, with a window, j > t - window. -> bool [T, S], true = attend.
at::Tensor causal_mask(int64_t q0, int64_t seq, int64_t keys, int64_t window, c10::Device device) {
  const auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  const at::Tensor qi = at::arange(q0, q0 + seq, opts).unsqueeze(1);  // [T, 1]
  const at::Tensor kj = at::arange(keys, opts).unsqueeze(0);          // [1, S]
  at::Tensor allowed = kj <= qi;
  if (window > 0) allowed = at::logical_and(allowed, kj > qi - window);
  return allowed;
}

}  // namespace

bool DecoderModel::use_fused_ops(const at::Tensor& x, const std::vector<at::Tensor>& norms) const {
  if (!fused_ops_ || !x.device().is_cpu() || !fused_ops_support(x.scalar_type())) return false;
  for (const at::Tensor& w : norms)
    if (w.defined() && w.requires_grad()) return false;
  return true;
}

const DecoderBlock& DecoderModel::block_checked(int64_t i, const at::Tensor& x,
                                                const char* what) const {
  const ModelConfig& c = config_;
  if (i < 0 || i >= num_blocks())
    throw std::invalid_argument("block " + std::to_string(i) + " does not exist (the model has " +
                                std::to_string(num_blocks()) + ")");
  if (x.dim() != 3 || x.size(2) != c.hidden_size)
    throw std::invalid_argument(std::string(what) + ": x must be [batch, seq, " +
                                std::to_string(c.hidden_size) + "], not " +
                                shape_str(x.sizes().vec()));
  const DecoderBlock& b = blocks_[static_cast<size_t>(i)];
  if (b.linears.size() != lora::block_linear_names().size() || !b.input_layernorm.defined() ||
      (c.qk_norm && !b.k_norm.defined()) || (c.gemma_norms && !b.post_feedforward_layernorm.defined()))
    throw std::logic_error(std::string(what) + ": block " + std::to_string(i) +
                           " has no weights bound");
  return b;
}

at::Tensor DecoderModel::block_forward(int64_t i, const at::Tensor& x, bool training,
                                       std::optional<at::Generator> dropout_gen,
                                       const at::Tensor& position_ids) const {
  const ModelConfig& c = config_;
  const DecoderBlock& b = block_checked(i, x, "block_forward");
  const int64_t batch = x.size(0), seq = x.size(1);
  const bool packed = position_ids.defined();
  if (packed && (position_ids.dim() != 2 || position_ids.size(0) != batch ||
                 position_ids.size(1) != seq ||
                 !at::isIntegralType(position_ids.scalar_type(), /*includeBool=*/false)))
    throw std::invalid_argument("block_forward: position_ids must be an integer tensor [" +
                                std::to_string(batch) + ", " + std::to_string(seq) +
                                "] like x's first two dimensions, not " +
                                shape_str(position_ids.sizes().vec()) + " " +
                                c10::toString(position_ids.scalar_type()));
  const int64_t n_rep = c.num_attention_heads / c.num_key_value_heads;
  const at::Tensor positions = packed ? position_ids.to(x.device()).to(at::kLong) : at::Tensor();
  const at::Tensor inv_freq = rope_inv_freq_.at(static_cast<size_t>(i)).to(x.device());
  auto [cos, sin] = packed ? rope_cos_sin_at(inv_freq, positions, x.scalar_type())
                           : rope_cos_sin(inv_freq, seq, x.scalar_type());
  const double scaling = c.attention_scaling();
  const int64_t window = c.attention_window(i);
  const auto attend = [&](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
    if (packed) {
      // Every query sees at least itself, so no row of the mask is empty (no NaN from softmax).
      const at::Tensor mask = packed_causal_mask(positions, window);  // [B, 1, T, T]
      return at::scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), mask,
                                              0.0, /*is_causal=*/false, scaling);
    }
    if (window > 0 && seq > window) {
      // Sliding window: query t sees keys t - window < j <= t (transformers'
      // sliding_window_overlay on the causal mask).
      const at::Tensor mask = causal_mask(0, seq, seq, window, x.device());  // [T, T] bool
      return at::scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), mask,
                                              0.0, /*is_causal=*/false, scaling);
    }
    return at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, /*is_causal=*/seq > 1,
                                            scaling, /*enable_gqa=*/n_rep > 1);
  };
  return block_apply(c, b, x, training, dropout_gen, cos, sin, attend, use_fused_ops(x, block_norm_weights(b)));
}

at::Tensor DecoderModel::block_step(int64_t i, const at::Tensor& x, KvCache& cache) const {
  const ModelConfig& c = config_;
  const DecoderBlock& b = block_checked(i, x, "block_step");
  const int64_t batch = x.size(0), seq = x.size(1), past = cache.length;
  at::Tensor& keys = cache.keys.at(static_cast<size_t>(i));
  at::Tensor& values = cache.values.at(static_cast<size_t>(i));
  if (keys.defined() && (keys.size(0) != batch || keys.size(2) != past))
    throw std::invalid_argument("block_step: the cache of block " + std::to_string(i) + " holds " +
                                shape_str(keys.sizes().vec()) + " keys, but the input is " +
                                shape_str(x.sizes().vec()) + " after " + std::to_string(past) +
                                " cached tokens");
  const int64_t n_rep = c.num_attention_heads / c.num_key_value_heads;
  const at::Tensor positions =
      at::arange(past, past + seq, at::TensorOptions().dtype(at::kLong).device(x.device()))
          .unsqueeze(0);  // [1, T]
  auto [cos, sin] = rope_cos_sin_at(rope_inv_freq_.at(static_cast<size_t>(i)).to(x.device()),
                                    positions, x.scalar_type());
  const double scaling = c.attention_scaling();
  const int64_t window = c.attention_window(i);
  const int64_t total = past + seq;
  const auto attend = [&](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
    keys = keys.defined() ? at::cat({keys, k}, 2) : k.contiguous();  // [B, kv, S, D]
    values = values.defined() ? at::cat({values, v}, 2) : v.contiguous();
    const bool window_cuts = window > 0 && total > window;
    if (past == 0 && !window_cuts)  // the prompt: block_forward's own call
      return at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0,
                                              /*is_causal=*/seq > 1, scaling,
                                              /*enable_gqa=*/n_rep > 1);
    if (seq == 1 && !window_cuts)  // one new token sees every cached one
      return at::scaled_dot_product_attention(q, keys, values, std::nullopt, 0.0,
                                              /*is_causal=*/false, scaling,
                                              /*enable_gqa=*/n_rep > 1);
    const at::Tensor mask = causal_mask(past, seq, total, window, x.device());  // [T, S]
    return at::scaled_dot_product_attention(q, repeat_kv(keys, n_rep), repeat_kv(values, n_rep),
                                            mask, 0.0, /*is_causal=*/false, scaling);
  };
  return block_apply(c, b, x, /*training=*/false, std::nullopt, cos, sin, attend,
                     use_fused_ops(x, block_norm_weights(b)));
}

at::Tensor DecoderModel::forward_step(const at::Tensor& tokens, KvCache& cache,
                                      bool last_only) const {
  if (cache.keys.empty()) {
    cache.keys.resize(static_cast<size_t>(num_blocks()));
    cache.values.resize(static_cast<size_t>(num_blocks()));
  }
  if (static_cast<int64_t>(cache.keys.size()) != num_blocks() ||
      cache.values.size() != cache.keys.size())
    throw std::invalid_argument("forward_step: the cache has " +
                                std::to_string(cache.keys.size()) + " blocks, the model " +
                                std::to_string(num_blocks()));
  at::Tensor x = embed(tokens);  // [B, T, H]
  if (tokens.size(1) == 0)
    throw std::invalid_argument("forward_step: no tokens (tokens must be [batch, seq >= 1])");
  for (int64_t i = 0; i < num_blocks(); ++i) x = block_step(i, x, cache);
  cache.length += tokens.size(1);
  if (last_only) x = x.narrow(1, x.size(1) - 1, 1);
  return logits(final_norm(x));
}

at::Tensor DecoderModel::final_norm(const at::Tensor& x) const {
  if (!norm_.defined()) throw std::logic_error("final_norm: the head is not bound (set_head)");
  if (use_fused_ops(x, {norm_}))
    return fused_rms_norm(x, norm_, config_.rms_norm_eps, config_.gemma_norms);
  return rms_norm(x, norm_, config_.rms_norm_eps, config_.gemma_norms);
}

at::Tensor DecoderModel::logits(const at::Tensor& normed) const {
  return at::linear(normed, lm_head_);  // [B, T, V]
}

at::Tensor DecoderModel::forward_logits(const at::Tensor& tokens,
                                       const at::Tensor& position_ids) const {
  at::Tensor x = embed(tokens);
  for (int64_t i = 0; i < num_blocks(); ++i)
    x = block_forward(i, x, /*training=*/false, std::nullopt, position_ids);
  return logits(final_norm(x));
}

// ------------------------------------------------------------------------------------------
// Adapters

void DecoderModel::adapters_init(const lora::LoraConfig& config,
                                 const std::vector<std::string>& targets, uint64_t seed) {
  const auto& names = lora::block_linear_names();
  for (const std::string& t : targets)
    if (std::find(names.begin(), names.end(), t) == names.end())
      throw std::invalid_argument("LoRA target '" + t + "' is not a linear of the model (valid: " +
                                  linear_names_list() + ")");
  std::vector<lora::AdapterSlot> slots;  // block order, then linear order: peft's
  for (DecoderBlock& b : blocks_)
    for (const std::string& name : names)
      if (std::find(targets.begin(), targets.end(), name) != targets.end()) {
        lora::QLoraLinear& l = b.linear(name);
        config.validate(l.name());  // before its rank sizes the tensors below
        const lora::AdapterSlot zeros = adapter_slot_zeros(l, config.rank);
        l.adapter_set(config, zeros.lora_A, zeros.lora_B);  // kept as given: fp32 on its device
        slots.push_back({l.name(), l.lora_A(), l.lora_B()});
      }
  lora::adapter_init(slots, at::make_generator<at::CPUGeneratorImpl>(seed));
}

void DecoderModel::adapters_load(const lora::PeftAdapter& adapter) {
  std::map<std::string, lora::QLoraLinear*> by_name;
  for (DecoderBlock& b : blocks_)
    for (lora::QLoraLinear& l : b.linears) by_name[l.name()] = &l;
  // Any linear of the model may take an adapter layer; everything is checked before any changes.
  const int64_t r = adapter.config.rank;
  adapter.config.validate("adapter");
  std::vector<lora::AdapterSlot> slots;
  for (const auto& [name, ab] : adapter.weights) {
    const auto it = by_name.find(name);
    if (it == by_name.end())
      throw std::invalid_argument("adapter layer '" + name + "' does not exist in the model (" +
                                  std::to_string(num_blocks()) + " layers model.layers.{0.." +
                                  std::to_string(num_blocks() - 1) + "}.self_attn/mlp.{" +
                                  linear_names_list() + "})");
    slots.push_back(adapter_slot_zeros(*it->second, r));
  }
  lora::adapter_load(slots, adapter, "");
  for (const lora::AdapterSlot& s : slots)
    by_name.at(s.module)->adapter_set(adapter.config, s.lora_A, s.lora_B);
}

lora::PeftAdapter DecoderModel::adapters_export(const std::string& base_model_name_or_path) const {
  lora::PeftAdapter out;
  out.base_model_name_or_path = base_model_name_or_path;
  out.module_prefix = config_.weights_prefix;
  std::vector<lora::AdapterSlot> slots;
  for (const DecoderBlock& b : blocks_)
    for (const lora::QLoraLinear& l : b.linears)
      if (l.has_adapter()) {
        if (slots.empty()) out.config = l.adapter_config();
        slots.push_back({l.name(), l.lora_A(), l.lora_B()});
      }
  if (slots.empty())
    throw std::logic_error(
        "adapters_export: the model has no LoRA adapters "
        "(adapters_init or adapters_load first)");
  lora::adapter_export(slots, out);
  return out;
}

std::vector<at::Tensor> DecoderModel::adapter_parameters() {
  std::vector<at::Tensor> params;
  for (DecoderBlock& b : blocks_)
    for (lora::QLoraLinear& l : b.linears)
      if (l.has_adapter()) {
        params.push_back(l.lora_A());
        params.push_back(l.lora_B());
      }
  return params;
}

}  // namespace qlora::model
