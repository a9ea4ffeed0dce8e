// config.json -> ModelConfig, and weight-name rules of the LLaMA family.
#include "model/model_config.h"

#include <regex>
#include <stdexcept>

namespace qlora::model {
namespace {

struct ArchInfo {
  const char* architecture;
  const char* model_type;
  Architecture arch;
};
constexpr ArchInfo kArchs[] = {{"LlamaForCausalLM", "llama", Architecture::llama},
                               {"MistralForCausalLM", "mistral", Architecture::mistral},
                               {"Qwen2ForCausalLM", "qwen2", Architecture::qwen2}};

int64_t positive_int(const nlohmann::json& j, const char* key, const std::string& where) {
  if (!j.contains(key) || !j[key].is_number_integer() || j[key].get<int64_t>() <= 0)
    throw std::invalid_argument(where + ": key '" + key +
                                "' must be a positive integer (is it a decoder config.json?)");
  return j[key].get<int64_t>();
}

}  // namespace

std::string supported_architectures() {
  std::string s;
  for (const ArchInfo& a : kArchs) s += (s.empty() ? "" : ", ") + std::string(a.architecture);
  return s;
}

ModelConfig model_config_from_json(const nlohmann::json& j, const std::string& where) {
  ModelConfig c;
  std::string arch;
  if (j.contains("architectures") && j["architectures"].is_array() && !j["architectures"].empty() &&
      j["architectures"][0].is_string())
    arch = j["architectures"][0].get<std::string>();
  const std::string model_type = j.value("model_type", std::string());
  const ArchInfo* found = nullptr;
  for (const ArchInfo& a : kArchs)
    if (arch == a.architecture || (arch.empty() && model_type == a.model_type)) found = &a;
  if (!found)
    throw std::invalid_argument(where + ": unsupported architecture '" +
                                (arch.empty() ? model_type : arch) +
                                "' (supported: " + supported_architectures() + ")");
  c.arch = found->arch;
  c.architecture = found->architecture;
  c.model_type = found->model_type;
  c.vocab_size = positive_int(j, "vocab_size", where);
  c.hidden_size = positive_int(j, "hidden_size", where);
  c.intermediate_size = positive_int(j, "intermediate_size", where);
  c.num_hidden_layers = positive_int(j, "num_hidden_layers", where);
  c.num_attention_heads = positive_int(j, "num_attention_heads", where);
  c.num_key_value_heads = j.contains("num_key_value_heads") && !j["num_key_value_heads"].is_null()
                              ? positive_int(j, "num_key_value_heads", where)
                              : c.num_attention_heads;
  c.head_dim = j.contains("head_dim") && !j["head_dim"].is_null()
                   ? positive_int(j, "head_dim", where)
                   : c.hidden_size / c.num_attention_heads;
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    throw std::invalid_argument(where + ": num_attention_heads " +
                                std::to_string(c.num_attention_heads) +
                                " is not a multiple of num_key_value_heads " +
                                std::to_string(c.num_key_value_heads));
  c.max_position_embeddings = j.value("max_position_embeddings", int64_t{2048});
  c.rms_norm_eps = j.value("rms_norm_eps", 1e-6);
  // transformers 5 writes rope_parameters.rope_theta; older files a top-level rope_theta.
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object())
    c.rope_theta = j["rope_parameters"].value("rope_theta", 10000.0);
  else
    c.rope_theta = j.value("rope_theta", 10000.0);
  c.tie_word_embeddings = j.value("tie_word_embeddings", false);
  c.attention_bias = c.arch == Architecture::qwen2 ? true : j.value("attention_bias", false);
  const char* dtype_key = j.contains("torch_dtype") ? "torch_dtype" : "dtype";
  if (j.contains(dtype_key) && j[dtype_key].is_string()) c.torch_dtype = j[dtype_key];
  return c;
}

bool is_block_linear_weight(const std::string& name) {
  static const std::regex re(
      R"(model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight)");
  return std::regex_match(name, re);
}

}  // namespace qlora::model
