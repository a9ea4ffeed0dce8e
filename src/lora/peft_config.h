// adapter_config.json of a PEFT LoRA adapter, read without libtorch (peft_adapter.cpp adds the
// weights; tests/fuzz fuzzes this part on its own).
#pragma once

#include <cstdint>
#include <optional>
#include <set>
#include <string>

#include <nlohmann/json.hpp>

namespace qlora::lora {

// The keys of adapter_config.json we use; absent or null keys take peft's LoraConfig defaults.
struct PeftConfigFile {
  int64_t rank = 8;      // "r"
  double alpha = 8.0;    // "lora_alpha"
  double dropout = 0.0;  // "lora_dropout"
  bool use_rslora = false;
  std::string base_model_name_or_path;
  // "target_modules" as a list, kept as short names ("q_proj"); nullopt when absent or a regex
  // string (the weights then say which modules the adapter has).
  std::optional<std::set<std::string>> target_modules;
};

// Checks `j` (the parsed file at `path`) as peft would have written it: peft_type "LORA", bias
// "none", no DoRA / LoRA biases / fan_in_fan_out / rank_pattern / alpha_pattern, typed keys.
// std::invalid_argument "PATH: key 'K' ..." otherwise. The values' ranges are LoraConfig::validate's.
PeftConfigFile peft_config_parse(const nlohmann::json& j, const std::string& path);
// Reads and parses PATH; std::invalid_argument when it is missing, unreadable or not JSON.
PeftConfigFile peft_config_read(const std::string& path);

}  // namespace qlora::lora
