// Random LLaMA models: one torch CPU generator seeded once, weights drawn in checkpoint order.
#include "model/init_model.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <filesystem>
#include <fstream>
#include <stdexcept>

#include "io/safetensors.h"
#include "quant/tensor_io.h"

namespace qlora::model {

ModelConfig preset_config(const std::string& preset) {
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.model_type = "llama";
  if (preset == "tiny") {
    c.vocab_size = 2048;
    c.hidden_size = 256;
    c.intermediate_size = 688;
    c.num_hidden_layers = 4;
    c.num_attention_heads = 8;
    c.num_key_value_heads = 4;
    c.max_position_embeddings = 512;
    c.torch_dtype = "float32";
  } else if (preset == "small") {
    c.vocab_size = 32000;
    c.hidden_size = 768;
    c.intermediate_size = 2048;
    c.num_hidden_layers = 12;
    c.num_attention_heads = 12;
    c.num_key_value_heads = 4;
    c.max_position_embeddings = 2048;
    c.tie_word_embeddings = true;
    c.torch_dtype = "bfloat16";
  } else {
    throw std::invalid_argument("unknown preset '" + preset + "' (expected tiny or small)");
  }
  c.head_dim = c.hidden_size / c.num_attention_heads;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 10000.0;
  return c;
}

std::string model_config_json(const ModelConfig& c) {
  nlohmann::json j;  // keys sorted, as transformers writes them
  j["architectures"] = {c.architecture};
  j["attention_bias"] = c.attention_bias;
  j["attention_dropout"] = 0.0;
  j["bos_token_id"] = 1;
  j["dtype"] = c.torch_dtype;
  j["eos_token_id"] = 2;
  j["head_dim"] = c.head_dim;
  j["hidden_act"] = "silu";
  j["hidden_size"] = c.hidden_size;
  j["initializer_range"] = 0.02;
  j["intermediate_size"] = c.intermediate_size;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["mlp_bias"] = c.mlp_bias;
  j["model_type"] = c.model_type;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["pad_token_id"] = nullptr;
  j["pretraining_tp"] = 1;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_parameters"] = {{"rope_theta", c.rope_theta}, {"rope_type", c.rope_scaling.rope_type}};
  if (c.rope_scaling.rope_type != "default") j["rope_parameters"]["factor"] = c.rope_scaling.factor;
  if (c.rope_scaling.rope_type == "llama3") {
    j["rope_parameters"]["low_freq_factor"] = c.rope_scaling.low_freq_factor;
    j["rope_parameters"]["high_freq_factor"] = c.rope_scaling.high_freq_factor;
    j["rope_parameters"]["original_max_position_embeddings"] =
        c.rope_scaling.original_max_position_embeddings;
  }
  if (c.arch == Architecture::mistral || c.arch == Architecture::qwen2)
    j["sliding_window"] =
        c.sliding_window > 0 ? nlohmann::json(c.sliding_window) : nlohmann::json();
  if (c.arch == Architecture::qwen2) {
    j["use_sliding_window"] = c.sliding_window > 0;
    j["max_window_layers"] = c.num_hidden_layers;
    nlohmann::json types = nlohmann::json::array();
    for (int64_t i = 0; i < c.num_hidden_layers; ++i)
      types.push_back(c.attention_window(i) > 0 ? "sliding_attention" : "full_attention");
    j["layer_types"] = types;
  }
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["use_cache"] = true;
  j["vocab_size"] = c.vocab_size;
  return j.dump(2) + "\n";
}

InitReport init_model_write(const ModelConfig& c, uint64_t seed, const std::string& out_dir) {
  const at::ScalarType dtype = c.torch_dtype == "bfloat16"  ? at::kBFloat16
                               : c.torch_dtype == "float16" ? at::kHalf
                                                            : at::kFloat;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  io::SafetensorsWriter writer;
  InitReport report;
  auto add_normal = [&](const std::string& name, std::vector<int64_t> shape) {
    at::Tensor t = at::normal(0.0, 0.02, shape, gen, at::TensorOptions().dtype(at::kFloat));
    report.num_params += t.numel();
    quant::writer_add(writer, name, t.to(dtype));
  };
  auto add_ones = [&](const std::string& name, int64_t n) {
    report.num_params += n;
    quant::writer_add(writer, name, at::ones({n}, at::TensorOptions().dtype(dtype)));
  };
  auto add_zeros = [&](const std::string& name, int64_t n) {  // biases, as nn.Linear's init_weights
    report.num_params += n;
    quant::writer_add(writer, name, at::zeros({n}, at::TensorOptions().dtype(dtype)));
  };
  const int64_t h = c.hidden_size, kv = c.num_key_value_heads * c.head_dim;
  const int64_t q = c.num_attention_heads * c.head_dim;
  add_normal("model.embed_tokens.weight", {c.vocab_size, h});
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    add_ones(p + "input_layernorm.weight", h);
    add_normal(p + "self_attn.q_proj.weight", {q, h});
    add_normal(p + "self_attn.k_proj.weight", {kv, h});
    add_normal(p + "self_attn.v_proj.weight", {kv, h});
    add_normal(p + "self_attn.o_proj.weight", {h, q});
    add_ones(p + "post_attention_layernorm.weight", h);
    add_normal(p + "mlp.gate_proj.weight", {c.intermediate_size, h});
    add_normal(p + "mlp.up_proj.weight", {c.intermediate_size, h});
    add_normal(p + "mlp.down_proj.weight", {h, c.intermediate_size});
    for (const auto& [module, n] : {std::pair<const char*, int64_t>{"self_attn.q_proj", q},
                                    {"self_attn.k_proj", kv},
                                    {"self_attn.v_proj", kv},
                                    {"self_attn.o_proj", h},
                                    {"mlp.gate_proj", c.intermediate_size},
                                    {"mlp.up_proj", c.intermediate_size},
                                    {"mlp.down_proj", h}}) {
      const std::string m(module);
      if (c.linear_has_bias(m.substr(m.find('.') + 1))) add_zeros(p + m + ".bias", n);
    }
  }
  add_ones("model.norm.weight", h);
  if (!c.tie_word_embeddings) add_normal("lm_head.weight", {c.vocab_size, h});
  writer.set_metadata("format", "pt");

  std::filesystem::create_directories(out_dir);
  const std::filesystem::path dir(out_dir);
  writer.write((dir / "model.safetensors").string());
  std::ofstream(dir / "config.json") << model_config_json(c);
  report.nbytes = std::filesystem::file_size(dir / "model.safetensors");
  return report;
}

}  // namespace qlora::model
