// What the decoder reads from config.json beyond the sizes (tests/quant/test_model.cpp has those):
// RoPE scaling (rope_scaling of older files, rope_parameters of transformers 5), sliding windows
// (Mistral, Qwen2), which linears have biases, expected_weight_shapes, and rope_inv_freq /
// rope_cos_sin against the formulas in fp64.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "expect_error.h"
#include "model/decoder.h"
#include "model/init_model.h"
#include "model/model_config.h"
#include "model_test_util.h"

namespace qlora::model {
namespace {

using json = nlohmann::json;
using qlora::testing::contains;
using qlora::testing::invalid_argument_message;

const std::string kWhere = "/models/m/config.json";

// Llama 3.1 8B's config.json (transformers 4 spelling).
json llama31_json() {
  return json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "hidden_act": "silu",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": false, "torch_dtype": "bfloat16"})");
}

TEST(RopeConfig, Llama3FromRopeScaling) {
  const ModelConfig c = model_config_from_json(llama31_json(), kWhere);
  EXPECT_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.rope_scaling.rope_type, "llama3");
  EXPECT_EQ(c.rope_scaling.factor, 8.0);
  EXPECT_EQ(c.rope_scaling.low_freq_factor, 1.0);
  EXPECT_EQ(c.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 8192);
}

TEST(RopeConfig, Llama3FromRopeParameters) {
  json j = llama31_json();
  json rope = j["rope_scaling"];
  rope["rope_theta"] = 250000.0;
  rope.erase("original_max_position_embeddings");  // defaults to max_position_embeddings
  rope["factor"] = 32;                             // an integer is fine
  j.erase("rope_scaling");
  j.erase("rope_theta");
  j["rope_parameters"] = rope;
  const ModelConfig c = model_config_from_json(j, kWhere);
  EXPECT_EQ(c.rope_theta, 250000.0);
  EXPECT_EQ(c.rope_scaling.rope_type, "llama3");
  EXPECT_EQ(c.rope_scaling.factor, 32.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 131072);
}

TEST(RopeConfig, ThetaSourcesAndOldTypeKey) {
  json j = llama31_json();
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};  // transformers 4.3x spelling
  ModelConfig c = model_config_from_json(j, kWhere);
  EXPECT_EQ(c.rope_scaling.rope_type, "linear");
  EXPECT_EQ(c.rope_scaling.factor, 2.0);
  EXPECT_EQ(c.rope_theta, 500000.0);  // top level, the rope object has none
  // rope_scaling wins over rope_parameters; null or empty rope_scaling does not count.
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 1e6}};
  EXPECT_EQ(model_config_from_json(j, kWhere).rope_scaling.rope_type, "linear");
  for (const json& none : {json(), json::object()}) {
    j["rope_scaling"] = none;
    c = model_config_from_json(j, kWhere);
    EXPECT_EQ(c.rope_scaling.rope_type, "default") << none.dump();
    EXPECT_EQ(c.rope_theta, 1e6) << none.dump();
  }
  j.erase("rope_parameters");
  j.erase("rope_theta");
  EXPECT_EQ(model_config_from_json(j, kWhere).rope_theta, 10000.0);
}

TEST(RopeConfig, Errors) {
  const struct {
    json rope;
    const char* expect;
  } cases[] = {
      {{{"rope_type", "yarn"}, {"factor", 4.0}},
       "rope_scaling.rope_type 'yarn' is not supported (supported: default, linear, llama3)"},
      {{{"rope_type", "dynamic"}, {"factor", 4.0}}, "rope_type 'dynamic' is not supported"},
      {{{"rope_type", "llama3"}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0}},
       "key 'factor' must be a number"},
      {{{"rope_type", "llama3"}, {"factor", 8.0}, {"high_freq_factor", 4.0}},
       "key 'low_freq_factor' must be a number"},
      {{{"rope_type", "llama3"},
        {"factor", 8.0},
        {"low_freq_factor", 4.0},
        {"high_freq_factor", 4.0}},
       "0 < low_freq_factor < high_freq_factor"},
      {{{"rope_type", "linear"}, {"factor", 0}}, "factor must be positive"},
      {{{"rope_type", "linear"}, {"factor", 2.0}, {"partial_rotary_factor", 0.5}},
       "partial_rotary_factor"},
      {{{"rope_type", 3}}, "must be a string"},
  };
  for (const auto& k : cases) {
    json j = llama31_json();
    j["rope_scaling"] = k.rope;
    const std::string msg = invalid_argument_message([&] { model_config_from_json(j, kWhere); });
    EXPECT_EQ(msg.rfind(kWhere + ": ", 0), 0u) << msg;
    EXPECT_TRUE(contains(msg, k.expect)) << k.rope.dump() << ": " << msg;
  }
  json j = llama31_json();
  j["hidden_act"] = "gelu";
  EXPECT_TRUE(contains(invalid_argument_message([&] { model_config_from_json(j, kWhere); }),
                       "hidden_act 'gelu' is not supported (expected silu for LlamaForCausalLM)"));
}

