// DecoderModel unit tests on tiny generated checkpoints: logits against an independent fp64
// forward written from the definitions (explicit rotation angles, explicit masks, kv head h / n_rep
// for query head h), causality and sliding windows, Qwen2 biases, tied embeddings, pre-quantized
// bitsandbytes checkpoints, load errors, the chunked loss and its gradient against autograd
// through the full logits, and LoRA adapters (init, export / load round trip, gradients).
// Equality with transformers itself is tests/reference's.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "expect_error.h"
#include "lora/peft_adapter.h"
#include "model/decoder.h"
#include "model_test_util.h"
#include "quant/bnb_checkpoint.h"
#include "temp_dir.h"

namespace qlora::model {
namespace {

using io::testing::TempDir;
using qlora::testing::contains;
using qlora::testing::invalid_argument_message;
using namespace qlora::model::testing;

// fp32 forward against the fp64 reference: a 2-layer model with logits of order 0.1-1 keeps
// about 6 significant digits; measured max deviation ~3e-7 relative to max |logit|.
constexpr double kForwardTol = 1e-5;
// Chunked vs. full-logit loss and gradients in fp32: only the summation order differs (measured:
// 1 ulp of the loss, ~1e-7 of the largest gradient entry).
constexpr double kLossRelTol = 1e-6;
constexpr double kGradTol = 1e-6;

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}
double max_abs(const at::Tensor& a) { return a.to(at::kDouble).abs().max().item<double>(); }

std::string model_dir(const TempDir& tmp, const ModelConfig& c, const std::string& name,
                      uint64_t seed = 1) {
  const std::string dir = tmp.file(name);
  init_model_write(c, seed, dir);
  return dir;
}

at::Tensor random_tokens(int64_t batch, int64_t seq, int64_t vocab, uint64_t seed) {
  at::Generator gen = test_gen(seed);
  return at::randint(0, vocab, {batch, seq}, gen, at::TensorOptions().dtype(at::kLong));
}

// ------------------------------------------------------------------------------------------
// fp64 reference forward, from the checkpoint's float tensors and the model's dequantized
// linears (so that only the forward math is compared, not the quantization).

at::Tensor ref_inv_freq(const ModelConfig& c) {
  const int64_t half = c.head_dim / 2;
  at::Tensor f = at::empty({half}, at::kDouble);
  const RopeScaling& r = c.rope_scaling;
  for (int64_t i = 0; i < half; ++i) {
    double inv = std::pow(c.rope_theta, -2.0 * static_cast<double>(i) / c.head_dim);
    if (r.rope_type == "linear") inv /= r.factor;
    if (r.rope_type == "llama3") {
      const double wavelen = 2 * M_PI / inv;
      const double old = static_cast<double>(r.original_max_position_embeddings);
      if (wavelen > old / r.low_freq_factor) {
        inv /= r.factor;
      } else if (wavelen >= old / r.high_freq_factor) {
        const double smooth =
            (old / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
        inv = (1 - smooth) * inv / r.factor + smooth * inv;
      }
    }
    f[i] = inv;
  }
  return f;
}

at::Tensor ref_rms(const at::Tensor& x, const at::Tensor& w, double eps) {
  return x * at::rsqrt(x.pow(2).mean(-1, true) + eps) * w.to(at::kDouble);
}

at::Tensor ref_rotate(const at::Tensor& x, const at::Tensor& angles) {  // x [B, n, T, D]
  // Pairs (i, i + D/2) rotate by angle[t, i]: (a, b) -> (a cos - b sin, b cos + a sin).
  const int64_t half = x.size(-1) / 2;
  const at::Tensor a = x.narrow(-1, 0, half), b = x.narrow(-1, half, half);
  const at::Tensor cos = angles.cos(), sin = angles.sin();  // [T, D/2]
  return at::cat({a * cos - b * sin, b * cos + a * sin}, -1);
}

at::Tensor ref_logits(DecoderModel& m, const std::string& dir, const at::Tensor& tokens) {
  const ModelConfig& c = m.config();
  const TensorMap w = weights_read(dir);
  const auto f64 = [&](const std::string& name) { return w.at(name).to(at::kDouble); };
  const auto linear = [&](int64_t i, const char* name, const at::Tensor& x) {
    const lora::QLoraLinear& l = m.block(i).linear(name);
    at::Tensor wt = quant::dequantize_4bit(l.base().packed, l.base().state, at::kFloat);
    at::Tensor y = at::matmul(x, wt.to(at::kDouble).t());
    if (l.bias().defined()) y = y + l.bias().to(at::kDouble);
    return y;
  };
  const int64_t batch = tokens.size(0), seq = tokens.size(1), d = c.head_dim;
  const int64_t heads = c.num_attention_heads, n_rep = heads / c.num_key_value_heads;
  at::Tensor x = f64("model.embed_tokens.weight")
                     .index_select(0, tokens.reshape(-1))
                     .reshape({batch, seq, c.hidden_size});
  const at::Tensor angles =
      at::arange(seq, at::kDouble).unsqueeze(1) * ref_inv_freq(c).unsqueeze(0);  // [T, D/2]
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    const at::Tensor h = ref_rms(x, w.at(p + "input_layernorm.weight"), c.rms_norm_eps);
    const auto heads_of = [&](const at::Tensor& y) {
      return y.reshape({batch, seq, -1, d}).permute({0, 2, 1, 3});
    };
    const at::Tensor q = ref_rotate(heads_of(linear(i, "q_proj", h)), angles);
    const at::Tensor k = ref_rotate(heads_of(linear(i, "k_proj", h)), angles);
    const at::Tensor v = heads_of(linear(i, "v_proj", h));
    const int64_t window = c.attention_window(i);
    at::Tensor mask = at::zeros({seq, seq}, at::kDouble);
    for (int64_t t = 0; t < seq; ++t)
      for (int64_t s = 0; s < seq; ++s)
        if (s > t || (window > 0 && s <= t - window))
          mask[t][s] = -std::numeric_limits<double>::infinity();
    std::vector<at::Tensor> outs;
    for (int64_t hd = 0; hd < heads; ++hd) {
      const at::Tensor qh = q.select(1, hd), kh = k.select(1, hd / n_rep);
      const at::Tensor vh = v.select(1, hd / n_rep);
      const at::Tensor scores = at::matmul(qh, kh.transpose(1, 2)) / std::sqrt(double(d)) + mask;
      outs.push_back(at::matmul(at::softmax(scores, -1), vh));  // [B, T, D]
    }
    const at::Tensor attn = at::stack(outs, 2).reshape({batch, seq, heads * d});
    x = x + linear(i, "o_proj", attn);
    const at::Tensor h2 = ref_rms(x, w.at(p + "post_attention_layernorm.weight"), c.rms_norm_eps);
    const at::Tensor g = linear(i, "gate_proj", h2);
    x = x + linear(i, "down_proj", g * at::sigmoid(g) * linear(i, "up_proj", h2));
  }
  x = ref_rms(x, w.at("model.norm.weight"), c.rms_norm_eps);
  const std::string head = c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
  return at::matmul(x, f64(head).t());
}

void expect_matches_reference(const ModelConfig& c, const std::string& what, int64_t seq = 11) {
  TempDir tmp;
  const std::string dir = model_dir(tmp, c, "m");
  if (c.attention_bias || c.mlp_bias) biases_randomize(dir, 9);
  DecoderModel m = DecoderModel::load(dir, LoadOptions{});
  const at::Tensor tokens = random_tokens(2, seq, c.vocab_size, 3);
  const at::Tensor logits = m.forward_logits(tokens);
  ASSERT_EQ(logits.sizes(), (at::IntArrayRef{2, seq, c.vocab_size})) << what;
  EXPECT_EQ(logits.scalar_type(), at::kFloat) << what;
  const at::Tensor ref = ref_logits(m, dir, tokens);
  const double scale = max_abs(ref);
  EXPECT_GT(scale, 0.05) << what;
  EXPECT_LE(max_abs_diff(logits, ref), kForwardTol * scale)
      << what << ": max |logit| " << scale << ", max diff " << max_abs_diff(logits, ref);
}

// ------------------------------------------------------------------------------------------
// Forward

TEST(DecoderForward, ShapesOfEveryStage) {
  TempDir tmp;
  const ModelConfig c = tiny_config();
  DecoderModel m = DecoderModel::load(model_dir(tmp, c, "m"), LoadOptions{});
  EXPECT_EQ(m.num_blocks(), 2);
  EXPECT_EQ(m.compute_dtype(), at::kFloat);
  ASSERT_EQ(m.block(0).linears.size(), 7u);
  EXPECT_EQ(m.block(1).linear("k_proj").name(), "model.layers.1.self_attn.k_proj");
  EXPECT_EQ(m.block(1).linear("down_proj").name(), "model.layers.1.mlp.down_proj");
  EXPECT_EQ(m.block(0).linear("k_proj").out_features(), 32);
  EXPECT_EQ(m.block(0).linear("down_proj").in_features(), 96);
  EXPECT_TRUE(contains(invalid_argument_message([&] { m.block(0).linear("qkv_proj"); }),
                       "unknown block linear 'qkv_proj'"));

  const at::Tensor tokens = random_tokens(3, 5, c.vocab_size, 1);
  const at::Tensor x = m.embed(tokens);
  EXPECT_EQ(x.sizes(), (at::IntArrayRef{3, 5, 64}));
  const at::Tensor y = m.block_forward(0, x);
  EXPECT_EQ(y.sizes(), x.sizes());
  const at::Tensor n = m.final_norm(m.block_forward(1, y));
  EXPECT_EQ(n.sizes(), x.sizes());
  const at::Tensor logits = m.logits(n);
  EXPECT_EQ(logits.sizes(), (at::IntArrayRef{3, 5, 101}));
  EXPECT_TRUE(logits.isfinite().all().item<bool>());
  EXPECT_TRUE(at::equal(logits, m.forward_logits(tokens)));
  // One token: attention over itself only.
  EXPECT_EQ(m.forward_logits(tokens.narrow(1, 0, 1)).sizes(), (at::IntArrayRef{3, 1, 101}));
}

TEST(DecoderForward, LlamaMatchesReference) { expect_matches_reference(tiny_config(), "llama"); }

TEST(DecoderForward, LlamaWithoutGqaMatchesReference) {
  ModelConfig c = tiny_config();
  c.num_key_value_heads = 4;
  expect_matches_reference(c, "llama, 4 kv heads");
}

TEST(DecoderForward, Llama3RopeScalingMatchesReference) {
  ModelConfig c = tiny_config();
  c.rope_theta = 500000.0;
  // A short original context so that the 8 frequencies fall in all three bands.
  c.rope_scaling = {"llama3", 8.0, 1.0, 4.0, 64};
  const at::Tensor inv = ref_inv_freq(c);
  const double old = 64.0;
  int64_t low = 0, high = 0;
  for (int64_t i = 0; i < inv.size(0); ++i) {
    const double wavelen = 2 * M_PI / std::pow(c.rope_theta, -2.0 * i / c.head_dim);
    low += wavelen > old;
    high += wavelen < old / 4.0;
  }
  ASSERT_GT(low, 0);
  ASSERT_GT(high, 0);
  ASSERT_LT(low + high, inv.size(0));
  expect_matches_reference(c, "llama3 rope", 40);
}

TEST(DecoderForward, LinearRopeScalingMatchesReference) {
  ModelConfig c = tiny_config();
  c.rope_scaling.rope_type = "linear";
  c.rope_scaling.factor = 4.0;
  expect_matches_reference(c, "linear rope");
}

TEST(DecoderForward, Qwen2WithBiasesMatchesReference) {
  const ModelConfig c = as_qwen2(tiny_config());
  TempDir tmp;
  const std::string dir = model_dir(tmp, c, "m");
  const TensorMap w = weights_read(dir);
  for (const char* b : {"q_proj", "k_proj", "v_proj"})
    EXPECT_EQ(w.count(std::string("model.layers.1.self_attn.") + b + ".bias"), 1u) << b;
  EXPECT_EQ(w.count("model.layers.1.self_attn.o_proj.bias"), 0u);
  expect_matches_reference(c, "qwen2");
  // The biases are used: zero them and the logits change.
  biases_randomize(dir, 9);
  DecoderModel with = DecoderModel::load(dir, LoadOptions{});
  EXPECT_TRUE(with.block(0).linear("q_proj").bias().defined());
  EXPECT_FALSE(with.block(0).linear("o_proj").bias().defined());
  weights_edit(dir, [](TensorMap& m) {
    for (auto& [name, t] : m)
      if (name.find(".bias") != std::string::npos) t = at::zeros_like(t);
  });
  DecoderModel without = DecoderModel::load(dir, LoadOptions{});
  const at::Tensor tokens = random_tokens(1, 6, c.vocab_size, 2);
  EXPECT_GT(max_abs_diff(with.forward_logits(tokens), without.forward_logits(tokens)), 1e-3);
}

TEST(DecoderForward, LlamaAttentionAndMlpBiasesMatchReference) {
  ModelConfig c = tiny_config();
  c.attention_bias = true;  // q, k, v and o in LLaMA
  c.mlp_bias = true;
  expect_matches_reference(c, "llama with biases");
}

TEST(DecoderForward, MistralSlidingWindowMatchesReference) {
  expect_matches_reference(as_mistral(tiny_config(), 4), "mistral, window 4 < 11 tokens");
  expect_matches_reference(as_mistral(tiny_config(), 64), "mistral, window 64 > 11 tokens");
}

TEST(DecoderForward, Qwen2SlidingLayersMatchReference) {
  ModelConfig c = as_qwen2(tiny_config());
  c.sliding_window = 3;
  c.sliding_layers = {false, true};  // as max_window_layers = 1 gives
  expect_matches_reference(c, "qwen2, sliding window 3 on layer 1");
}

TEST(DecoderForward, CausalLaterTokensDoNotChangeEarlierLogits) {
  TempDir tmp;
  const ModelConfig c = tiny_config();
  DecoderModel m = DecoderModel::load(model_dir(tmp, c, "m"), LoadOptions{});
  const at::Tensor tokens = random_tokens(2, 12, c.vocab_size, 5);
  const at::Tensor logits = m.forward_logits(tokens);
  for (int64_t t : {0, 4, 10}) {
    at::Tensor changed = tokens.clone();
    changed.narrow(1, t + 1, 12 - t - 1).copy_(random_tokens(2, 12 - t - 1, c.vocab_size, 77 + t));
    const at::Tensor other = m.forward_logits(changed);
    EXPECT_LE(max_abs_diff(other.narrow(1, 0, t + 1), logits.narrow(1, 0, t + 1)), 1e-6)
        << "positions 0.." << t;
    EXPECT_GT(max_abs_diff(other.narrow(1, t + 1, 1), logits.narrow(1, t + 1, 1)), 1e-4)
        << "position " << t + 1 << " must see its own token";
    // A prefix alone gives the same logits as inside the longer sequence.
    EXPECT_LE(
        max_abs_diff(m.forward_logits(tokens.narrow(1, 0, t + 1)), logits.narrow(1, 0, t + 1)),
        1e-6)
        << "prefix of " << t + 1;
  }
}

TEST(DecoderForward, SlidingWindowForgetsTokensOutsideIt) {
  // One layer, window 4: position t sees tokens t-3..t only.
  TempDir tmp;
  const ModelConfig c = as_mistral(tiny_config(1), 4);
  DecoderModel m = DecoderModel::load(model_dir(tmp, c, "m"), LoadOptions{});
  const at::Tensor tokens = random_tokens(1, 10, c.vocab_size, 6);
  const at::Tensor logits = m.forward_logits(tokens);
  at::Tensor changed = tokens.clone();
  changed[0][2] = (tokens[0][2].item<int64_t>() + 1) % c.vocab_size;
  const at::Tensor other = m.forward_logits(changed);
  EXPECT_GT(max_abs_diff(other.narrow(1, 5, 1), logits.narrow(1, 5, 1)), 1e-4) << "t=5 sees 2";
  EXPECT_LE(max_abs_diff(other.narrow(1, 6, 4), logits.narrow(1, 6, 4)), 1e-6) << "t>=6 do not";
}

TEST(DecoderForward, TokenOutOfRange) {
  TempDir tmp;
  const ModelConfig c = tiny_config(1);
  DecoderModel m = DecoderModel::load(model_dir(tmp, c, "m"), LoadOptions{});
  for (int64_t bad : {int64_t{101}, int64_t{-1}}) {
    at::Tensor tokens = random_tokens(1, 4, c.vocab_size, 1);
    tokens[0][2] = bad;
    const std::string msg = invalid_argument_message([&] { m.embed(tokens); });
    EXPECT_TRUE(contains(msg, "token id " + std::to_string(bad) + " is out of range [0, 101)"))
        << msg;
  }
}

TEST(DecoderForward, Bf16ComputeAndUpcastNorms) {
  TempDir tmp;
  const ModelConfig c = tiny_config();
  const std::string dir = model_dir(tmp, c, "m");
  DecoderModel f32 = DecoderModel::load(dir, LoadOptions{});
  LoadOptions o;
  o.compute_dtype = at::kBFloat16;
  o.upcast_layernorm = true;
  DecoderModel bf16 = DecoderModel::load(dir, o);
  EXPECT_EQ(bf16.compute_dtype(), at::kBFloat16);
  const at::Tensor tokens = random_tokens(1, 6, c.vocab_size, 4);
  const at::Tensor x = bf16.embed(tokens);
  EXPECT_EQ(x.scalar_type(), at::kBFloat16);
  EXPECT_EQ(bf16.block_forward(0, x).scalar_type(), at::kBFloat16);
  const at::Tensor logits = bf16.forward_logits(tokens);
  EXPECT_EQ(logits.scalar_type(), at::kBFloat16);
  // bf16 keeps ~3 significant digits; over two layers the logits stay within a few percent.
  const at::Tensor ref = f32.forward_logits(tokens);
  EXPECT_LE(max_abs_diff(logits, ref), 0.05 * max_abs(ref));
}

// ------------------------------------------------------------------------------------------
// Loading

TEST(DecoderLoad, TiedEmbeddingsUseTheEmbeddingAsHead) {
  TempDir tmp;
  ModelConfig c = tiny_config();
  c.tie_word_embeddings = true;
  const std::string dir = model_dir(tmp, c, "m");
  EXPECT_EQ(weights_read(dir).count("lm_head.weight"), 0u);
  DecoderModel m = DecoderModel::load(dir, LoadOptions{});
  const at::Tensor embed = weights_read(dir).at("model.embed_tokens.weight");
  at::Generator gen = test_gen(2);
  const at::Tensor normed = at::randn({1, 3, 64}, gen, at::TensorOptions().dtype(at::kFloat));
  EXPECT_TRUE(at::equal(m.logits(normed), at::linear(normed, embed)));
  // An lm_head.weight in the file is ignored when the config ties (as transformers ties it).
  weights_edit(dir, [&](TensorMap& w) { w["lm_head.weight"] = at::zeros({101, 64}); });
  DecoderModel again = DecoderModel::load(dir, LoadOptions{});
  EXPECT_TRUE(at::equal(again.logits(normed), at::linear(normed, embed)));
  expect_matches_reference(c, "tied");
}

TEST(DecoderLoad, UntiedHeadIsLmHead) {
  TempDir tmp;
  const ModelConfig c = tiny_config(1);
  const std::string dir = model_dir(tmp, c, "m");
  DecoderModel m = DecoderModel::load(dir, LoadOptions{});
  at::Generator gen = test_gen(2);
  const at::Tensor normed = at::randn({2, 3, 64}, gen, at::TensorOptions().dtype(at::kFloat));
  EXPECT_TRUE(
      at::equal(m.logits(normed), at::linear(normed, weights_read(dir).at("lm_head.weight"))));
}

TEST(DecoderLoad, QuantizeOnLoadUsesTheOptions) {
  TempDir tmp;
  const ModelConfig c = tiny_config(1);
  const std::string dir = model_dir(tmp, c, "m");
  LoadOptions o;
  o.quant.quant_type = quant::QuantType::fp4;
  o.quant.blocksize = 128;
  o.quant.double_quant = true;
  DecoderModel m = DecoderModel::load(dir, o);
  const quant::Quantized& q = m.block(0).linear("up_proj").base();
  EXPECT_EQ(q.state.quant_type, quant::QuantType::fp4);
  EXPECT_EQ(q.state.blocksize, 128);
  EXPECT_TRUE(q.state.is_nested());
  EXPECT_EQ(q.state.shape, (std::vector<int64_t>{96, 64}));
  const quant::Quantized expect =
      quant::quantize_4bit(weights_read(dir).at("model.layers.0.mlp.up_proj.weight"), o.quant);
  EXPECT_TRUE(at::equal(quant::packed_bytes(q.packed), quant::packed_bytes(expect.packed)));
}

// A bitsandbytes 4-bit checkpoint written from `float_dir` (as `qlora_dist quantize` and
// transformers write it), leaving `keep_float` unquantized (llm_int8_skip_modules).
void bnb_dir_write(const std::string& float_dir, const std::string& out,
                   const quant::QuantizeOptions& o, const std::string& keep_float) {
  std::filesystem::create_directories(out);
  TensorMap m;
  for (const auto& [name, t] : weights_read(float_dir)) {
    if (is_block_linear_weight(name) && name != keep_float) {
      for (const auto& [key, tensor] :
           quant::bnb_checkpoint_tensors(name, quant::quantize_4bit(t, o)))
        m[key] = tensor;
    } else {
      m[name] = t;
    }
  }
  weights_write(out, m);
  std::filesystem::copy_file(float_dir + "/config.json", out + "/config.json");
  config_edit(out, [](nlohmann::json& j) {
    j["quantization_config"] = {{"quant_method", "bitsandbytes"},
                                {"load_in_4bit", true},
                                {"_load_in_4bit", true},
                                {"load_in_8bit", false},
                                {"bnb_4bit_quant_type", "nf4"}};
  });
}

TEST(DecoderLoad, PrequantizedCheckpointLoadsAsItIs) {
  TempDir tmp;
  const ModelConfig c = as_qwen2(tiny_config());
  const std::string float_dir = model_dir(tmp, c, "float");
  biases_randomize(float_dir, 4);
  quant::QuantizeOptions o;
  o.quant_type = quant::QuantType::fp4;
  o.blocksize = 128;
  o.double_quant = true;
  o.storage = at::kFloat;
  const std::string skipped = "model.layers.1.mlp.gate_proj.weight";
  bnb_dir_write(float_dir, tmp.file("bnb"), o, skipped);

  LoadOptions same;
  same.quant = o;
  DecoderModel expect = DecoderModel::load(float_dir, same);
  LoadOptions other;  // nf4 / 64: used for the one unquantized linear only
  DecoderModel from_bnb = DecoderModel::load(tmp.file("bnb"), other);
  const quant::Quantized& q = from_bnb.block(0).linear("v_proj").base();
  EXPECT_EQ(q.state.quant_type, quant::QuantType::fp4);
  EXPECT_EQ(q.state.blocksize, 128);
  EXPECT_EQ(q.packed.scalar_type(), at::kFloat);
  EXPECT_EQ(q.state.shape, (std::vector<int64_t>{32, 64}));
  EXPECT_EQ(from_bnb.block(1).linear("gate_proj").base().state.blocksize, 64);
  EXPECT_EQ(from_bnb.block(1).linear("gate_proj").base().state.quant_type, quant::QuantType::nf4);

  DecoderModel from_bnb_same = DecoderModel::load(tmp.file("bnb"), same);
  const at::Tensor tokens = random_tokens(2, 7, c.vocab_size, 8);
  EXPECT_TRUE(at::equal(from_bnb_same.forward_logits(tokens), expect.forward_logits(tokens)));
}

TEST(DecoderLoad, PrequantizedShapeIsCheckedThroughTheQuantState) {
  TempDir tmp;
  ModelConfig c = tiny_config(1);
  const std::string float_dir = model_dir(tmp, c, "float");
  bnb_dir_write(float_dir, tmp.file("bnb"), quant::QuantizeOptions{}, "");
  config_edit(tmp.file("bnb"), [](nlohmann::json& j) { j["intermediate_size"] = 128; });
  const std::string msg =
      invalid_argument_message([&] { DecoderModel::load(tmp.file("bnb"), LoadOptions{}); });
  EXPECT_TRUE(contains(msg,
                       "'model.layers.0.mlp.down_proj.weight' has shape [64, 96], "
                       "config.json implies [64, 128]"))
      << msg;
}

TEST(DecoderLoad, MissingTensorNamesItAndTheShape) {
  TempDir tmp;
  const ModelConfig c = tiny_config();
  for (const char* name : {"model.layers.1.mlp.up_proj.weight", "model.norm.weight",
                           "lm_head.weight", "model.layers.0.post_attention_layernorm.weight"}) {
    const std::string dir = model_dir(tmp, c, std::string("m_") + name);
    weights_edit(dir, [&](TensorMap& m) { m.erase(name); });
    const std::string msg =
        invalid_argument_message([&] { DecoderModel::load(dir, LoadOptions{}); });
    EXPECT_TRUE(contains(msg, dir + ": tensor '" + name + "' is missing")) << msg;
    EXPECT_TRUE(contains(msg, "config.json implies [")) << msg;
  }
  const ModelConfig q = as_qwen2(tiny_config(1));
  const std::string dir = model_dir(tmp, q, "qwen");
  weights_edit(dir, [&](TensorMap& m) { m.erase("model.layers.0.self_attn.k_proj.bias"); });
  const std::string msg = invalid_argument_message([&] { DecoderModel::load(dir, LoadOptions{}); });
  EXPECT_TRUE(contains(msg,
                       "tensor 'model.layers.0.self_attn.k_proj.bias' is missing "
                       "(config.json implies [32]"))
      << msg;
}

TEST(DecoderLoad, WrongShapeNamesTheTensorAndBothShapes) {
  TempDir tmp;
  const ModelConfig c = tiny_config();
  const struct {
    const char* name;
    std::vector<int64_t> shape;
    const char* expect;
  } cases[] = {
      {"model.layers.0.self_attn.k_proj.weight",
       {16, 64},
       "has shape [16, 64], config.json implies [32, 64]"},
      {"model.layers.1.mlp.down_proj.weight",
       {96, 64},
       "has shape [96, 64], config.json implies [64, 96]"},
      {"model.norm.weight", {63}, "has shape [63], config.json implies [64]"},
      {"model.embed_tokens.weight",
       {100, 64},
       "has shape [100, 64], config.json implies [101, 64]"},
      {"lm_head.weight", {101, 64, 1}, "has shape [101, 64, 1], config.json implies [101, 64]"},
  };
  for (const auto& k : cases) {
    const std::string dir = model_dir(tmp, c, std::string("m_") + k.name);
    weights_edit(dir, [&](TensorMap& m) { m[k.name] = at::zeros(k.shape); });
    const std::string msg =
        invalid_argument_message([&] { DecoderModel::load(dir, LoadOptions{}); });
    EXPECT_TRUE(contains(msg, std::string("tensor '") + k.name + "' " + k.expect)) << msg;
  }
}

TEST(DecoderLoad, UnusableDtypeNamesTheTensor) {
  TempDir tmp;
  const std::string dir = model_dir(tmp, tiny_config(1), "m");
  weights_edit(dir, [&](TensorMap& m) {
    m["model.layers.0.mlp.up_proj.weight"] = at::zeros({96, 64}, at::kInt);
  });
  const std::string msg = invalid_argument_message([&] { DecoderModel::load(dir, LoadOptions{}); });
  EXPECT_TRUE(contains(msg, "tensor 'model.layers.0.mlp.up_proj.weight' has dtype I32")) << msg;
}

TEST(DecoderLoad, OtherQuantizationMethodsAreRejected) {
  TempDir tmp;
  const std::string dir = model_dir(tmp, tiny_config(1), "m");
  const struct {
    nlohmann::json config;
    const char* name;
  } cases[] = {
      {{{"quant_method", "bitsandbytes"}, {"load_in_8bit", true}}, "bitsandbytes-8bit"},
      {{{"quant_method", "gptq"}, {"bits", 4}}, "gptq"},
      {{{"quant_method", "awq"}, {"bits", 4}}, "awq"},
      {{{"quant_method", "hqq"}}, "hqq"},
      {{{"quant_method", "aqlm"}}, "aqlm"},
  };
  for (const auto& k : cases) {
    config_edit(dir, [&](nlohmann::json& j) { j["quantization_config"] = k.config; });
    const std::string msg =
        invalid_argument_message([&] { DecoderModel::load(dir, LoadOptions{}); });
    EXPECT_TRUE(contains(msg, std::string("quantization method '") + k.name + "'")) << msg;
    EXPECT_TRUE(contains(msg, "config.json")) << msg;
  }
}

// ------------------------------------------------------------------------------------------
// Loss

struct LossFixture : public ::testing::Test {
  void SetUp() override {
    dir = model_dir(tmp, tiny_config(1), "m");
    model = std::make_unique<DecoderModel>(DecoderModel::load(dir, LoadOptions{}));
    at::Generator gen = test_gen(11);
    normed = at::randn({3, 13, 64}, gen, at::TensorOptions().dtype(at::kFloat));
    labels = at::randint(0, 101, {3, 13}, gen, at::TensorOptions().dtype(at::kLong));
    labels[0][5] = -100;  // ignored positions, one of them the first (never a target anyway)
    labels[1][0] = -100;
    labels[2].narrow(0, 7, 6).fill_(-100);
  }
  // transformers' ForCausalLMLoss on the full logits: shift, fp32, sum over targets / n.
  at::Tensor full_loss(const at::Tensor& h, double normalizer) const {
    const at::Tensor logits = model->logits(h).narrow(1, 0, 12).reshape({-1, 101}).to(at::kFloat);
    const at::Tensor targets = labels.narrow(1, 1, 12).reshape({-1});
    return at::cross_entropy_loss(logits, targets, {}, at::Reduction::Sum, -100) / normalizer;
  }
  int64_t targets() const { return (labels.narrow(1, 1, 12) != -100).sum().item<int64_t>(); }

