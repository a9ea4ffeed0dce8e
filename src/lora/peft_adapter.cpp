// PEFT LoRA adapter files: adapter_config.json with every key peft 0.21.2 writes for a LoRA
// CAUSAL_LM adapter (json.dumps(indent=2, sort_keys=True), no trailing newline), and
// adapter_model.safetensors with base_model.model.<layer>.lora_{A,B}.weight in fp32.
#include "lora/peft_adapter.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>

#include "io/atomic_write.h"
#include "io/safetensors.h"
#include "lora/peft_config.h"
#include "quant/tensor_io.h"

namespace qlora::lora {

namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

constexpr const char* kConfigFile = "adapter_config.json";
constexpr const char* kWeightsFile = "adapter_model.safetensors";
constexpr const char* kPrefix = "base_model.model.";
constexpr const char* kSuffixA = ".lora_A.weight";
constexpr const char* kSuffixB = ".lora_B.weight";
// The peft release whose adapter_config.json we mirror key for key (it records its version).
constexpr const char* kPeftVersion = "0.21.2";

using quant::shape_str;

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string last_component(const std::string& name) {
  const size_t dot = name.rfind('.');
  return dot == std::string::npos ? name : name.substr(dot + 1);
}

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// A LoRA alpha that is a whole number is written as a JSON integer, as peft writes its int.
json alpha_json(double alpha) {
  if (std::floor(alpha) == alpha && std::fabs(alpha) < 9.0e15) return static_cast<int64_t>(alpha);
  return alpha;
}

// The file's name of a layer (module_prefix applied).
std::string file_layer(const PeftAdapter& adapter, const std::string& layer) {
  if (adapter.module_prefix.empty() || layer.rfind("model.", 0) != 0) return layer;
  return adapter.module_prefix + layer.substr(6);
}

// peft's regex form of target_modules (re.fullmatch on module names): the language model's
// linears of these short names only.
std::string prefixed_targets_regex(const std::string& prefix,
                                   const std::vector<std::string>& targets) {
  std::string p;
  for (char ch : prefix) p += ch == '.' ? std::string("\\.") : std::string(1, ch);
  std::string alt;
  for (const std::string& t : targets) alt += (alt.empty() ? "" : "|") + t;
  return p + "layers\\.\\d+\\.(self_attn|mlp)\\.(" + alt + ")";
}

json config_json(const PeftAdapter& adapter) {
  std::vector<std::string> targets = adapter.target_modules;
  std::sort(targets.begin(), targets.end());
  targets.erase(std::unique(targets.begin(), targets.end()), targets.end());
  const LoraConfig& c = adapter.config;
  json j = json::object();  // std::map underneath: keys come out sorted, as sort_keys=True
  j["alora_invocation_tokens"] = nullptr;
  j["alpha_pattern"] = json::object();
  j["arrow_config"] = nullptr;
  j["auto_mapping"] = nullptr;
  j["base_model_name_or_path"] = adapter.base_model_name_or_path.empty()
                                     ? json(nullptr)
                                     : json(adapter.base_model_name_or_path);
  j["bias"] = "none";
  j["corda_config"] = nullptr;
  j["ensure_weight_tying"] = false;
  j["eva_config"] = nullptr;
  j["exclude_modules"] = nullptr;
  j["fan_in_fan_out"] = false;
  j["inference_mode"] = true;  // save_pretrained always writes true
  j["init_lora_weights"] = true;
  j["kasa_config"] = nullptr;
  j["layer_replication"] = nullptr;
  j["layers_pattern"] = nullptr;
  j["layers_to_transform"] = nullptr;
  j["loftq_config"] = json::object();
  j["lora_alpha"] = alpha_json(c.alpha);
  j["lora_bias"] = false;
  j["lora_dropout"] = c.dropout;
  j["lora_ga_config"] = nullptr;
  j["megatron_config"] = nullptr;
  j["megatron_core"] = "megatron.core";
  j["modules_to_save"] = nullptr;
  j["monteclora_config"] = nullptr;
  j["peft_type"] = "LORA";
  j["peft_version"] = kPeftVersion;
  j["qalora_group_size"] = 16;
  j["r"] = c.rank;
  j["rank_pattern"] = json::object();
  j["revision"] = nullptr;
  j["target_modules"] = adapter.module_prefix.empty()
                            ? json(targets)
                            : json(prefixed_targets_regex(adapter.module_prefix, targets));
  j["target_parameters"] = nullptr;
  j["task_type"] = "CAUSAL_LM";
  j["trainable_token_indices"] = nullptr;
  j["use_bdlora"] = nullptr;
  j["use_dora"] = false;
  j["use_qalora"] = false;
  j["use_rslora"] = c.use_rslora;
  j["velora_config"] = nullptr;
  return j;
}

// The rank checks shared by write and read: A [r, in], B [out, r], both float.
void weights_check(const std::string& where, const std::string& layer, const at::Tensor& a,
                   const at::Tensor& b, int64_t rank) {
  const std::string key_a = kPrefix + layer + kSuffixA, key_b = kPrefix + layer + kSuffixB;
  if (!a.defined()) throw std::invalid_argument(where + ": " + key_a + " is missing");
  if (!b.defined()) throw std::invalid_argument(where + ": " + key_b + " is missing");
  if (!is_float_dtype(a.scalar_type()) || !is_float_dtype(b.scalar_type()))
    throw std::invalid_argument(
        where + ": " + key_a + " / " + key_b + " are " + c10::toString(a.scalar_type()) + " / " +
        c10::toString(b.scalar_type()) + ", expected float32, bf16 or fp16");
  if (a.dim() != 2 || a.size(0) != rank)
    throw std::invalid_argument(where + ": " + key_a + " has shape " + shape_str(a.sizes()) +
                                ", expected [r = " + std::to_string(rank) + ", in_features]");
  if (b.dim() != 2 || b.size(1) != rank)
    throw std::invalid_argument(where + ": " + key_b + " has shape " + shape_str(b.sizes()) +
                                ", expected [out_features, r = " + std::to_string(rank) + "]");
}

}  // namespace

