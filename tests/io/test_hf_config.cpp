// Hugging Face config.json: architecture fields, quantization method and bit width detection
// for every method transformers writes, and malformed files.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "io/hf_config.h"
#include "io/safetensors.h"
#include "temp_dir.h"

namespace qlora::io {
namespace {

using testing::file_write;
using testing::TempDir;

// A config.json for a tiny LLaMA whose quantization_config is `quant` ("" for none).
std::string config_text(const std::string& quant) {
  std::string text = R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                         "hidden_size": 64, "num_hidden_layers": 2)";
  if (!quant.empty()) text += ", \"quantization_config\": " + quant;
  return text + "}";
}

struct MethodCase {
  const char* label;
  std::string quant;  // quantization_config JSON, "" for none
  QuantMethod method;
  const char* method_name;
  std::string quant_method;
  int bits;
};

TEST(HfConfig, DetectsEveryQuantizationMethod) {
  // quantization_config objects as transformers' *Config.to_dict() writes them (trimmed).
  const std::vector<MethodCase> cases = {
      {"no quantization", "", QuantMethod::none, "none", "", 0},
      {"bitsandbytes 4-bit",
       R"({"quant_method": "bitsandbytes", "_load_in_4bit": true, "_load_in_8bit": false,
           "load_in_4bit": true, "load_in_8bit": false, "bnb_4bit_quant_type": "nf4",
           "bnb_4bit_use_double_quant": true, "bnb_4bit_quant_storage": "uint8"})",
       QuantMethod::bnb_4bit, "bitsandbytes-4bit", "bitsandbytes", 4},
      {"bitsandbytes 8-bit",
       R"({"quant_method": "bitsandbytes", "load_in_4bit": false, "load_in_8bit": true,
           "llm_int8_threshold": 6.0})",
       QuantMethod::bnb_8bit, "bitsandbytes-8bit", "bitsandbytes", 8},
      {"bitsandbytes 4-bit, private flag only",
       R"({"quant_method": "bitsandbytes", "_load_in_4bit": true})", QuantMethod::bnb_4bit,
       "bitsandbytes-4bit", "bitsandbytes", 4},
      {"bitsandbytes without quant_method (old transformers)", R"({"load_in_8bit": true})",
       QuantMethod::bnb_8bit, "bitsandbytes-8bit", "", 8},
      {"bitsandbytes with neither flag", R"({"quant_method": "bitsandbytes"})", QuantMethod::other,
       "other", "bitsandbytes", 0},
      {"gptq", R"({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": false})",
       QuantMethod::gptq, "gptq", "gptq", 4},
      {"gptq 3-bit", R"({"quant_method": "gptq", "bits": 3})", QuantMethod::gptq, "gptq", "gptq",
       3},
      {"awq", R"({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"})",
       QuantMethod::awq, "awq", "awq", 4},
      {"awq (AutoAWQ w_bit)", R"({"quant_method": "awq", "w_bit": 4, "q_group_size": 128})",
       QuantMethod::awq, "awq", "awq", 4},
      {"aqlm", R"({"quant_method": "aqlm", "in_group_size": 8, "nbits_per_codebook": 16})",
       QuantMethod::aqlm, "aqlm", "aqlm", 0},
      {"hqq",
       R"({"quant_method": "hqq", "quant_config": {"weight_quant_params":
           {"nbits": 4, "group_size": 64}, "scale_quant_params": null}})",
       QuantMethod::hqq, "hqq", "hqq", 4},
      {"hqq without nbits", R"({"quant_method": "hqq"})", QuantMethod::hqq, "hqq", "hqq", 0},
      {"eetq", R"({"quant_method": "eetq", "weights": "int8"})", QuantMethod::eetq, "eetq", "eetq",
       8},
      {"eetq with bits", R"({"quant_method": "eetq", "bits": 4})", QuantMethod::eetq, "eetq",
       "eetq", 4},
      {"fp8",
       R"({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]})",
       QuantMethod::fp8, "fp8", "fp8", 0},
      {"mxfp4", R"({"quant_method": "mxfp4", "modules_to_not_convert": null})", QuantMethod::mxfp4,
       "mxfp4", "mxfp4", 0},
      {"unknown method", R"({"quant_method": "compressed-tensors", "bits": 4})", QuantMethod::other,
       "other", "compressed-tensors", 0},
      {"no quant_method at all", R"({"group_size": 64})", QuantMethod::other, "other", "", 0},
      {"null quantization_config", "null", QuantMethod::none, "none", "", 0},
  };
  TempDir dir;
  for (size_t i = 0; i < cases.size(); ++i) {
    const MethodCase& c = cases[i];
    SCOPED_TRACE(std::string(c.label) + ": " + c.quant);
    const std::string path = dir.file("config_" + std::to_string(i) + ".json");
    file_write(path, config_text(c.quant));
    const HfConfig config = read_hf_config(path);
    EXPECT_EQ(config.path, path);
    EXPECT_EQ(config.architecture, "LlamaForCausalLM");
    EXPECT_EQ(config.model_type, "llama");
    EXPECT_EQ(config.raw.at("hidden_size"), 64);
    EXPECT_EQ(config.quantization.method, c.method);
    EXPECT_STREQ(quant_method_name(config.quantization.method), c.method_name);
    EXPECT_EQ(config.quantization.quant_method, c.quant_method);
    EXPECT_EQ(config.quantization.bits, c.bits);
    if (c.method == QuantMethod::none) {
      EXPECT_TRUE(config.quantization.raw.is_null());
    } else {
      EXPECT_EQ(config.quantization.raw, config.raw.at("quantization_config"));
    }
    // detect_quantization on the parsed object agrees with what read_hf_config found.
    EXPECT_EQ(detect_quantization(config.raw).method, c.method);
  }
}

