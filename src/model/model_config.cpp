// config.json -> ModelConfig, and weight-name rules of the LLaMA family.
#include "model/model_config.h"

#include <cmath>
#include <regex>
#include <sstream>
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
                               {"Qwen2ForCausalLM", "qwen2", Architecture::qwen2},
                               {"Qwen3ForCausalLM", "qwen3", Architecture::qwen3},
                               {"Gemma3ForCausalLM", "gemma3_text", Architecture::gemma3}};

// Bounds on the sizes a config.json may give, far above any real model (the largest have ~10^6
// vocabulary entries, ~10^5 hidden units, ~10^2 layers), so that every product of two sizes fits
// int64 and a hostile file cannot make us build millions of tensor names.
constexpr int64_t kMaxSize = int64_t{1} << 24;    // 16777216
constexpr int64_t kMaxLayers = int64_t{1} << 12;  // 4096

int64_t positive_int(const nlohmann::json& j, const char* key, const std::string& where,
                     int64_t max = kMaxSize) {
  if (!j.contains(key) || !j[key].is_number_integer() ||
      (j[key].is_number_unsigned() ? j[key].get<uint64_t>() == 0 : j[key].get<int64_t>() <= 0))
    throw std::invalid_argument(where + ": key '" + key +
                                "' must be a positive integer (is it a decoder config.json?)");
  if (j[key].is_number_unsigned() ? j[key].get<uint64_t>() > uint64_t(max)
                                  : j[key].get<int64_t>() > max)
    throw std::invalid_argument(where + ": key '" + key + "' is " + j[key].dump() +
                                " (expected at most " + std::to_string(max) + ")");
  return j[key].get<int64_t>();
}

// j[key] when it is present and not null, else `fallback`; the wrong type names the key.
std::string string_key(const nlohmann::json& j, const char* key, const std::string& fallback,
                       const std::string& where) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  if (!j[key].is_string())
    throw std::invalid_argument(where + ": key '" + key + "' must be a string");
  return j[key].get<std::string>();
}

bool bool_key(const nlohmann::json& j, const char* key, bool fallback, const std::string& where) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  if (!j[key].is_boolean())
    throw std::invalid_argument(where + ": key '" + key + "' must be true or false, not " +
                                j[key].dump());
  return j[key].get<bool>();
}

double number_key(const nlohmann::json& j, const std::string& key, const std::string& where) {
  if (!j.contains(key) || !j[key].is_number())
    throw std::invalid_argument(where + ": key '" + key + "' must be a number");
  return j[key].get<double>();
}

// One RoPE object (rope_scaling, rope_parameters or one layer type's entry of a nested
// rope_parameters) into `theta` / `r`; `key` names it in messages. rope_theta from the object
// when it has one (else `theta` stays as given); rope_type from "rope_type", else "type", else
// "default".
void rope_object(const nlohmann::json& j, const nlohmann::json& rope, const std::string& key,
                 const std::string& where, int64_t max_positions, double& theta, RopeScaling& r) {
  if (rope.contains("rope_theta") && !rope["rope_theta"].is_null())
    theta = number_key(rope, "rope_theta", where + ": " + key);
  const char* type_key = rope.contains("rope_type") ? "rope_type" : "type";
  if (rope.contains(type_key)) {
    if (!rope[type_key].is_string())
      throw std::invalid_argument(where + ": key '" + key + "." + type_key + "' must be a string");
    r.rope_type = rope[type_key].get<std::string>();
  }
  const std::string at = where + ": " + key;
  if (r.rope_type == "default") return;
  if (r.rope_type != "linear" && r.rope_type != "llama3")
    throw std::invalid_argument(where + ": " + key + "." + type_key + " '" + r.rope_type +
                                "' is not supported (supported: default, linear, llama3)");
  if (rope.contains("partial_rotary_factor") && !rope["partial_rotary_factor"].is_null() &&
      number_key(rope, "partial_rotary_factor", at) != 1.0)
    throw std::invalid_argument(where + ": " + key +
                                ".partial_rotary_factor other than 1 is not supported");
  r.factor = number_key(rope, "factor", at);
  if (!(r.factor > 0.0))
    throw std::invalid_argument(where + ": " + key + ".factor must be positive, not " +
                                rope["factor"].dump());
  if (r.rope_type == "linear") return;
  r.low_freq_factor = number_key(rope, "low_freq_factor", at);
  r.high_freq_factor = number_key(rope, "high_freq_factor", at);
  if (!(r.low_freq_factor > 0.0) || !(r.high_freq_factor > r.low_freq_factor))
    throw std::invalid_argument(where + ": " + key + ": llama3 needs 0 < low_freq_factor < " +
                                "high_freq_factor, not " + rope["low_freq_factor"].dump() +
                                " and " + rope["high_freq_factor"].dump());
  // A top-level original_max_position_embeddings wins (transformers' exception for Phi3-style
  // files), then the rope object's, then max_position_embeddings.
  if (j.contains("original_max_position_embeddings") &&
      !j["original_max_position_embeddings"].is_null())
    r.original_max_position_embeddings = positive_int(j, "original_max_position_embeddings", where);
  else if (rope.contains("original_max_position_embeddings"))
    r.original_max_position_embeddings =
        positive_int(rope, "original_max_position_embeddings", at);
  else
    r.original_max_position_embeddings = max_positions;
}