void peft_adapter_write(const std::string& dir, const PeftAdapter& adapter) {
  const std::string where = dir + "/" + kWeightsFile;
  adapter.config.validate(dir + "/" + kConfigFile);
  if (adapter.weights.empty())
    throw std::invalid_argument(where + ": the adapter has no LoRA weights");
  const std::set<std::string> targets(adapter.target_modules.begin(), adapter.target_modules.end());
  io::SafetensorsWriter writer;
  writer.set_metadata("format", "pt");  // what peft's save_pretrained writes
  for (const auto& [layer, ab] : adapter.weights) {
    const auto& [a, b] = ab;
    weights_check(where, layer, a, b, adapter.config.rank);
    if (targets.count(last_component(layer)) == 0)
      throw std::invalid_argument(where + ": layer " + layer + " is not in target_modules, so " +
                                  "peft would not load its weights");
    const std::string name = file_layer(adapter, layer);
    quant::writer_add(writer, kPrefix + name + kSuffixA, a.detach().to(at::kCPU, at::kFloat));
    quant::writer_add(writer, kPrefix + name + kSuffixB, b.detach().to(at::kCPU, at::kFloat));
  }

  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw std::runtime_error("cannot create adapter directory " + dir + ": " + ec.message());
  // Weights first: a directory with a config always has the weights that go with it.
  io::commit_atomic(fs::path(dir) / kWeightsFile, /*directory=*/false,
                    [&](const fs::path& tmp) { writer.write(tmp.string()); });
  io::file_write_atomic(fs::path(dir) / kConfigFile,
                        config_json(adapter).dump(2, ' ', /*ensure_ascii=*/true));  // json.dumps escapes too
}

PeftAdapter peft_adapter_read(const std::string& dir) {
  const std::string config_path = dir + "/" + kConfigFile;
  const std::string weights_path = dir + "/" + kWeightsFile;
  const PeftConfigFile cfg = peft_config_read(config_path);
  PeftAdapter adapter;
  adapter.config.rank = cfg.rank;
  adapter.config.alpha = cfg.alpha;
  adapter.config.dropout = cfg.dropout;
  adapter.config.use_rslora = cfg.use_rslora;
  adapter.config.validate(config_path);
  adapter.base_model_name_or_path = cfg.base_model_name_or_path;
  const std::optional<std::set<std::string>>& targets = cfg.target_modules;

  const auto file = io::SafetensorsFile::open(weights_path);  // validates the header
  std::map<std::string, std::pair<at::Tensor, at::Tensor>> weights;
  for (const io::TensorInfo& info : file->tensors()) {
    const std::string& key = info.name;
    const bool is_a = ends_with(key, kSuffixA), is_b = ends_with(key, kSuffixB);
    const size_t prefix_len = std::string(kPrefix).size(),
                 suffix_len = std::string(kSuffixA).size();
    if (key.rfind(kPrefix, 0) != 0 || (!is_a && !is_b) || key.size() <= prefix_len + suffix_len)
      throw std::invalid_argument(weights_path + ": tensor '" + key + "' is not a LoRA weight " +
                                  "(expected base_model.model.<layer>.lora_A.weight or " +
                                  ".lora_B.weight)");
    if (info.dtype != io::DType::F32 && info.dtype != io::DType::BF16 &&
        info.dtype != io::DType::F16)
      throw std::invalid_argument(weights_path + ": tensor '" + key + "' is " +
                                  io::dtype_name(info.dtype) + ", expected F32, BF16 or F16");
    std::string layer = key.substr(prefix_len, key.size() - prefix_len - suffix_len);
    // A Gemma3ForConditionalGeneration adapter names the language model's layers under its
    // prefix: kept as module_prefix, the layer named as inside.
    for (const char* p : {"model.language_model.", "language_model.model."}) {
      const std::string prefix(p);
      if (layer.rfind(prefix, 0) == 0) {
        if (!adapter.module_prefix.empty() && adapter.module_prefix != prefix)
          throw std::invalid_argument(weights_path + ": tensor '" + key + "' names its layer under " +
                                      prefix + ", others under " + adapter.module_prefix);
        adapter.module_prefix = prefix;
        layer = "model." + layer.substr(prefix.size());
      }
    }
    at::Tensor t = quant::tensor_from_safetensors(info, file->data(info)).to(at::kFloat);
    (is_a ? weights[layer].first : weights[layer].second) = t;
  }
  if (weights.empty()) throw std::invalid_argument(weights_path + ": holds no LoRA weights");
  std::set<std::string> present;
  for (const auto& [layer, ab] : weights) {
    weights_check(weights_path, layer, ab.first, ab.second, adapter.config.rank);
    if (targets && targets->count(last_component(layer)) == 0)
      throw std::invalid_argument(weights_path + ": layer " + layer + " is not in " + config_path +
                                  " key 'target_modules'");
    present.insert(last_component(layer));
  }
  adapter.weights = std::move(weights);
  const std::set<std::string>& names = targets ? *targets : present;
  adapter.target_modules.assign(names.begin(), names.end());
  return adapter;
}

}  // namespace qlora::lora
