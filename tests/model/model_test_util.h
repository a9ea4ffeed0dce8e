// Helpers for the model tests: tiny model directories (init_model_write, then edited tensor by
// tensor or key by key) and a fixed-seed generator.
#pragma once

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "io/safetensors.h"
#include "model/init_model.h"
#include "model/model_config.h"
#include "quant/tensor_io.h"

namespace qlora::model::testing {

// Small but with every feature of the real ones: GQA (4 query heads on 2 kv heads), odd vocab,
// an FFN width that is not a multiple of the 64-element quantization block.
inline ModelConfig tiny_config(int64_t layers = 2) {
  ModelConfig c = preset_config("tiny");
  c.vocab_size = 101;
  c.hidden_size = 64;
  c.intermediate_size = 96;
  c.num_hidden_layers = layers;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.max_position_embeddings = 128;
  c.rms_norm_eps = 1e-5;
  return c;
}

inline ModelConfig as_qwen2(ModelConfig c) {
  c.arch = Architecture::qwen2;
  c.architecture = "Qwen2ForCausalLM";
  c.model_type = "qwen2";
  c.attention_bias = true;
  return c;
}

inline ModelConfig as_mistral(ModelConfig c, int64_t sliding_window) {
  c.arch = Architecture::mistral;
  c.architecture = "MistralForCausalLM";
  c.model_type = "mistral";
  c.sliding_window = sliding_window;
  c.sliding_layers.assign(static_cast<size_t>(c.num_hidden_layers), sliding_window > 0);
  return c;
}

// Gemma 3's block on the tiny sizes: every other layer local with `sliding_window` and RoPE base
// 1e4, the others global with base 1e6 and linear scaling 2; query_pre_attn_scalar 12.
inline ModelConfig as_gemma3(ModelConfig c, int64_t sliding_window) {
  c.arch = Architecture::gemma3;
  c.architecture = "Gemma3ForCausalLM";
  c.model_type = "gemma3_text";
  c.qk_norm = c.gemma_norms = true;
  c.hidden_act = "gelu_pytorch_tanh";
  c.embed_scale = std::sqrt(static_cast<double>(c.hidden_size));
  c.query_pre_attn_scalar = 12.0;
  c.tie_word_embeddings = true;
  c.sliding_window = sliding_window;
  c.sliding_layers.clear();
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) c.sliding_layers.push_back(i % 2 == 0);
  c.rope_theta = 1e6;
  c.rope_scaling.rope_type = "linear";
  c.rope_scaling.factor = 2.0;
  c.sliding_rope_theta = 1e4;
  return c;
}

inline ModelConfig as_qwen3(ModelConfig c) {
  c.arch = Architecture::qwen3;
  c.architecture = "Qwen3ForCausalLM";
  c.model_type = "qwen3";
  c.qk_norm = true;
  c.attention_bias = true;
  c.head_dim = 24;  // not hidden / heads
  return c;
}

using TensorMap = std::map<std::string, at::Tensor>;

inline TensorMap weights_read(const std::string& dir) {
  const io::ModelWeights w = io::ModelWeights::open_dir(dir);
  TensorMap m;
  for (const std::string& name : w.names()) m[name] = quant::tensor_from_weights(w, name);
  return m;
}

inline void weights_write(const std::string& dir, const TensorMap& tensors) {
  io::SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  for (const auto& [name, t] : tensors) quant::writer_add(writer, name, t.contiguous());
  writer.write((std::filesystem::path(dir) / "model.safetensors").string());
}

// Reads model.safetensors, lets `edit` change the map, writes it back.
inline void weights_edit(const std::string& dir, const std::function<void(TensorMap&)>& edit) {
  TensorMap m = weights_read(dir);
  edit(m);
  weights_write(dir, m);
}

inline void config_edit(const std::string& dir, const std::function<void(nlohmann::json&)>& edit) {
  const std::string path = (std::filesystem::path(dir) / "config.json").string();
  std::ifstream in(path);
  nlohmann::json j = nlohmann::json::parse(in);
  in.close();
  edit(j);
  std::ofstream(path) << j.dump(2) << "\n";
}

inline at::Generator test_gen(uint64_t seed) {
  return at::make_generator<at::CPUGeneratorImpl>(seed);
}

// Gives every bias of the checkpoint random values (init_model_write writes zeros).
inline void biases_randomize(const std::string& dir, uint64_t seed) {
  at::Generator gen = test_gen(seed);
  weights_edit(dir, [&](TensorMap& m) {
    for (auto& [name, t] : m)
      if (name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0)
        t = at::normal(0.0, 0.1, t.sizes(), gen, at::TensorOptions().dtype(at::kFloat));
  });
}

}  // namespace qlora::model::testing