// transformers' PreTrainedConfig.convert_rope_params_to_dict + standardize_rope_params: a non-empty
// rope_scaling (older files) wins over rope_parameters (transformers 5); rope_theta from that
// object, else the top level. Gemma 3 (Gemma3TextConfig.convert_rope_params_to_dict): its
// rope_parameters is nested by layer type (full_attention, sliding_attention); an older file's
// rope_scaling applies to the full-attention layers, rope_theta (default 1e6) to those and
// rope_local_base_freq (default 1e4) to the sliding ones.
void rope_from_json(const nlohmann::json& j, const std::string& where, ModelConfig& c) {
  const nlohmann::json* rope = nullptr;
  std::string key;
  for (const char* k : {"rope_scaling", "rope_parameters"}) {
    if (rope == nullptr && j.contains(k) && j[k].is_object() && !j[k].empty()) {
      rope = &j[k];
      key = k;
    } else if (j.contains(k) && !j[k].is_null() && !j[k].is_object()) {
      throw std::invalid_argument(where + ": key '" + k + "' must be an object, not " +
                                  j[k].dump());
    }
  }
  const bool gemma = c.arch == Architecture::gemma3;
  c.rope_theta = gemma ? 1e6 : 10000.0;
  if (j.contains("rope_theta") && !j["rope_theta"].is_null())
    c.rope_theta = number_key(j, "rope_theta", where);
  if (!gemma) {
    if (rope != nullptr)
      rope_object(j, *rope, key, where, c.max_position_embeddings, c.rope_theta, c.rope_scaling);
    return;
  }
  c.sliding_rope_theta = 1e4;
  if (j.contains("rope_local_base_freq") && !j["rope_local_base_freq"].is_null())
    c.sliding_rope_theta = number_key(j, "rope_local_base_freq", where);
  const bool nested = rope != nullptr && key == "rope_parameters" &&
                      (rope->contains("full_attention") || rope->contains("sliding_attention"));
  if (!nested) {
    if (rope != nullptr)
      rope_object(j, *rope, key, where, c.max_position_embeddings, c.rope_theta, c.rope_scaling);
    return;
  }
  const std::pair<const char*, std::pair<double*, RopeScaling*>> types[] = {
      {"full_attention", {&c.rope_theta, &c.rope_scaling}},
      {"sliding_attention", {&c.sliding_rope_theta, &c.sliding_rope_scaling}}};
  for (const auto& [type, out] : types) {
    if (!rope->contains(type) || (*rope)[type].is_null()) continue;
    if (!(*rope)[type].is_object())
      throw std::invalid_argument(where + ": key 'rope_parameters." + type +
                                  "' must be an object, not " + (*rope)[type].dump());
    rope_object(j, (*rope)[type], std::string("rope_parameters.") + type, where,
                c.max_position_embeddings, *out.first, *out.second);
  }
}

// sliding_window: a positive integer, null (none) or absent (4096, the config classes' default).
int64_t window_key(const nlohmann::json& j, const std::string& where) {
  if (!j.contains("sliding_window")) return 4096;  // MistralConfig / Qwen2Config default
  if (j["sliding_window"].is_null()) return 0;
  return positive_int(j, "sliding_window", where);
}

