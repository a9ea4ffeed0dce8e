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
  } else if (preset == "1b") {  // TinyLlama-1.1B's shape: 1,100,048,384 parameters
    c.vocab_size = 32000;
    c.hidden_size = 2048;
    c.intermediate_size = 5632;
    c.num_hidden_layers = 22;
    c.num_attention_heads = 32;
    c.num_key_value_heads = 4;
    c.max_position_embeddings = 2048;
    c.torch_dtype = "bfloat16";
  } else {
    throw std::invalid_argument("unknown preset '" + preset + "' (expected tiny, small or 1b)");
  }
  c.head_dim = c.hidden_size / c.num_attention_heads;
  c.rms_norm_eps = preset == "1b" ? 1e-5 : 1e-6;  // TinyLlama's config.json says 1e-5
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
  j["hidden_act"] = c.hidden_act;
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
  const auto rope_json = [](double theta, const RopeScaling& r) {
    nlohmann::json o = {{"rope_theta", theta}, {"rope_type", r.rope_type}};
    if (r.rope_type != "default") o["factor"] = r.factor;
    if (r.rope_type == "llama3") {
      o["low_freq_factor"] = r.low_freq_factor;
      o["high_freq_factor"] = r.high_freq_factor;
      o["original_max_position_embeddings"] = r.original_max_position_embeddings;
    }
    return o;
  };
  nlohmann::json types = nlohmann::json::array();
  for (int64_t i = 0; i < c.num_hidden_layers; ++i)
    types.push_back(static_cast<size_t>(i) < c.sliding_layers.size() &&
                            c.sliding_layers[static_cast<size_t>(i)]
                        ? "sliding_attention"
                        : "full_attention");
  if (c.arch == Architecture::gemma3) {
    // Gemma3TextConfig's keys: rope by layer type, hidden_activation, no soft-capping.
    j.erase("hidden_act");
    j.erase("mlp_bias");
    j.erase("pretraining_tp");
    j["hidden_activation"] = c.hidden_act;
    j["query_pre_attn_scalar"] = c.query_pre_attn_scalar;
    j["final_logit_softcapping"] = nullptr;
    j["attn_logit_softcapping"] = nullptr;
    j["use_bidirectional_attention"] = false;
    j["rope_parameters"] = {
        {"full_attention", rope_json(c.rope_theta, c.rope_scaling)},
        {"sliding_attention", rope_json(c.sliding_rope_theta, c.sliding_rope_scaling)}};
    j["sliding_window"] = c.sliding_window > 0 ? nlohmann::json(c.sliding_window) : nlohmann::json();
    j["layer_types"] = types;
  } else {
    j["rope_parameters"] = rope_json(c.rope_theta, c.rope_scaling);
  }
  if (c.arch == Architecture::mistral)
    j["sliding_window"] =
        c.sliding_window > 0 ? nlohmann::json(c.sliding_window) : nlohmann::json();
  if (c.arch == Architecture::qwen2 || c.arch == Architecture::qwen3) {
    j["sliding_window"] =
        c.sliding_window > 0 ? nlohmann::json(c.sliding_window) : nlohmann::json();
    j["use_sliding_window"] = c.sliding_window > 0;
    j["max_window_layers"] = c.num_hidden_layers;
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
    // RMSNorm weights 1 (Gemma's are offsets from one: 0), drawing nothing.
    for (const auto& [norm, size] : block_norms(c)) {
      if (c.gemma_norms)
        add_zeros(p + norm + ".weight", size);
      else
        add_ones(p + norm + ".weight", size);
    }
    add_normal(p + "self_attn.q_proj.weight", {q, h});
    add_normal(p + "self_attn.k_proj.weight", {kv, h});
    add_normal(p + "self_attn.v_proj.weight", {kv, h});
    add_normal(p + "self_attn.o_proj.weight", {h, q});
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
  if (c.gemma_norms)
    add_zeros("model.norm.weight", h);
  else
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