// Found by fuzzing config.json (tests/fuzz/hf_config.cpp): sizes are bounded (a 30888888-layer
// config took minutes to name its tensors), and a key of the wrong type is one line naming it
// (nlohmann's type_error escaped from json::value()).
TEST(ModelConfigJson, HostileSizesAndTypes) {
  const auto message = [](const json& j) {
    return invalid_argument_message([&] { model_config_from_json(j, kWhere); });
  };
  json j = llama31_json();
  j["num_hidden_layers"] = 30888888;
  EXPECT_TRUE(contains(message(j), kWhere + ": key 'num_hidden_layers' is 30888888 (expected at most 4096)"))
      << message(j);
  j = llama31_json();
  j["vocab_size"] = int64_t{1} << 40;
  EXPECT_TRUE(contains(message(j), "key 'vocab_size' is 1099511627776 (expected at most 16777216)"));
  j = llama31_json();
  j["hidden_size"] = 4;
  EXPECT_TRUE(contains(message(j), "gives head_dim 0"));
  for (const char* key : {"max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"}) {
    j = llama31_json();
    j[key] = "8192";
    EXPECT_TRUE(contains(message(j), std::string("key '") + key + "' must be")) << key << ": " << message(j);
  }
  j = llama31_json();
  j.erase("architectures");
  j["model_type"] = 5;
  EXPECT_TRUE(contains(message(j), "key 'model_type' must be a string"));
}

TEST(SlidingWindowConfig, Mistral) {
  json j = llama31_json();
  j["architectures"] = {"MistralForCausalLM"};
  j["model_type"] = "mistral";
  j.erase("rope_scaling");
  ModelConfig c = model_config_from_json(j, kWhere);
  EXPECT_EQ(c.sliding_window, 4096) << "MistralConfig's default";
  EXPECT_EQ(c.attention_window(0), 4096);
  EXPECT_EQ(c.attention_window(31), 4096);
  j["sliding_window"] = nullptr;  // Mistral v0.2+
  c = model_config_from_json(j, kWhere);
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_EQ(c.attention_window(3), 0);
  j["sliding_window"] = 512;
  EXPECT_EQ(model_config_from_json(j, kWhere).attention_window(7), 512);
  j["sliding_window"] = 0;
  EXPECT_TRUE(contains(invalid_argument_message([&] { model_config_from_json(j, kWhere); }),
                       "key 'sliding_window' must be a positive integer"));
  // Mistral's attention has no biases, whatever the file says.
  j["sliding_window"] = 512;
  j["attention_bias"] = true;
  EXPECT_FALSE(model_config_from_json(j, kWhere).linear_has_bias("q_proj"));
}

