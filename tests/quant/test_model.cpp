// model unit tests: config.json -> ModelConfig for every supported family and its errors (each
// naming the file and the key), the block-linear name rule, preset sizes computed from the
// config, and init_model_write's determinism (same seed, same bytes).
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <functional>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "model/init_model.h"
#include "model/model_config.h"
#include "quant/tensor_io.h"
#include "temp_dir.h"

#include "expect_error.h"

namespace qlora::model {
namespace {

using io::testing::file_read;
using io::testing::TempDir;
using json = nlohmann::json;

const std::string kWhere = "/models/m/config.json";

using qlora::testing::contains;
using qlora::testing::invalid_argument_message;

json llama_json() {
  return json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": false,
    "torch_dtype": "bfloat16"})");
}

// Parameter count of a LLaMA-family model, from its config alone.
int64_t param_count(const ModelConfig& c) {
  const int64_t h = c.hidden_size, q = c.num_attention_heads * c.head_dim;
  const int64_t kv = c.num_key_value_heads * c.head_dim, f = c.intermediate_size;
  const int64_t per_layer = h * q + 2 * h * kv + q * h + 3 * h * f + 2 * h;
  return c.vocab_size * h * (c.tie_word_embeddings ? 1 : 2) + c.num_hidden_layers * per_layer + h;
}

// ------------------------------------------------------------------------------------------
// model_config_from_json

TEST(ModelConfigFromJson, Llama) {
  const ModelConfig c = model_config_from_json(llama_json(), kWhere);
  EXPECT_EQ(c.arch, Architecture::llama);
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.model_type, "llama");
  EXPECT_EQ(c.vocab_size, 32000);
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.intermediate_size, 11008);
  EXPECT_EQ(c.num_hidden_layers, 32);
  EXPECT_EQ(c.num_attention_heads, 32);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.max_position_embeddings, 4096);
  EXPECT_EQ(c.rms_norm_eps, 1e-05);
  EXPECT_EQ(c.rope_theta, 500000.0);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_EQ(c.torch_dtype, "bfloat16");
}

TEST(ModelConfigFromJson, Mistral) {
  json j = llama_json();
  j["architectures"] = {"MistralForCausalLM"};
  j["model_type"] = "mistral";
  j["head_dim"] = 96;  // explicit, not hidden / heads
  j.erase("torch_dtype");
  j["dtype"] = "float16";  // transformers 5 spelling
  j.erase("rope_theta");
  j["rope_parameters"] = {{"rope_theta", 1000000.0}, {"rope_type", "default"}};
  const ModelConfig c = model_config_from_json(j, kWhere);
  EXPECT_EQ(c.arch, Architecture::mistral);
  EXPECT_EQ(c.architecture, "MistralForCausalLM");
  EXPECT_EQ(c.model_type, "mistral");
  EXPECT_EQ(c.head_dim, 96);
  EXPECT_EQ(c.torch_dtype, "float16");
  EXPECT_EQ(c.rope_theta, 1000000.0);
  EXPECT_FALSE(c.attention_bias);
}

TEST(ModelConfigFromJson, Qwen2HasAttentionBias) {
  for (const json& bias : {json(), json(false), json(true)}) {
    json j = llama_json();
    j["architectures"] = {"Qwen2ForCausalLM"};
    j["model_type"] = "qwen2";
    j["tie_word_embeddings"] = true;
    if (bias.is_null()) j.erase("attention_bias");
    else j["attention_bias"] = bias;
    const ModelConfig c = model_config_from_json(j, kWhere);
    EXPECT_EQ(c.arch, Architecture::qwen2);
    EXPECT_EQ(c.architecture, "Qwen2ForCausalLM");
    EXPECT_EQ(c.model_type, "qwen2");
    EXPECT_TRUE(c.attention_bias) << "attention_bias in the file: " << bias.dump();
    EXPECT_TRUE(c.tie_word_embeddings);
  }
}

TEST(ModelConfigFromJson, DefaultsAndModelTypeFallback) {
  json j = llama_json();
  j.erase("architectures");  // model_type alone identifies the family
  j.erase("num_key_value_heads");
  j.erase("max_position_embeddings");
  j.erase("rope_theta");
  j.erase("torch_dtype");
  const ModelConfig c = model_config_from_json(j, kWhere);
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.num_key_value_heads, 32);
  EXPECT_EQ(c.max_position_embeddings, 2048);
  EXPECT_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.torch_dtype, "float32");
  j["num_key_value_heads"] = nullptr;
  EXPECT_EQ(model_config_from_json(j, kWhere).num_key_value_heads, 32);
}