  TempDir tmp;
  std::string dir;
  std::unique_ptr<DecoderModel> model;
  at::Tensor normed, labels;
};

TEST_F(LossFixture, ChunkSizesAgreeWithFullCrossEntropy) {
  const int64_t n = targets();
  ASSERT_EQ(n, 3 * 12 - 1 - 6);  // labels[0][5] and labels[2][7..12]; labels[1][0] is never one
  const double full = full_loss(normed, static_cast<double>(n)).item<double>();
  for (int64_t chunk : {1, 7, 29, 1024}) {
    const LossResult r = model->loss(normed, labels, chunk);
    EXPECT_EQ(r.num_targets, n) << chunk;
    EXPECT_EQ(r.loss.dim(), 0) << chunk;
    EXPECT_EQ(r.loss.scalar_type(), at::kFloat) << chunk;
    EXPECT_NEAR(r.loss.item<double>(), full, kLossRelTol * std::abs(full)) << "chunk " << chunk;
  }
  EXPECT_NEAR(model->loss(normed, labels, 7).loss.item<double>(),
              model->loss(normed, labels, 1024).loss.item<double>(), kLossRelTol * std::abs(full));
}

TEST_F(LossFixture, GradientMatchesAutogradThroughFullLogits) {
  for (double normalizer : {0.0, 64.0}) {
    const double n = normalizer > 0 ? normalizer : static_cast<double>(targets());
    for (int64_t chunk : {7, 1024}) {
      const at::Tensor h = normed.clone().requires_grad_(true);
      const LossResult r = model->loss(h, labels, chunk, normalizer);
      (r.loss * 3.0).backward();  // a non-unit upstream gradient
      const at::Tensor h_ref = normed.clone().requires_grad_(true);
      (full_loss(h_ref, n) * 3.0).backward();
      ASSERT_TRUE(h.grad().defined());
      EXPECT_EQ(h.grad().sizes(), normed.sizes());
      EXPECT_LE(max_abs_diff(h.grad(), h_ref.grad()), kGradTol * max_abs(h_ref.grad()))
          << "chunk " << chunk << ", normalizer " << normalizer;
      // The last position and ignored targets get no gradient.
      EXPECT_EQ(max_abs(h.grad().select(1, 12)), 0.0);
      EXPECT_EQ(max_abs(h.grad()[0][4]), 0.0);
      EXPECT_GT(max_abs(h.grad()[0][5]), 0.0);
    }
  }
}

TEST_F(LossFixture, IgnoredLabelsAndNormalizer) {
  const LossResult base = model->loss(normed, labels, 7);
  // Changing what sits at ignored positions' hidden states changes nothing.
  at::Tensor h = normed.clone();
  h[0][4].fill_(3.0);
  h[2][10].fill_(-2.0);
  EXPECT_EQ(model->loss(h, labels, 7).loss.item<float>(), base.loss.item<float>());
  // The normalizer only rescales.
  const LossResult scaled = model->loss(normed, labels, 7, 100.0);
  EXPECT_EQ(scaled.num_targets, base.num_targets);
  EXPECT_NEAR(scaled.loss.item<double>() * 100.0 / base.num_targets, base.loss.item<double>(),
              kLossRelTol * base.loss.item<double>());
  // Nothing to predict: loss 0, zero gradient.
  const at::Tensor none = at::full({2, 5}, -100, at::kLong);
  const at::Tensor h0 = normed.narrow(1, 0, 5).narrow(0, 0, 2).clone().requires_grad_(true);
  const LossResult empty = model->loss(h0, none);
  EXPECT_EQ(empty.num_targets, 0);
  EXPECT_EQ(empty.loss.item<double>(), 0.0);
  empty.loss.backward();
  EXPECT_EQ(max_abs(h0.grad()), 0.0);
  // One token per row: no targets either.
  EXPECT_EQ(model->loss(normed.narrow(1, 0, 1), labels.narrow(1, 0, 1)).num_targets, 0);
}

TEST_F(LossFixture, BadLabelsAndShapes) {
  at::Tensor bad = labels.clone();
  bad[1][3] = 101;
  std::string msg = invalid_argument_message([&] { model->loss(normed, bad); });
  EXPECT_TRUE(contains(msg, "label 101 is out of range [0, 101)")) << msg;
  bad[1][3] = -5;
  msg = invalid_argument_message([&] { model->loss(normed, bad); });
  EXPECT_TRUE(contains(msg, "label -5 is out of range")) << msg;
  msg = invalid_argument_message([&] { model->loss(normed, labels.narrow(1, 0, 12)); });
  EXPECT_TRUE(contains(msg, "labels must be integers [3, 13]")) << msg;
  msg = invalid_argument_message([&] { model->loss(normed, labels, 0); });
  EXPECT_TRUE(contains(msg, "chunk_tokens 0")) << msg;
}

// ------------------------------------------------------------------------------------------
// Adapters

lora::LoraConfig lora_config() {
  lora::LoraConfig l;
  l.rank = 4;
  l.alpha = 8.0;
  return l;
}

// B starts at zero; give it values so that the adapter changes the output.
void adapters_perturb(DecoderModel& m, uint64_t seed) {
  at::Generator gen = test_gen(seed);
  at::NoGradGuard no_grad;
  for (int64_t i = 0; i < m.num_blocks(); ++i)
    for (lora::QLoraLinear& l : m.block(i).linears)
      if (l.has_adapter()) l.lora_B().normal_(0.0, 0.05, gen);
}

TEST(DecoderAdapters, InitIsSeededAndTargeted) {
  TempDir tmp;
  const std::string dir = model_dir(tmp, tiny_config(), "m");
  DecoderModel a = DecoderModel::load(dir, LoadOptions{});
  DecoderModel b = DecoderModel::load(dir, LoadOptions{});
  a.adapters_init(lora_config(), {"q_proj", "v_proj", "down_proj"}, 7);
  b.adapters_init(lora_config(), {"q_proj", "v_proj", "down_proj"}, 7);
  const std::vector<at::Tensor> pa = a.adapter_parameters(), pb = b.adapter_parameters();
  ASSERT_EQ(pa.size(), 2u * 3u * 2u);  // A and B of 3 linears in 2 blocks
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_TRUE(at::equal(pa[i], pb[i])) << i;
    EXPECT_TRUE(pa[i].requires_grad()) << i;
    EXPECT_EQ(pa[i].scalar_type(), at::kFloat) << i;
  }
  // Order: block 0 q (A, B), v, down, then block 1.
  EXPECT_EQ(pa[0].sizes(), (at::IntArrayRef{4, 64}));
  EXPECT_EQ(pa[1].sizes(), (at::IntArrayRef{64, 4}));
  EXPECT_EQ(pa[3].sizes(), (at::IntArrayRef{32, 4}));
  EXPECT_EQ(pa[4].sizes(), (at::IntArrayRef{4, 96}));
  EXPECT_TRUE(pa[6].is_same(a.block(1).linear("q_proj").lora_A()));
  EXPECT_FALSE(a.block(0).linear("k_proj").has_adapter());
  // B = 0: the adapted model computes what the base does.
  DecoderModel base = DecoderModel::load(dir, LoadOptions{});
  const at::Tensor tokens = random_tokens(1, 6, 101, 1);
  EXPECT_TRUE(at::equal(a.forward_logits(tokens), base.forward_logits(tokens)));
  // Another seed, other A.
  b.adapters_init(lora_config(), {"q_proj", "v_proj", "down_proj"}, 8);
  EXPECT_FALSE(at::equal(a.adapter_parameters()[0], b.adapter_parameters()[0]));
  const std::string msg = invalid_argument_message([&] {
    a.adapters_init(lora_config(), {"q_proj", "fc1"}, 1);
  });
  EXPECT_TRUE(contains(msg, "LoRA target 'fc1'")) << msg;
}