TEST(SlidingWindowConfig, Qwen2) {
  json j = llama31_json();
  j["architectures"] = {"Qwen2ForCausalLM"};
  j["model_type"] = "qwen2";
  j.erase("rope_scaling");
  j["num_hidden_layers"] = 4;
  j["sliding_window"] = 128;
  ModelConfig c = model_config_from_json(j, kWhere);
  EXPECT_EQ(c.sliding_window, 0) << "use_sliding_window defaults to false";
  j["use_sliding_window"] = true;
  j["max_window_layers"] = 2;
  c = model_config_from_json(j, kWhere);
  EXPECT_EQ(c.sliding_window, 128);
  for (int64_t i = 0; i < 4; ++i) EXPECT_EQ(c.attention_window(i), i >= 2 ? 128 : 0) << i;
  j["layer_types"] = {"sliding_attention", "full_attention", "full_attention", "sliding_attention"};
  c = model_config_from_json(j, kWhere);
  for (int64_t i = 0; i < 4; ++i) EXPECT_EQ(c.attention_window(i), i % 3 == 0 ? 128 : 0) << i;
  j["layer_types"] = {"sliding_attention"};
  EXPECT_TRUE(contains(invalid_argument_message([&] { model_config_from_json(j, kWhere); }),
                       "'layer_types' must be a list of 4"));
  j["layer_types"] = {"full_attention", "chunked_attention", "full_attention", "full_attention"};
  EXPECT_TRUE(contains(invalid_argument_message([&] { model_config_from_json(j, kWhere); }),
                       "layer_types[1] 'chunked_attention'"));
  // Llama has no sliding window.
  json l = llama31_json();
  l["sliding_window"] = 16;
  EXPECT_EQ(model_config_from_json(l, kWhere).attention_window(0), 0);
}

