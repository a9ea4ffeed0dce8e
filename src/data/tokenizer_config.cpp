// tokenizer_config.json + special_tokens_map.json + chat_template.jinja, as transformers 5 merges
// them (tokenization_utils_base.from_pretrained).
#include "data/tokenizer_config.h"

#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "io/json_file.h"

namespace qlora::data {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// A special token is a string, an AddedToken dict {"content": ..., ...}, or null.
std::optional<std::string> token_string(const json& value, const std::string& where) {
  if (value.is_null()) return std::nullopt;
  if (value.is_string()) return value.get<std::string>();
  if (value.is_object() && value.contains("content") && value["content"].is_string())
    return value["content"].get<std::string>();
  throw std::invalid_argument(where + ": expected a token string or an AddedToken object with a "
                              "string \"content\", got " + value.dump());
}

void read_tokens(const json& obj, const std::string& file, TokenizerConfig& config) {
  const std::pair<const char*, std::optional<std::string>*> keys[] = {
      {"bos_token", &config.bos_token}, {"eos_token", &config.eos_token},
      {"pad_token", &config.pad_token}, {"unk_token", &config.unk_token}};
  for (const auto& [key, slot] : keys) {
    if (obj.contains(key)) *slot = token_string(obj[key], file + ": \"" + std::string(key) + "\"");
  }
}

}  // namespace

TokenizerConfig TokenizerConfig::from_dir(const std::string& model_dir) {
  const fs::path dir(model_dir);
  const fs::path config_path = dir / "tokenizer_config.json";
  if (!fs::exists(config_path))
    throw std::invalid_argument(config_path.string() +
                                ": not found (a model directory holds tokenizer_config.json "
                                "next to tokenizer.json)");
  const json config_json = io::json_file_read(config_path);
  const std::string cfile = config_path.string();
  if (!config_json.is_object())
    throw std::invalid_argument(cfile + ": expected a JSON object at the top level");

  TokenizerConfig config;
  read_tokens(config_json, cfile, config);
  if (config_json.contains("add_bos_token")) {
    if (!config_json["add_bos_token"].is_boolean())
      throw std::invalid_argument(cfile + ": \"add_bos_token\" must be true or false, got " +
                                  config_json["add_bos_token"].dump());
    config.add_bos_token = config_json["add_bos_token"].get<bool>();
  }
  if (config_json.contains("chat_template") && !config_json["chat_template"].is_null()) {
    const json& t = config_json["chat_template"];
    if (t.is_string()) {
      config.chat_template = t.get<std::string>();
    } else if (t.is_array()) {  // [{"name": ..., "template": ...}, ...]
      for (const json& named : t) {
        if (named.is_object() && named.value("name", "") == "default" && named.contains("template") &&
            named["template"].is_string())
          config.chat_template = named["template"].get<std::string>();
      }
    } else {
      throw std::invalid_argument(cfile + ": \"chat_template\" must be a string or a list of "
                                  "{\"name\", \"template\"} objects, got " + std::string(t.type_name()));
    }
  }

  // Legacy special_tokens_map.json is merged only when the config has no added_tokens_decoder.
  const fs::path map_path = dir / "special_tokens_map.json";
  if (fs::exists(map_path) && !config_json.contains("added_tokens_decoder")) {
    const json map_json = io::json_file_read(map_path);
    if (!map_json.is_object())
      throw std::invalid_argument(map_path.string() + ": expected a JSON object at the top level");
    read_tokens(map_json, map_path.string(), config);
  }
  const fs::path jinja_path = dir / "chat_template.jinja";
  if (fs::exists(jinja_path)) config.chat_template = io::file_read(jinja_path);
  return config;
}

}  // namespace qlora::data