TEST(DecoderAdapters, ExportWriteReadLoadGivesTheSameForward) {
  TempDir tmp;
  const ModelConfig c = as_qwen2(tiny_config());
  const std::string dir = model_dir(tmp, c, "m");
  DecoderModel a = DecoderModel::load(dir, LoadOptions{});
  a.adapters_init(lora_config(), lora::block_linear_names(), 3);
  adapters_perturb(a, 4);
  const at::Tensor tokens = random_tokens(2, 7, c.vocab_size, 2);
  const at::Tensor logits = a.forward_logits(tokens);
  DecoderModel base = DecoderModel::load(dir, LoadOptions{});
  EXPECT_GT(max_abs_diff(logits, base.forward_logits(tokens)), 1e-4) << "the adapter is used";

  const lora::PeftAdapter exported = a.adapters_export("tiny-qwen2");
  EXPECT_EQ(exported.base_model_name_or_path, "tiny-qwen2");
  EXPECT_EQ(exported.target_modules, lora::block_linear_names());
  EXPECT_EQ(exported.config.rank, 4);
  EXPECT_EQ(exported.weights.size(), 14u);
  ASSERT_EQ(exported.weights.count("model.layers.1.mlp.gate_proj"), 1u);
  EXPECT_EQ(exported.weights.at("model.layers.1.mlp.gate_proj").first.sizes(),
            (at::IntArrayRef{4, 64}));

  lora::peft_adapter_write(tmp.file("adapter"), exported);
  const lora::PeftAdapter read = lora::peft_adapter_read(tmp.file("adapter"));
  DecoderModel b = DecoderModel::load(dir, LoadOptions{});
  b.adapters_load(read);
  EXPECT_TRUE(at::equal(b.forward_logits(tokens), logits));
  DecoderModel d = DecoderModel::load(dir, LoadOptions{});
  d.adapters_load(exported);
  EXPECT_TRUE(at::equal(d.forward_logits(tokens), logits));
  // Exported tensors are copies: training a further does not change them.
  {
    at::NoGradGuard no_grad;
    a.block(0).linear("q_proj").lora_A().add_(1.0);
  }
  EXPECT_TRUE(at::equal(exported.weights.at("model.layers.0.self_attn.q_proj").first,
                        read.weights.at("model.layers.0.self_attn.q_proj").first));

  DecoderModel none = DecoderModel::load(dir, LoadOptions{});
  EXPECT_THROW(none.adapters_export("x"), std::logic_error);
}

