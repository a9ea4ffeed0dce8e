// adapter_config.json: see peft_config.h.
#include "lora/peft_config.h"

#include <filesystem>
#include <stdexcept>

#include "io/json_file.h"

namespace qlora::lora {

namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

std::string last_component(const std::string& name) {
  const size_t dot = name.rfind('.');
  return dot == std::string::npos ? name : name.substr(dot + 1);
}

// Typed look-ups of adapter_config.json keys; absent or null keys take peft's default.
struct ConfigReader {
  const json& j;
  const std::string& path;

  bool has(const char* key) const { return j.contains(key) && !j.at(key).is_null(); }
  [[noreturn]] void fail(const char* key, const std::string& what) const {
    throw std::invalid_argument(path + ": key '" + key + "' " + what);
  }
  std::string string_or(const char* key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    if (!j.at(key).is_string()) fail(key, "is " + j.at(key).dump() + ", expected a string");
    return j.at(key).get<std::string>();
  }
  double number_or(const char* key, double fallback) const {
    if (!has(key)) return fallback;
    if (!j.at(key).is_number()) fail(key, "is " + j.at(key).dump() + ", expected a number");
    return j.at(key).get<double>();
  }
  bool bool_or(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    if (!j.at(key).is_boolean()) fail(key, "is " + j.at(key).dump() + ", expected true or false");
    return j.at(key).get<bool>();
  }
  int64_t int_or(const char* key, int64_t fallback) const {
    if (!has(key)) return fallback;
    if (!j.at(key).is_number_integer())
      fail(key, "is " + j.at(key).dump() + ", expected an integer");
    return j.at(key).get<int64_t>();
  }
  // Features that change the math and that we do not implement: reject rather than ignore.
  void require_false(const char* key, const std::string& why) const {
    if (has(key) && !(j.at(key).is_boolean() && !j.at(key).get<bool>()))
      fail(key, "is " + j.at(key).dump() + ": " + why);
  }
  void require_empty(const char* key, const std::string& why) const {
    if (has(key) && !(j.at(key).is_object() && j.at(key).empty()))
      fail(key, "is " + j.at(key).dump() + ": " + why);
  }
};

}  // namespace

PeftConfigFile peft_config_parse(const json& j, const std::string& path) {
  if (!j.is_object())
    throw std::invalid_argument(path + ": top level is " + j.dump() + ", expected an object");
  const ConfigReader cfg{j, path};

  if (!j.contains("peft_type")) cfg.fail("peft_type", "is missing (expected \"LORA\")");
  const std::string peft_type = cfg.string_or("peft_type", "");
  if (peft_type != "LORA")
    cfg.fail("peft_type", "is \"" + peft_type + "\", expected \"LORA\" (only LoRA adapters)");
  const std::string bias = cfg.string_or("bias", "none");
  if (bias != "none")
    cfg.fail("bias", "is \"" + bias + "\", expected \"none\" (trained biases are not supported)");
  cfg.require_false("use_dora", "DoRA adapters are not supported");
  cfg.require_false("lora_bias", "LoRA biases are not supported");
  cfg.require_false("fan_in_fan_out", "transposed (Conv1D) weights are not supported");
  cfg.require_empty("rank_pattern", "per-layer ranks are not supported");
  cfg.require_empty("alpha_pattern", "per-layer alphas are not supported");

  PeftConfigFile out;
  // Defaults are peft's LoraConfig defaults.
  out.rank = cfg.int_or("r", 8);
  out.alpha = cfg.number_or("lora_alpha", 8.0);
  out.dropout = cfg.number_or("lora_dropout", 0.0);
  out.use_rslora = cfg.bool_or("use_rslora", false);
  out.base_model_name_or_path = cfg.string_or("base_model_name_or_path", "");

  // target_modules: a list of names (peft matches a module whose name is the entry or ends with
  // "." + entry) or one regex string; the list is kept as short names.
  if (cfg.has("target_modules")) {
    const json& t = j.at("target_modules");
    if (t.is_array()) {
      out.target_modules.emplace();
      for (const json& e : t) {
        if (!e.is_string()) cfg.fail("target_modules", "holds " + e.dump() + ", expected strings");
        out.target_modules->insert(last_component(e.get<std::string>()));
      }
    } else if (!t.is_string()) {
      cfg.fail("target_modules", "is " + t.dump() + ", expected a list of names or a string");
    }
  }
  return out;
}

PeftConfigFile peft_config_read(const std::string& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec))
    throw std::invalid_argument(path + ": not found (a peft adapter directory holds "
                                "adapter_config.json and adapter_model.safetensors)");
  return peft_config_parse(io::json_file_read(path), path);
}

}  // namespace qlora::lora
