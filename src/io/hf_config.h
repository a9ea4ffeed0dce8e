// Hugging Face config.json: read it, and tell which quantization method a checkpoint uses
// (from "quantization_config"). The model layer interprets the architecture fields.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace qlora::io {

enum class QuantMethod { none, bnb_4bit, bnb_8bit, gptq, awq, aqlm, hqq, eetq, fp8, mxfp4, other };
const char* quant_method_name(QuantMethod method);  // "none", "bitsandbytes-4bit", "gptq", ...

struct QuantizationConfig {
  QuantMethod method = QuantMethod::none;
  std::string quant_method;  // as written in the file ("" when there is no quantization_config)
  int bits = 0;              // 4 or 8 for bitsandbytes, "bits" / "weight_bits" for others; 0 unknown
  nlohmann::json raw;        // the whole quantization_config object (null when absent)
};

struct HfConfig {
  std::string path;      // the config.json it came from
  nlohmann::json raw;    // the whole file
  std::string architecture;  // architectures[0], "" when absent
  std::string model_type;
  QuantizationConfig quantization;
};

// Throws FormatError (safetensors.h) naming the file for: missing/unreadable file, bad JSON,
// a top level that is not an object, a quantization_config that is not an object.
HfConfig read_hf_config(const std::string& path);
// Method detection rules (quant_method values as transformers writes them): "bitsandbytes" with
// load_in_4bit / load_in_8bit (or _load_in_4bit / _load_in_8bit) -> bnb_4bit / bnb_8bit;
// "gptq", "awq", "aqlm", "hqq", "eetq", "fp8", "mxfp4"; anything else -> other.
QuantizationConfig detect_quantization(const nlohmann::json& config);

}  // namespace qlora::io