TEST(DecoderAdapters, LoadChecksLayersAndShapes) {
  TempDir tmp;
  const std::string dir = model_dir(tmp, tiny_config(), "m");
  DecoderModel a = DecoderModel::load(dir, LoadOptions{});
  a.adapters_init(lora_config(), {"q_proj", "o_proj"}, 3);
  const lora::PeftAdapter good = a.adapters_export("m");

  lora::PeftAdapter extra = good;
  extra.weights["model.layers.2.self_attn.q_proj"] =
      good.weights.at("model.layers.0.self_attn.q_proj");
  DecoderModel b = DecoderModel::load(dir, LoadOptions{});
  std::string msg = invalid_argument_message([&] { b.adapters_load(extra); });
  EXPECT_TRUE(contains(msg, "adapter layer 'model.layers.2.self_attn.q_proj' does not exist"))
      << msg;
  EXPECT_FALSE(b.block(0).linear("q_proj").has_adapter()) << "nothing changes on an error";

  lora::PeftAdapter wrong = good;
  wrong.weights["model.layers.1.self_attn.o_proj"].first = at::zeros({4, 32});
  msg = invalid_argument_message([&] { b.adapters_load(wrong); });
  EXPECT_TRUE(contains(msg, "adapter layer 'model.layers.1.self_attn.o_proj': lora_A [4, 32]"))
      << msg;
  EXPECT_TRUE(contains(msg, "needs lora_A [4, 64] and lora_B [64, 4]")) << msg;

  lora::PeftAdapter rank = good;
  rank.config.rank = 8;
  msg = invalid_argument_message([&] { b.adapters_load(rank); });
  EXPECT_TRUE(contains(msg, "rank 8 on this layer needs lora_A [8, 64]")) << msg;
}