// layer_types: one "full_attention" or "sliding_attention" per layer -> c.sliding_layers.
void layer_types_key(const nlohmann::json& j, const std::string& where, ModelConfig& c) {
  const size_t layers = static_cast<size_t>(c.num_hidden_layers);
  const nlohmann::json& types = j["layer_types"];
  if (!types.is_array() || types.size() != layers)
    throw std::invalid_argument(where + ": key 'layer_types' must be a list of " +
                                std::to_string(layers) + " layer types");
  for (size_t i = 0; i < layers; ++i) {
    const std::string t = types[i].is_string() ? types[i].get<std::string>() : types[i].dump();
    if (t != "full_attention" && t != "sliding_attention")
      throw std::invalid_argument(where + ": layer_types[" + std::to_string(i) + "] '" + t +
                                  "' (expected full_attention or sliding_attention)");
    c.sliding_layers[i] = t == "sliding_attention";
  }
}

void sliding_from_json(const nlohmann::json& j, const std::string& where, ModelConfig& c) {
  const size_t layers = static_cast<size_t>(c.num_hidden_layers);
  if (c.arch == Architecture::mistral) {
    c.sliding_window = window_key(j, where);
    c.sliding_layers.assign(layers, c.sliding_window > 0);
  } else if (c.arch == Architecture::gemma3) {
    // Gemma3TextConfig: sliding_window (null: none) on the sliding_attention layers of
    // layer_types, else of sliding_window_pattern (layer i is local unless (i + 1) % pattern == 0).
    // A local layer without a window still has the local RoPE.
    c.sliding_window = window_key(j, where);
    c.sliding_layers.assign(layers, false);
    if (j.contains("layer_types") && !j["layer_types"].is_null()) {
      layer_types_key(j, where, c);
    } else {
      int64_t pattern = 6;
      if (j.contains("sliding_window_pattern") && !j["sliding_window_pattern"].is_null())
        pattern = positive_int(j, "sliding_window_pattern", where, kMaxLayers);
      for (size_t i = 0; i < layers; ++i) c.sliding_layers[i] = (i + 1) % pattern != 0;
    }
  } else if (c.arch == Architecture::qwen2 || c.arch == Architecture::qwen3) {
    // Qwen2Config / Qwen3Config: sliding_window only with use_sliding_window; which layers from
    // layer_types, else layers i >= max_window_layers.
    c.sliding_window = bool_key(j, "use_sliding_window", false, where) ? window_key(j, where) : 0;
    c.sliding_layers.assign(layers, false);
    if (j.contains("layer_types") && !j["layer_types"].is_null()) {
      layer_types_key(j, where, c);
    } else if (c.sliding_window > 0) {
      int64_t first = 28;  // Qwen2Config's default
      if (j.contains("max_window_layers") && !j["max_window_layers"].is_null()) {
        if (!j["max_window_layers"].is_number_integer())
          throw std::invalid_argument(where + ": key 'max_window_layers' must be an integer");
        first = j["max_window_layers"].get<int64_t>();
      }
      for (size_t i = 0; i < layers; ++i) c.sliding_layers[i] = static_cast<int64_t>(i) >= first;
    }
    if (c.sliding_window == 0) c.sliding_layers.assign(layers, false);
  }
}

}  // namespace

int64_t ModelConfig::attention_window(int64_t layer) const {
  if (sliding_window <= 0 || layer < 0 || layer >= static_cast<int64_t>(sliding_layers.size()))
    return 0;
  return sliding_layers[static_cast<size_t>(layer)] ? sliding_window : 0;
}

bool ModelConfig::linear_has_bias(const std::string& short_name) const {
  if (short_name == "q_proj" || short_name == "k_proj" || short_name == "v_proj")
    return attention_bias;
  if (short_name == "o_proj") return attention_bias && arch != Architecture::qwen2;
  if (short_name == "gate_proj" || short_name == "up_proj" || short_name == "down_proj")
    return mlp_bias;
  throw std::invalid_argument("unknown block linear '" + short_name +
                              "' (expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj or "
                              "down_proj)");
}

namespace {
// Whether layer i uses the local RoPE (Gemma 3's sliding layers).
bool local_rope(const ModelConfig& c, int64_t layer) {
  return c.sliding_rope_theta > 0.0 && layer >= 0 &&
         layer < static_cast<int64_t>(c.sliding_layers.size()) &&
         c.sliding_layers[static_cast<size_t>(layer)];
}
}  // namespace

double ModelConfig::layer_rope_theta(int64_t layer) const {
  return local_rope(*this, layer) ? sliding_rope_theta : rope_theta;
}