TEST(HfConfig, QuantMethodNames) {
  const std::vector<std::pair<QuantMethod, std::string>> names = {
      {QuantMethod::none, "none"},
      {QuantMethod::bnb_4bit, "bitsandbytes-4bit"},
      {QuantMethod::bnb_8bit, "bitsandbytes-8bit"},
      {QuantMethod::gptq, "gptq"},
      {QuantMethod::awq, "awq"},
      {QuantMethod::aqlm, "aqlm"},
      {QuantMethod::hqq, "hqq"},
      {QuantMethod::eetq, "eetq"},
      {QuantMethod::fp8, "fp8"},
      {QuantMethod::mxfp4, "mxfp4"},
      {QuantMethod::other, "other"}};
  for (const auto& [method, name] : names) EXPECT_EQ(quant_method_name(method), name);
}

TEST(HfConfig, MissingArchitectureFieldsAreEmpty) {
  TempDir dir;
  const std::string path = dir.file("config.json");
  file_write(path, R"({"architectures": [], "model_type": 3})");
  const HfConfig config = read_hf_config(path);
  EXPECT_EQ(config.architecture, "");
  EXPECT_EQ(config.model_type, "");
  EXPECT_EQ(config.quantization.method, QuantMethod::none);
}

TEST(HfConfig, BadFilesGiveFormatErrorsNamingTheFile) {
  TempDir dir;
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{\"model_type\": \"llama\",", "invalid JSON"},
      {"", "invalid JSON"},
      {"[\"LlamaForCausalLM\"]", "top level is an array"},
      {config_text("\"bitsandbytes\""), "quantization_config is a string (expected an object)"},
      {config_text("[4]"), "quantization_config is an array (expected an object)"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(cases[i].first);
    const std::string path = dir.file("bad_" + std::to_string(i) + ".json");
    file_write(path, cases[i].first);
    try {
      read_hf_config(path);
      ADD_FAILURE() << "accepted";
    } catch (const FormatError& e) {
      const std::string message = e.what();
      EXPECT_EQ(message.rfind(path + ": ", 0), 0u) << message;
      EXPECT_NE(message.find(cases[i].second), std::string::npos) << message;
      EXPECT_EQ(message.back(), ')') << message;
    }
  }
  const std::string absent = dir.file("absent/config.json");
  try {
    read_hf_config(absent);
    ADD_FAILURE() << "missing file accepted";
  } catch (const FormatError& e) {
    EXPECT_EQ(std::string(e.what()).rfind(absent + ": cannot open", 0), 0u) << e.what();
  }
  try {
    read_hf_config(dir.path());
    ADD_FAILURE() << "a directory accepted";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("is not a regular file"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace qlora::io