TEST(BiasConfig, WhichLinearsHaveBiases) {
  json j = llama31_json();
  ModelConfig c = model_config_from_json(j, kWhere);
  for (const char* n :
       {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    EXPECT_FALSE(c.linear_has_bias(n)) << n;
  j["attention_bias"] = true;  // LLaMA: q, k, v and o
  j["mlp_bias"] = true;
  c = model_config_from_json(j, kWhere);
  for (const char* n :
       {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    EXPECT_TRUE(c.linear_has_bias(n)) << n;
  j["architectures"] = {"Qwen2ForCausalLM"};  // Qwen2: q, k, v only, mlp_bias ignored
  c = model_config_from_json(j, kWhere);
  EXPECT_TRUE(c.linear_has_bias("v_proj"));
  EXPECT_FALSE(c.linear_has_bias("o_proj"));
  EXPECT_FALSE(c.linear_has_bias("up_proj"));
  j["mlp_bias"] = "yes";
  j["architectures"] = {"LlamaForCausalLM"};
  EXPECT_TRUE(contains(invalid_argument_message([&] { model_config_from_json(j, kWhere); }),
                       "key 'mlp_bias' must be true or false"));
  EXPECT_TRUE(contains(invalid_argument_message([&] { c.linear_has_bias("qkv"); }),
                       "unknown block linear 'qkv'"));
}

TEST(ExpectedWeightShapes, EveryTensorOfTheFamily) {
  ModelConfig c = preset_config("tiny");
  auto m = expected_weight_shapes(c);
  EXPECT_EQ(m.size(), 3u + 4u * 9u);  // embed, lm_head, norm; 2 norms + 7 linears per layer
  EXPECT_EQ(m.at("model.layers.3.self_attn.k_proj.weight"), (std::vector<int64_t>{128, 256}));
  EXPECT_EQ(m.at("model.layers.0.mlp.down_proj.weight"), (std::vector<int64_t>{256, 688}));
  EXPECT_EQ(m.at("model.layers.2.post_attention_layernorm.weight"), (std::vector<int64_t>{256}));
  EXPECT_EQ(m.at("lm_head.weight"), (std::vector<int64_t>{2048, 256}));
  c.tie_word_embeddings = true;
  c.arch = Architecture::qwen2;
  c.attention_bias = true;
  m = expected_weight_shapes(c);
  EXPECT_EQ(m.count("lm_head.weight"), 0u);
  EXPECT_EQ(m.size(), 2u + 4u * 12u);
  EXPECT_EQ(m.at("model.layers.1.self_attn.v_proj.bias"), (std::vector<int64_t>{128}));
  EXPECT_EQ(m.count("model.layers.1.self_attn.o_proj.bias"), 0u);
  EXPECT_EQ(shape_str({3, 1, 4}), "[3, 1, 4]");
  EXPECT_EQ(shape_str({}), "[]");
}

TEST(ModelConfigJson, RoundTripsRopeAndWindows) {
  ModelConfig c = preset_config("tiny");
  c.rope_theta = 500000.0;
  c.rope_scaling = {"llama3", 8.0, 1.0, 4.0, 256};
  ModelConfig back = model_config_from_json(json::parse(model_config_json(c)), kWhere);
  EXPECT_EQ(back.rope_theta, 500000.0);
  EXPECT_EQ(back.rope_scaling.rope_type, "llama3");
  EXPECT_EQ(back.rope_scaling.original_max_position_embeddings, 256);
  EXPECT_EQ(back.rope_scaling.high_freq_factor, 4.0);

  c = preset_config("tiny");
  c.arch = Architecture::qwen2;
  c.architecture = "Qwen2ForCausalLM";
  c.model_type = "qwen2";
  c.attention_bias = true;
  c.sliding_window = 64;
  c.sliding_layers = {false, false, true, true};
  back = model_config_from_json(json::parse(model_config_json(c)), kWhere);
  EXPECT_EQ(back.sliding_window, 64);
  EXPECT_EQ(back.sliding_layers, c.sliding_layers);
  c.sliding_window = 0;
  back = model_config_from_json(json::parse(model_config_json(c)), kWhere);
  EXPECT_EQ(back.sliding_window, 0);

  c.arch = Architecture::mistral;
  c.architecture = "MistralForCausalLM";
  c.model_type = "mistral";
  c.attention_bias = false;
  back = model_config_from_json(json::parse(model_config_json(c)), kWhere);
  EXPECT_EQ(back.sliding_window, 0) << "written as null, not left out (which means 4096)";
}

// ------------------------------------------------------------------------------------------
// rope_inv_freq / rope_cos_sin (fp32) against the formulas in fp64. The exact fp32 bits are
// what tests/reference compares with transformers.

TEST(Rope, InvFreqDefaultAndLlama3) {
  ModelConfig c = model_config_from_json(llama31_json(), kWhere);
  const at::Tensor inv = rope_inv_freq(c);
  ASSERT_EQ(inv.sizes(), (at::IntArrayRef{64}));
  EXPECT_EQ(inv.scalar_type(), at::kFloat);
  int64_t bands[3] = {0, 0, 0};
  for (int64_t i = 0; i < 64; ++i) {
    const double base = std::pow(500000.0, -2.0 * static_cast<double>(i) / 128.0);
    const double wavelen = 2 * M_PI / base;
    double expect = base;
    if (wavelen > 8192.0) {
      expect = base / 8.0;
      ++bands[2];
    } else if (wavelen >= 8192.0 / 4.0) {
      const double smooth = (8192.0 / wavelen - 1.0) / 3.0;
      expect = (1 - smooth) * base / 8.0 + smooth * base;
      ++bands[1];
    } else {
      ++bands[0];
    }
    EXPECT_NEAR(inv[i].item<double>(), expect, 2e-6 * expect) << i;
  }
  EXPECT_GT(bands[0], 0);
  EXPECT_GT(bands[1], 0);
  EXPECT_GT(bands[2], 0);

  c.rope_scaling = RopeScaling{};
  const at::Tensor plain = rope_inv_freq(c);
  for (int64_t i = 0; i < 64; ++i) {
    const double expect = std::pow(500000.0, -2.0 * static_cast<double>(i) / 128.0);
    EXPECT_NEAR(plain[i].item<double>(), expect, 2e-6 * expect) << i;
  }
  EXPECT_EQ(plain[0].item<float>(), 1.0f);
  c.rope_scaling.rope_type = "linear";
  c.rope_scaling.factor = 4.0;
  EXPECT_TRUE(at::equal(rope_inv_freq(c), plain / 4.0));
}

TEST(Rope, CosSinLayout) {
  ModelConfig c = preset_config("tiny");  // head_dim 32
  const at::Tensor inv = rope_inv_freq(c);
  const auto [cos, sin] = rope_cos_sin(inv, 7, at::kFloat);
  ASSERT_EQ(cos.sizes(), (at::IntArrayRef{1, 7, 32}));
  for (int64_t t : {0, 3, 6})
    for (int64_t i : {0, 5, 15}) {
      const double angle = static_cast<double>(t) * inv[i].item<double>();
      for (int64_t half : {0, 16}) {  // [f, f]: both halves carry the same angles
        EXPECT_NEAR(cos[0][t][i + half].item<double>(), std::cos(angle), 1e-6) << t << " " << i;
        EXPECT_NEAR(sin[0][t][i + half].item<double>(), std::sin(angle), 1e-6) << t << " " << i;
      }
    }
  const auto [cos16, sin16] = rope_cos_sin(inv, 7, at::kBFloat16);
  EXPECT_EQ(cos16.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::equal(cos16, cos.to(at::kBFloat16)));
}

// Gemma 3 1B's config.json as published (transformers 4.50 spelling).
json gemma3_1b_json() {
  return json::parse(R"({
    "architectures": ["Gemma3ForCausalLM"], "attn_logit_softcapping": null, "bos_token_id": 2,
    "cache_implementation": "hybrid", "eos_token_id": [1, 106], "final_logit_softcapping": null,
    "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
    "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
    "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26,
    "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": null,
    "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16", "use_cache": true, "vocab_size": 262144})");
}

TEST(Gemma3Config, PublishedOneBillion) {
  const ModelConfig c = model_config_from_json(gemma3_1b_json(), kWhere);
  EXPECT_EQ(c.arch, Architecture::gemma3);
  EXPECT_TRUE(c.tie_word_embeddings);  // Gemma3TextConfig's default
  EXPECT_TRUE(c.gemma_norms && c.qk_norm);
  EXPECT_EQ(c.hidden_act, "gelu_pytorch_tanh");
  EXPECT_EQ(c.embed_scale, std::sqrt(1152.0));
  EXPECT_EQ(c.attention_scaling(), std::pow(256.0, -0.5));
  // sliding_window_pattern 6: layers 5, 11, 17, 23 global, the others local with window 512.
  for (int64_t i = 0; i < 26; ++i) {
    const bool global = (i + 1) % 6 == 0;
    EXPECT_EQ(c.attention_window(i), global ? 0 : 512) << i;
    EXPECT_EQ(c.layer_rope_theta(i), global ? 1e6 : 1e4) << i;
    EXPECT_EQ(c.layer_rope_scaling(i).rope_type, "default") << i;
  }
  const auto shapes = expected_weight_shapes(c);
  EXPECT_EQ(shapes.count("lm_head.weight"), 0u);
  EXPECT_EQ(shapes.at("model.layers.3.pre_feedforward_layernorm.weight"),
            std::vector<int64_t>{1152});
  EXPECT_EQ(shapes.at("model.layers.3.post_feedforward_layernorm.weight"),
            std::vector<int64_t>{1152});
  EXPECT_EQ(shapes.at("model.layers.3.self_attn.q_norm.weight"), std::vector<int64_t>{256});
  EXPECT_EQ(shapes.at("model.layers.3.self_attn.q_proj.weight"),
            (std::vector<int64_t>{1024, 1152}));
  EXPECT_EQ(block_norms(c).size(), 6u);
}

TEST(Gemma3Config, RopeScalingAppliesToGlobalLayersOnly) {
  json j = gemma3_1b_json();  // Gemma 3 4B's text part: linear scaling 8 on the global layers
  j["rope_scaling"] = {{"factor", 8.0}, {"rope_type", "linear"}};
  const ModelConfig c = model_config_from_json(j, kWhere);
  EXPECT_EQ(c.layer_rope_scaling(5).rope_type, "linear");
  EXPECT_EQ(c.layer_rope_scaling(5).factor, 8.0);
  EXPECT_EQ(c.layer_rope_scaling(0).rope_type, "default");
  EXPECT_TRUE(at::equal(rope_inv_freq(c, 5), rope_inv_freq(c, 11)));
  EXPECT_FALSE(at::equal(rope_inv_freq(c, 5), rope_inv_freq(c, 0)));
  // transformers 5's spelling: rope_parameters by layer type, layer_types.
  j.erase("rope_scaling");
  j.erase("rope_local_base_freq");
  j.erase("sliding_window_pattern");
  j["rope_parameters"] = {
      {"full_attention", {{"rope_type", "linear"}, {"factor", 8.0}, {"rope_theta", 1e6}}},
      {"sliding_attention", {{"rope_type", "default"}, {"rope_theta", 1e4}}}};
  j["layer_types"] = json::array();
  for (int i = 0; i < 26; ++i)
    j["layer_types"].push_back((i + 1) % 6 == 0 ? "full_attention" : "sliding_attention");
  const ModelConfig d = model_config_from_json(j, kWhere);
  for (int64_t i = 0; i < 26; ++i) {
    EXPECT_EQ(d.attention_window(i), c.attention_window(i)) << i;
    EXPECT_TRUE(at::equal(rope_inv_freq(d, i), rope_inv_freq(c, i))) << i;
  }
}

TEST(Gemma3Config, RefusesWhatGemma3DoesNotHave) {
  const std::pair<const char*, json> cases[] = {
      {"final_logit_softcapping", 30.0},
      {"attn_logit_softcapping", 50.0},
      {"hidden_activation", "gelu"},
      {"use_bidirectional_attention", true},
      {"query_pre_attn_scalar", 0}};
  for (const auto& [key, value] : cases) {
    json j = gemma3_1b_json();
    j[key] = value;
    const std::string msg = invalid_argument_message([&] { model_config_from_json(j, kWhere); });
    EXPECT_TRUE(contains(msg, kWhere) && contains(msg, key)) << key << ": " << msg;
  }
}

// init-model's config.json of a Qwen3 / Gemma 3 config reads back as that config.
TEST(Qwen3Config, InitModelConfigJsonRoundTrips) {
  for (const ModelConfig& c : {testing::as_qwen3(testing::tiny_config(3)),
                               testing::as_gemma3(testing::tiny_config(3), 5)}) {
    const ModelConfig r = model_config_from_json(json::parse(model_config_json(c)), kWhere);
    EXPECT_EQ(r.arch, c.arch) << c.architecture;
    EXPECT_EQ(r.head_dim, c.head_dim) << c.architecture;
    EXPECT_EQ(r.tie_word_embeddings, c.tie_word_embeddings) << c.architecture;
    EXPECT_EQ(r.attention_scaling(), c.attention_scaling()) << c.architecture;
    EXPECT_EQ(expected_weight_shapes(r), expected_weight_shapes(c)) << c.architecture;
    for (int64_t i = 0; i < 3; ++i) {
      EXPECT_EQ(r.attention_window(i), c.attention_window(i)) << c.architecture << " " << i;
      EXPECT_TRUE(at::equal(rope_inv_freq(r, i), rope_inv_freq(c, i))) << c.architecture << i;
    }
  }
}

TEST(Qwen3Config, DefaultsAndBiases) {
  json j = json::parse(R"({
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
    "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
    "num_attention_heads": 16, "num_key_value_heads": 8, "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000, "hidden_act": "silu",
    "tie_word_embeddings": true, "use_sliding_window": false, "sliding_window": null,
    "max_window_layers": 28, "attention_bias": false, "torch_dtype": "bfloat16"})");
  ModelConfig c = model_config_from_json(j, kWhere);  // Qwen3-0.6B without its head_dim key
  EXPECT_EQ(c.arch, Architecture::qwen3);
  EXPECT_EQ(c.head_dim, 128);  // Qwen3Config's default, not 1024 / 16
  EXPECT_TRUE(c.qk_norm);
  EXPECT_FALSE(c.gemma_norms);
  EXPECT_EQ(c.attention_window(27), 0);
  EXPECT_EQ(expected_weight_shapes(c).at("model.layers.0.self_attn.k_norm.weight"),
            std::vector<int64_t>{128});
  EXPECT_FALSE(c.linear_has_bias("o_proj"));
  j["attention_bias"] = true;  // on all four attention linears (LLaMA's rule, not Qwen2's)
  c = model_config_from_json(j, kWhere);
  for (const char* n : {"q_proj", "k_proj", "v_proj", "o_proj"}) EXPECT_TRUE(c.linear_has_bias(n));
  EXPECT_FALSE(c.linear_has_bias("down_proj"));
}

}  // namespace
}  // namespace qlora::model