const RopeScaling& ModelConfig::layer_rope_scaling(int64_t layer) const {
  return local_rope(*this, layer) ? sliding_rope_scaling : rope_scaling;
}

double ModelConfig::attention_scaling() const {
  // Python's x**-0.5 (pow), as transformers computes self.scaling.
  return std::pow(query_pre_attn_scalar > 0.0 ? query_pre_attn_scalar
                                              : static_cast<double>(head_dim),
                  -0.5);
}

std::vector<std::pair<std::string, int64_t>> block_norms(const ModelConfig& c) {
  std::vector<std::pair<std::string, int64_t>> norms = {{"input_layernorm", c.hidden_size},
                                                        {"post_attention_layernorm", c.hidden_size}};
  if (c.gemma_norms) {
    norms.emplace_back("pre_feedforward_layernorm", c.hidden_size);
    norms.emplace_back("post_feedforward_layernorm", c.hidden_size);
  }
  if (c.qk_norm) {
    norms.emplace_back("self_attn.q_norm", c.head_dim);
    norms.emplace_back("self_attn.k_norm", c.head_dim);
  }
  return norms;
}

std::string supported_architectures() {
  std::string s;
  for (const ArchInfo& a : kArchs) s += (s.empty() ? "" : ", ") + std::string(a.architecture);
  return s + ", Gemma3ForConditionalGeneration (its language model)";
}

std::string canonical_weight_name(const ModelConfig& c, const std::string& stored) {
  if (c.weights_prefix.empty()) return stored;
  for (const std::string& p : {c.weights_prefix, std::string("language_model.model.")})
    if (stored.rfind(p, 0) == 0) return "model." + stored.substr(p.size());
  return stored;
}

namespace {
std::string rope_summary(double theta, const RopeScaling& r) {
  std::ostringstream s;
  s << "rope base " << theta;
  if (r.rope_type != "default") s << " " << r.rope_type << " x" << r.factor;
  return s.str();
}
}  // namespace