TEST(ModelConfigFromJson, UnsupportedArchitectureListsSupported) {
  EXPECT_EQ(supported_architectures(),
            "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
            "Gemma3ForCausalLM, Gemma3ForConditionalGeneration (its language model)");
  json j = llama_json();
  j["architectures"] = {"GPT2LMHeadModel"};
  j["model_type"] = "gpt2";
  std::string msg = invalid_argument_message([&] { model_config_from_json(j, kWhere); });
  EXPECT_EQ(msg.rfind(kWhere + ": ", 0), 0u) << msg;
  EXPECT_TRUE(contains(msg, "unsupported architecture 'GPT2LMHeadModel'")) << msg;
  EXPECT_TRUE(contains(msg, "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM")) << msg;

  j.erase("architectures");
  msg = invalid_argument_message([&] { model_config_from_json(j, kWhere); });
  EXPECT_TRUE(contains(msg, "unsupported architecture 'gpt2'")) << msg;

  msg = invalid_argument_message([&] { model_config_from_json(json::object(), kWhere); });
  EXPECT_TRUE(contains(msg, "unsupported architecture")) << msg;
  EXPECT_TRUE(contains(msg, "Qwen2ForCausalLM")) << msg;
}

TEST(ModelConfigFromJson, MissingOrNonPositiveKeysNameTheKey) {
  const char* required[] = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                            "num_attention_heads"};
  for (const char* key : required) {
    for (const json& bad : {json(), json(0), json(-4), json("4096"), json(40.5)}) {
      json j = llama_json();
      if (bad.is_null()) j.erase(key);
      else j[key] = bad;
      const std::string msg = invalid_argument_message([&] { model_config_from_json(j, kWhere); });
      EXPECT_EQ(msg.rfind(kWhere + ": ", 0), 0u) << msg;
      EXPECT_TRUE(contains(msg, std::string("key '") + key + "' must be a positive integer"))
          << key << " = " << bad.dump() << ": " << msg;
    }
  }
  for (const char* key : {"num_key_value_heads", "head_dim"}) {
    for (const json& bad : {json(0), json(-8), json("8")}) {
      json j = llama_json();
      j[key] = bad;
      const std::string msg = invalid_argument_message([&] { model_config_from_json(j, kWhere); });
      EXPECT_TRUE(contains(msg, std::string("key '") + key + "'")) << key << ": " << msg;
    }
  }
}

TEST(ModelConfigFromJson, HeadsNotMultipleOfKvHeads) {
  json j = llama_json();
  j["num_attention_heads"] = 32;
  j["num_key_value_heads"] = 6;
  const std::string msg = invalid_argument_message([&] { model_config_from_json(j, kWhere); });
  EXPECT_EQ(msg.rfind(kWhere + ": ", 0), 0u) << msg;
  EXPECT_TRUE(contains(msg, "num_attention_heads 32 is not a multiple of num_key_value_heads 6"))
      << msg;
}

// ------------------------------------------------------------------------------------------
// is_block_linear_weight

TEST(BlockLinearWeight, Positives) {
  for (const char* layer : {"0", "7", "31", "120"})
    for (const char* proj : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}) {
      const std::string name = std::string("model.layers.") + layer + "." + proj + ".weight";
      EXPECT_TRUE(is_block_linear_weight(name)) << name;
    }
}

TEST(BlockLinearWeight, Negatives) {
  for (const char* name : {
           "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
           "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
           "model.layers.0.self_attn.q_proj.bias",          // Qwen2 biases stay unquantized
           "model.layers.0.self_attn.q_proj.weight.absmax",  // quant-state tensors
           "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4",
           "model.layers.0.mlp.gate_proj", "model.layers.x.mlp.up_proj.weight",
           "model.layers..mlp.up_proj.weight", "model.layers.-1.mlp.up_proj.weight",
           "base_model.model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.fc1.weight",
           "model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.self_attn.rotary_emb.inv_freq",
           "model.layers.0.mlp.up_proj.lora_A.weight", ""}) {
    EXPECT_FALSE(is_block_linear_weight(name)) << name;
  }
}

// ------------------------------------------------------------------------------------------
// Presets and init_model_write

