// Hugging Face config.json reading and detection of the checkpoint's quantization method from
// its "quantization_config" (quant_method strings as transformers' QuantizationMethod spells them).
#include "io/hf_config.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "io/safetensors.h"

namespace qlora::io {
namespace {

using json = nlohmann::json;

struct QuantMethodTraits {
  QuantMethod method;
  const char* name;          // what we print
  const char* quant_method;  // what transformers writes; nullptr when no single string maps here
};

// The one table of methods; bitsandbytes needs its load_in_* flag to tell 4 from 8 bits.
constexpr QuantMethodTraits kQuantMethodTraits[] = {
    {QuantMethod::none, "none", nullptr},
    {QuantMethod::bnb_4bit, "bitsandbytes-4bit", nullptr},
    {QuantMethod::bnb_8bit, "bitsandbytes-8bit", nullptr},
    {QuantMethod::gptq, "gptq", "gptq"},
    {QuantMethod::awq, "awq", "awq"},
    {QuantMethod::aqlm, "aqlm", "aqlm"},
    {QuantMethod::hqq, "hqq", "hqq"},
    {QuantMethod::eetq, "eetq", "eetq"},
    {QuantMethod::fp8, "fp8", "fp8"},
    {QuantMethod::mxfp4, "mxfp4", "mxfp4"},
    {QuantMethod::other, "other", nullptr},
};

[[noreturn]] void format_error_throw(const std::string& path, const std::string& what,
                                     const std::string& expected) {
  throw FormatError(path + ": " + what + " (" + expected + ")");
}

// "an object", "a string", ...: for messages.
std::string json_type_phrase(const json& value) {
  const std::string name = value.type_name();
  if (value.is_null()) return name;
  return (name[0] == 'a' || name[0] == 'o' ? "an " : "a ") + name;
}

// transformers writes both "load_in_4bit" and "_load_in_4bit"; older files only one of them.
bool json_flag_set(const json& object, const char* key) {
  for (const std::string& name : {std::string(key), "_" + std::string(key)}) {
    const auto it = object.find(name);
    if (it != object.end() && it->is_boolean() && it->get<bool>()) return true;
  }
  return false;
}

// A positive integer at object[key], or 0.
int json_bits(const json& object, const char* key) {
  if (!object.is_object()) return 0;
  const auto it = object.find(key);
  if (it == object.end() || !it->is_number_integer()) return 0;
  const int64_t bits = it->get<int64_t>();
  return bits > 0 && bits <= 64 ? static_cast<int>(bits) : 0;
}

int bits_first_of(const json& object, std::initializer_list<const char*> keys) {
  for (const char* key : keys) {
    if (int bits = json_bits(object, key)) return bits;
  }
  return 0;
}

// HqqConfig.to_dict(): {"quant_config": {"weight_quant_params": {"nbits": 4, ...}, ...}}.
int hqq_bits(const json& quant) {
  const auto config_it = quant.find("quant_config");
  if (config_it == quant.end() || !config_it->is_object()) return 0;
  const auto params_it = config_it->find("weight_quant_params");
  if (params_it == config_it->end()) return 0;
  return json_bits(*params_it, "nbits");
}

}  // namespace

const char* quant_method_name(QuantMethod method) {
  for (const QuantMethodTraits& traits : kQuantMethodTraits) {
    if (traits.method == method) return traits.name;
  }
  throw std::invalid_argument("qlora::io: unknown QuantMethod value " +
                              std::to_string(static_cast<int>(method)));
}

QuantizationConfig detect_quantization(const nlohmann::json& config) {
  QuantizationConfig result;
  if (!config.is_object()) return result;
  const auto quant_it = config.find("quantization_config");
  if (quant_it == config.end() || quant_it->is_null()) return result;
  if (!quant_it->is_object()) {
    throw FormatError("quantization_config is " + json_type_phrase(*quant_it) +
                      " (expected an object)");
  }
  const json& quant = *quant_it;
  result.raw = quant;
  result.method = QuantMethod::other;

  const auto method_it = quant.find("quant_method");
  if (method_it != quant.end()) {
    result.quant_method =
        method_it->is_string() ? method_it->get<std::string>() : method_it->dump();
  }
  // Configs from before transformers wrote quant_method carry only the bitsandbytes flags.
  const bool bitsandbytes = result.quant_method == "bitsandbytes" ||
                            (method_it == quant.end() && (json_flag_set(quant, "load_in_4bit") ||
                                                          json_flag_set(quant, "load_in_8bit")));
  if (bitsandbytes) {
    const bool four = json_flag_set(quant, "load_in_4bit");
    const bool eight = json_flag_set(quant, "load_in_8bit");
    // Both or neither flag: transformers refuses such a config, so we cannot tell the width.
    if (four != eight) {
      result.method = four ? QuantMethod::bnb_4bit : QuantMethod::bnb_8bit;
      result.bits = four ? 4 : 8;
    }
    return result;
  }
  for (const QuantMethodTraits& traits : kQuantMethodTraits) {
    if (traits.quant_method != nullptr && result.quant_method == traits.quant_method) {
      result.method = traits.method;
      break;
    }
  }
  switch (result.method) {
    case QuantMethod::gptq:
    case QuantMethod::awq:
      // AutoAWQ's own quant_config spells it "w_bit".
      result.bits = bits_first_of(quant, {"bits", "w_bit", "weight_bits"});
      break;
    case QuantMethod::eetq:
      // EETQ is int8-only; "bits" is honoured so a guard can reject anything else.
      result.bits = json_bits(quant, "bits") ? json_bits(quant, "bits") : 8;
      break;
    case QuantMethod::hqq:
      result.bits = hqq_bits(quant);
      break;
    default:
      result.bits = 0;  // aqlm (codebooks), fp8, mxfp4, other: no single bit width
      break;
  }
  return result;
}

HfConfig read_hf_config(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) {
    format_error_throw(path, "is not a regular file", "expected a config.json file");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    format_error_throw(path, std::string("cannot open: ") + std::strerror(errno),
                       "expected a readable config.json");
  }
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) {
    format_error_throw(path, std::string("cannot read: ") + std::strerror(errno),
                       "expected a readable config.json");
  }
  HfConfig config;
  config.path = path;
  try {
    config.raw = json::parse(text.str());
  } catch (const json::exception& e) {
    std::string what = e.what();
    if (what.size() > 200) what = what.substr(0, 200) + "...";
    format_error_throw(path, "invalid JSON: " + what, "expected a JSON object");
  }
  if (!config.raw.is_object()) {
    format_error_throw(path, "top level is " + json_type_phrase(config.raw),
                       "expected a JSON object");
  }
  const auto arch_it = config.raw.find("architectures");
  if (arch_it != config.raw.end() && arch_it->is_array() && !arch_it->empty() &&
      arch_it->front().is_string()) {
    config.architecture = arch_it->front().get<std::string>();
  }
  const auto type_it = config.raw.find("model_type");
  if (type_it != config.raw.end() && type_it->is_string()) {
    config.model_type = type_it->get<std::string>();
  }
  try {
    config.quantization = detect_quantization(config.raw);
  } catch (const FormatError& e) {
    throw FormatError(path + ": " + e.what());
  }
  return config;
}

}  // namespace qlora::io