std::string architecture_summary(const ModelConfig& c) {
  std::ostringstream s;
  s << c.architecture << ": " << (c.hidden_act == "silu" ? "SwiGLU" : "GELU-tanh") << " MLP";
  if (c.qk_norm) s << ", q/k norm";
  if (c.gemma_norms) s << ", (1 + w) norms x4 per block";
  if (c.embed_scale != 0.0) s << ", embeddings x sqrt(hidden)";
  if (c.query_pre_attn_scalar > 0.0)
    s << ", scores x query_pre_attn_scalar^-0.5 (" << c.query_pre_attn_scalar << ")";
  std::vector<std::string> biases;
  for (const char* n : {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    if (c.linear_has_bias(n)) biases.emplace_back(n);
  if (!biases.empty()) {
    s << ", biases on";
    for (const std::string& b : biases) s << " " << b;
  }
  s << "; ";
  int64_t local = 0;
  for (bool b : c.sliding_layers) local += b ? 1 : 0;
  if (local > 0) {
    if (local == c.num_hidden_layers)
      s << "all layers ";
    else
      s << local << " of " << c.num_hidden_layers << " layers ";
    s << (c.sliding_window > 0 ? "sliding (window " + std::to_string(c.sliding_window)
                               : std::string("local (no window"));
    if (c.sliding_rope_theta > 0.0) s << ", " << rope_summary(c.sliding_rope_theta, c.sliding_rope_scaling);
    s << (local == c.num_hidden_layers ? "), " : "), the others full attention, ");
  } else {
    s << "full attention, ";
  }
  s << rope_summary(c.rope_theta, c.rope_scaling) << (c.tie_word_embeddings ? ", tied" : ", untied")
    << " embeddings";
  return s.str();
}

namespace {

std::string first_architecture(const nlohmann::json& j) {
  if (j.is_object() && j.contains("architectures") && j["architectures"].is_array() &&
      !j["architectures"].empty() && j["architectures"][0].is_string())
    return j["architectures"][0].get<std::string>();
  return "";
}

// Gemma3TextConfig's defaults for the keys a config.json may leave out (the published multimodal
// checkpoints' text_config holds only the sizes that differ), under the file's own keys.
nlohmann::json gemma3_with_defaults(const nlohmann::json& j) {
  nlohmann::json out = {{"vocab_size", 262208},          {"hidden_size", 2304},
                        {"intermediate_size", 9216},     {"num_hidden_layers", 26},
                        {"num_attention_heads", 8},      {"num_key_value_heads", 4},
                        {"head_dim", 256},               {"max_position_embeddings", 131072},
                        {"rms_norm_eps", 1e-6},          {"query_pre_attn_scalar", 256},
                        {"sliding_window", 4096},        {"tie_word_embeddings", true}};
  out.update(j);
  return out;
}

ModelConfig model_config_parse(const nlohmann::json& j, const std::string& where);

}  // namespace

ModelConfig model_config_from_json(const nlohmann::json& j, const std::string& where) {
  const std::string arch = first_architecture(j);
  const std::string model_type =
      j.is_object() && j.contains("model_type") && j["model_type"].is_string() ? j["model_type"].get<std::string>() : "";
  if (arch == "Gemma3ForConditionalGeneration" || (arch.empty() && model_type == "gemma3")) {
    // Its language model: text_config (a Gemma3TextConfig), tensors under model.language_model.
    // (transformers 5) or language_model.model. (the published files); the vision tower and
    // projector are not read.
    if (!j.contains("text_config") || !j["text_config"].is_object())
      throw std::invalid_argument(where + ": key 'text_config' must be an object (a "
                                  "Gemma3ForConditionalGeneration keeps its language model's "
                                  "settings there)");
    nlohmann::json text = gemma3_with_defaults(j["text_config"]);
    text["architectures"] = {"Gemma3ForCausalLM"};
    for (const char* k : {"tie_word_embeddings", "torch_dtype", "dtype"})
      if (j.contains(k) && !j[k].is_null()) text[k] = j[k];
    ModelConfig c = model_config_parse(text, where + ": text_config");
    c.architecture = "Gemma3ForConditionalGeneration";
    c.model_type = "gemma3";
    c.weights_prefix = "model.language_model.";
    return c;
  }
  if (arch == "Gemma3ForCausalLM" || (arch.empty() && model_type == "gemma3_text"))
    return model_config_parse(gemma3_with_defaults(j), where);
  return model_config_parse(j, where);
}

namespace {

ModelConfig model_config_parse(const nlohmann::json& j, const std::string& where) {
  ModelConfig c;
  const std::string arch = first_architecture(j);
  if (!j.is_object()) throw std::invalid_argument(where + ": expected a JSON object");
  const std::string model_type = string_key(j, "model_type", "", where);
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
  c.num_hidden_layers = positive_int(j, "num_hidden_layers", where, kMaxLayers);
  c.num_attention_heads = positive_int(j, "num_attention_heads", where);
  c.num_key_value_heads = j.contains("num_key_value_heads") && !j["num_key_value_heads"].is_null()
                              ? positive_int(j, "num_key_value_heads", where)
                              : c.num_attention_heads;
  // Qwen3Config and Gemma3TextConfig default head_dim to 128 and 256, the others to
  // hidden_size / num_attention_heads.
  const bool gemma = c.arch == Architecture::gemma3;
  c.head_dim = j.contains("head_dim") && !j["head_dim"].is_null()
                   ? positive_int(j, "head_dim", where)
                   : (c.arch == Architecture::qwen3 ? 128
                      : gemma                       ? 256
                                                    : c.hidden_size / c.num_attention_heads);
  if (c.head_dim < 1)
    throw std::invalid_argument(where + ": hidden_size " + std::to_string(c.hidden_size) +
                                " / num_attention_heads " + std::to_string(c.num_attention_heads) +
                                " gives head_dim 0 (expected hidden_size >= num_attention_heads, "
                                "or a head_dim key)");
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    throw std::invalid_argument(
        where + ": num_attention_heads " + std::to_string(c.num_attention_heads) +
        " is not a multiple of num_key_value_heads " + std::to_string(c.num_key_value_heads));
  c.max_position_embeddings =
      j.contains("max_position_embeddings") && !j["max_position_embeddings"].is_null()
          ? positive_int(j, "max_position_embeddings", where)
          : 2048;
  c.rms_norm_eps = j.contains("rms_norm_eps") && !j["rms_norm_eps"].is_null()
                       ? number_key(j, "rms_norm_eps", where)
                       : 1e-6;
  rope_from_json(j, where, c);
  c.tie_word_embeddings = bool_key(j, "tie_word_embeddings", gemma, where);  // Gemma 3: true
  // What each family's attention / MLP modules construct, whatever else the file says.
  c.attention_bias = c.arch == Architecture::qwen2     ? true
                     : c.arch == Architecture::mistral ? false
                                                       : bool_key(j, "attention_bias", false, where);
  c.mlp_bias = c.arch == Architecture::llama && bool_key(j, "mlp_bias", false, where);
  // Gemma3TextConfig calls it hidden_activation (default gelu_pytorch_tanh); the others
  // hidden_act (silu).
  const char* act_key = gemma && j.contains("hidden_activation") ? "hidden_activation" : "hidden_act";
  const std::string expected_act = gemma ? "gelu_pytorch_tanh" : "silu";
  c.hidden_act = j.contains(act_key) && !j[act_key].is_null()
                     ? (j[act_key].is_string() ? j[act_key].get<std::string>() : j[act_key].dump())
                     : expected_act;
  if (c.hidden_act != expected_act)
    throw std::invalid_argument(where + ": " + act_key + " '" + c.hidden_act +
                                "' is not supported (expected " + expected_act + " for " +
                                c.architecture + ")");
  c.qk_norm = c.arch == Architecture::qwen3 || gemma;
  if (gemma) {
    c.gemma_norms = true;
    c.embed_scale = std::sqrt(static_cast<double>(c.hidden_size));  // hidden_size**0.5
    c.query_pre_attn_scalar = 256.0;  // Gemma3TextConfig's default
    if (j.contains("query_pre_attn_scalar") && !j["query_pre_attn_scalar"].is_null())
      c.query_pre_attn_scalar = number_key(j, "query_pre_attn_scalar", where);
    if (!(c.query_pre_attn_scalar > 0.0))
      throw std::invalid_argument(where + ": query_pre_attn_scalar must be positive, not " +
                                  j["query_pre_attn_scalar"].dump());
    for (const char* k : {"final_logit_softcapping", "attn_logit_softcapping"})
      if (j.contains(k) && !j[k].is_null())
        throw std::invalid_argument(where + ": " + k + " " + j[k].dump() +
                                    " is not supported (Gemma 3 has none: expected null)");
    if (bool_key(j, "use_bidirectional_attention", false, where))
      throw std::invalid_argument(where + ": use_bidirectional_attention true is not supported "
                                  "(a causal language model needs false)");
  }
  sliding_from_json(j, where, c);
  const char* dtype_key = j.contains("torch_dtype") ? "torch_dtype" : "dtype";
  if (j.contains(dtype_key) && j[dtype_key].is_string()) c.torch_dtype = j[dtype_key];
  return c;
}

}  // namespace


std::map<std::string, std::vector<int64_t>> expected_weight_shapes(const ModelConfig& c) {
  std::map<std::string, std::vector<int64_t>> m;
  const int64_t h = c.hidden_size, q = c.num_attention_heads * c.head_dim;
  const int64_t kv = c.num_key_value_heads * c.head_dim, f = c.intermediate_size;
  m["model.embed_tokens.weight"] = {c.vocab_size, h};
  if (!c.tie_word_embeddings) m["lm_head.weight"] = {c.vocab_size, h};
  m["model.norm.weight"] = {h};
  const std::pair<const char*, std::vector<int64_t>> linears[] = {
      {"self_attn.q_proj", {q, h}}, {"self_attn.k_proj", {kv, h}}, {"self_attn.v_proj", {kv, h}},
      {"self_attn.o_proj", {h, q}}, {"mlp.gate_proj", {f, h}},     {"mlp.up_proj", {f, h}},
      {"mlp.down_proj", {h, f}}};
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    for (const auto& [norm, size] : block_norms(c)) m[p + norm + ".weight"] = {size};
    for (const auto& [module, shape] : linears) {
      m[p + module + ".weight"] = shape;
      const std::string short_name = std::string(module).substr(std::string(module).find('.') + 1);
      if (c.linear_has_bias(short_name)) m[p + module + ".bias"] = {shape[0]};
    }
  }
  return m;
}

std::string block_linear_module(int64_t layer, const std::string& short_name) {
  const bool attn = short_name == "q_proj" || short_name == "k_proj" || short_name == "v_proj" ||
                    short_name == "o_proj";
  return "model.layers." + std::to_string(layer) + (attn ? ".self_attn." : ".mlp.") + short_name;
}

bool is_block_linear_weight(const std::string& name) {
  static const std::regex re(
      R"(model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight)");
  return std::regex_match(name, re);
}

}  // namespace qlora::model