TEST(DecoderAdapters, LoraGradientsFlowAndMatchFullLogits) {
  TempDir tmp;
  const ModelConfig c = as_qwen2(tiny_config());
  const std::string dir = model_dir(tmp, c, "m");
  biases_randomize(dir, 5);
  DecoderModel m = DecoderModel::load(dir, LoadOptions{});
  m.adapters_init(lora_config(), lora::block_linear_names(), 3);
  const at::Tensor tokens = random_tokens(2, 9, c.vocab_size, 6);
  at::Tensor labels = tokens.clone();
  labels[1][4] = -100;

  const auto grads_of = [&](bool chunked) {
    std::vector<at::Tensor> params = m.adapter_parameters();
    for (at::Tensor& p : params) p.mutable_grad() = at::Tensor();
    at::Tensor x = m.embed(tokens);
    for (int64_t i = 0; i < m.num_blocks(); ++i) x = m.block_forward(i, x);
    const at::Tensor normed = m.final_norm(x);
    at::Tensor loss;
    if (chunked) {
      loss = m.loss(normed, labels, 5).loss;
    } else {
      const at::Tensor logits = m.logits(normed).narrow(1, 0, 8).reshape({-1, c.vocab_size});
      const at::Tensor t = labels.narrow(1, 1, 8).reshape({-1});
      loss = at::cross_entropy_loss(logits.to(at::kFloat), t, {}, at::Reduction::Mean, -100);
    }
    loss.backward();
    std::vector<at::Tensor> g;
    for (const at::Tensor& p : params)
      g.push_back(p.grad().defined() ? p.grad().clone() : at::Tensor());
    return g;
  };

  // B = 0 at init: B gets a gradient, A's is zero (it only acts through B).
  std::vector<at::Tensor> g = grads_of(true);
  ASSERT_EQ(g.size(), 28u);
  for (size_t i = 0; i < g.size(); i += 2) {
    ASSERT_TRUE(g[i].defined() && g[i + 1].defined()) << i;
    EXPECT_EQ(max_abs(g[i]), 0.0) << "A " << i;
    EXPECT_GT(max_abs(g[i + 1]), 0.0) << "B " << i;
  }
  // The frozen base: no gradient on biases or anything else the model owns.
  for (int64_t i = 0; i < m.num_blocks(); ++i)
    for (const lora::QLoraLinear& l : m.block(i).linears) {
      EXPECT_FALSE(l.base().packed.requires_grad()) << l.name();
      if (l.bias().defined()) {
        EXPECT_FALSE(l.bias().grad().defined()) << l.name();
      }
    }

  adapters_perturb(m, 8);
  g = grads_of(true);
  const std::vector<at::Tensor> ref = grads_of(false);
  for (size_t i = 0; i < g.size(); ++i) {
    EXPECT_GT(max_abs(g[i]), 0.0) << i;
    EXPECT_LE(max_abs_diff(g[i], ref[i]), 1e-5 * max_abs(ref[i])) << "parameter " << i;
  }
}

TEST(DecoderAdapters, DropoutOnlyWhenTraining) {
  TempDir tmp;
  const std::string dir = model_dir(tmp, tiny_config(1), "m");
  DecoderModel m = DecoderModel::load(dir, LoadOptions{});
  lora::LoraConfig l = lora_config();
  l.dropout = 0.25;
  m.adapters_init(l, {"q_proj", "up_proj"}, 1);
  adapters_perturb(m, 2);
  const at::Tensor x = m.embed(random_tokens(1, 6, 101, 3));
  const at::Tensor eval = m.block_forward(0, x);
  EXPECT_TRUE(at::equal(m.block_forward(0, x, false, test_gen(5)), eval));
  const at::Tensor t1 = m.block_forward(0, x, true, test_gen(5));
  const at::Tensor t2 = m.block_forward(0, x, true, test_gen(5));
  EXPECT_TRUE(at::equal(t1, t2)) << "same dropout seed, same output";
  EXPECT_GT(max_abs_diff(t1, eval), 1e-6);
}

}  // namespace
}  // namespace qlora::model