TEST(Presets, SizesFromConfig) {
  const ModelConfig tiny = preset_config("tiny");
  EXPECT_EQ(tiny.architecture, "LlamaForCausalLM");
  EXPECT_EQ(tiny.head_dim * tiny.num_attention_heads, tiny.hidden_size);
  EXPECT_FALSE(tiny.tie_word_embeddings);
  EXPECT_EQ(tiny.torch_dtype, "float32");
  // 2 * 2048*256 (embed, lm_head) + 4 * (256*256*2 + 2*256*128 + 3*256*688 + 2*256) + 256
  EXPECT_EQ(param_count(tiny), 3950848);

  const ModelConfig small = preset_config("small");
  EXPECT_TRUE(small.tie_word_embeddings);
  EXPECT_EQ(small.torch_dtype, "bfloat16");
  // 32000*768 (tied) + 12 * (768*768*2 + 2*768*256 + 3*768*2048 + 2*768) + 768
  EXPECT_EQ(param_count(small), 100092672);
  EXPECT_GT(param_count(small), 95'000'000);
  EXPECT_LT(param_count(small), 105'000'000);

  // TinyLlama-1.1B's shape (its config.json: hidden 2048, 22 layers, 32 / 4 heads, FFN 5632,
  // vocab 32000, untied, bf16, rms_norm_eps 1e-5); transformers counts 1,100,048,384 parameters:
  // 2 * 32000*2048 + 22 * (2048*2048*2 + 2*2048*256 + 3*2048*5632 + 2*2048) + 2048
  const ModelConfig b1 = preset_config("1b");
  EXPECT_EQ(b1.hidden_size, 2048);
  EXPECT_EQ(b1.num_hidden_layers, 22);
  EXPECT_EQ(b1.num_attention_heads, 32);
  EXPECT_EQ(b1.num_key_value_heads, 4);
  EXPECT_EQ(b1.head_dim, 64);
  EXPECT_EQ(b1.intermediate_size, 5632);
  EXPECT_EQ(b1.vocab_size, 32000);
  EXPECT_FALSE(b1.tie_word_embeddings);
  EXPECT_EQ(b1.torch_dtype, "bfloat16");
  EXPECT_EQ(b1.rms_norm_eps, 1e-5);
  EXPECT_EQ(param_count(b1), 1100048384);

  // Each preset's config.json reads back as the same config.
  for (const char* preset : {"tiny", "small", "1b"}) {
    const ModelConfig c = preset_config(preset);
    const ModelConfig back =
        model_config_from_json(json::parse(model_config_json(c)), std::string(preset) + "/config.json");
    EXPECT_EQ(back.architecture, c.architecture) << preset;
    EXPECT_EQ(param_count(back), param_count(c)) << preset;
    EXPECT_EQ(back.num_key_value_heads, c.num_key_value_heads) << preset;
    EXPECT_EQ(back.head_dim, c.head_dim) << preset;
    EXPECT_EQ(back.tie_word_embeddings, c.tie_word_embeddings) << preset;
    EXPECT_EQ(back.torch_dtype, c.torch_dtype) << preset;
    EXPECT_EQ(back.rope_theta, c.rope_theta) << preset;
    EXPECT_EQ(back.rms_norm_eps, c.rms_norm_eps) << preset;
  }
}

TEST(Presets, UnknownPresetNamesTheValidOnes) {
  for (const char* bad : {"huge", "", "Tiny"}) {
    const std::string msg = invalid_argument_message([&] { preset_config(bad); });
    EXPECT_TRUE(contains(msg, std::string("unknown preset '") + bad + "'")) << msg;
    EXPECT_TRUE(contains(msg, "tiny, small or 1b")) << msg;
  }
}

TEST(InitModel, TinyWritesTheConfiguredTensors) {
  TempDir tmp;
  const std::string dir = tmp.file("nested/tiny");  // created as needed
  const ModelConfig c = preset_config("tiny");
  const InitReport r = init_model_write(c, 5, dir);
  EXPECT_EQ(r.num_params, param_count(c));
  EXPECT_EQ(r.nbytes, std::filesystem::file_size(dir + "/model.safetensors"));
  EXPECT_EQ(file_read(dir + "/config.json"), model_config_json(c));

  const io::ModelWeights w = io::ModelWeights::open_dir(dir);
  int64_t total = 0;
  for (const std::string& name : w.names()) {
    const io::TensorInfo& info = w.info(name);
    EXPECT_EQ(info.dtype, io::DType::F32) << name;
    total += info.numel();
  }
  EXPECT_EQ(total, param_count(c));
  EXPECT_EQ(w.names().size(), 2u + 4u * 9u + 1u);  // embed, lm_head, 4 x 9 per layer, norm
  EXPECT_EQ(w.info("model.layers.3.self_attn.k_proj.weight").shape,
            (std::vector<int64_t>{128, 256}));
  EXPECT_EQ(w.info("model.layers.0.mlp.down_proj.weight").shape, (std::vector<int64_t>{256, 688}));

  // transformers' init: linears N(0, 0.02), norms 1. 65536 samples: the std is within 2 %.
  const at::Tensor q = quant::tensor_from_weights(w, "model.layers.2.self_attn.q_proj.weight");
  EXPECT_NEAR(q.mean().item<double>(), 0.0, 1e-3);
  EXPECT_NEAR(q.std().item<double>(), 0.02, 0.02 * 0.02);
  const at::Tensor norm = quant::tensor_from_weights(w, "model.layers.2.input_layernorm.weight");
  EXPECT_TRUE(at::equal(norm, at::ones_like(norm)));
}

TEST(InitModel, SameSeedSameBytesOtherSeedOtherBytes) {
  TempDir tmp;
  const ModelConfig c = preset_config("tiny");
  init_model_write(c, 42, tmp.file("a"));
  init_model_write(c, 42, tmp.file("b"));
  init_model_write(c, 43, tmp.file("c"));
  const std::string a = file_read(tmp.file("a/model.safetensors"));
  ASSERT_GT(a.size(), 15'000'000u);
  EXPECT_TRUE(a == file_read(tmp.file("b/model.safetensors"))) << "seed 42 twice differs";
  EXPECT_FALSE(a == file_read(tmp.file("c/model.safetensors"))) << "seeds 42 and 43 agree";
  EXPECT_EQ(file_read(tmp.file("a/config.json")), file_read(tmp.file("c/config.json")));
}

}  // namespace
}  // namespace qlora::model
