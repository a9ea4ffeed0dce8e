// quantize_model_dir: read config + weights through model::ModelReader (shapes checked; FP8 / MXFP4
// linears dequantized on load), quantize block linears, write the bitsandbytes tensor set and
// quantization_config (replacing an fp8 / mxfp4 one), rename into place.
#include "app/quantize_command.h"

#include <ATen/ATen.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <stdexcept>

#include "io/atomic_write.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/model_config.h"
#include "model/model_reader.h"
#include "quant/bnb_checkpoint.h"
#include "quant/tensor_io.h"
#include "app/model_dir_output.h"

namespace fs = std::filesystem;

namespace qlora::app {
namespace {

std::string storage_name(at::ScalarType t) {
  if (t == at::kByte) return "uint8";
  return quant::float_dtype_name(t);
}

nlohmann::ordered_json quantization_config(const quant::QuantizeOptions& o,
                                           const std::string& compute_dtype) {
  // Key for key what transformers' BitsAndBytesConfig.to_dict() writes. Its blocksize is not
  // in here: each weight's quant_state carries its own.
  nlohmann::ordered_json q;
  q["_load_in_4bit"] = true;
  q["_load_in_8bit"] = false;
  q["bnb_4bit_compute_dtype"] = compute_dtype;
  q["bnb_4bit_quant_storage"] = storage_name(o.storage);
  q["bnb_4bit_quant_type"] = quant::quant_type_name(o.quant_type);
  q["bnb_4bit_use_double_quant"] = o.double_quant;
  q["llm_int8_enable_fp32_cpu_offload"] = false;
  q["llm_int8_has_fp16_weight"] = false;
  q["llm_int8_skip_modules"] = nullptr;
  q["llm_int8_threshold"] = 6.0;
  q["load_in_4bit"] = true;
  q["load_in_8bit"] = false;
  q["quant_method"] = "bitsandbytes";
  return q;
}

}  // namespace

QuantizeReport quantize_model_dir(const QuantizeCommandOptions& opt) {
  const auto t0 = std::chrono::steady_clock::now();
  QuantizeReport report;
  const fs::path in(opt.model_dir);
  model_dir_require(opt.model_dir);
  const fs::path out = output_dir_check(opt.out_dir);
  if (!kernels::valid_blocksize(opt.quant.blocksize))
    throw std::invalid_argument("--quantization_blocksize " + std::to_string(opt.quant.blocksize) +
                                " is not supported (expected 32, 64, ..., 4096)");

  model::ModelReader reader(opt.model_dir);  // config.json (an fp8 / mxfp4 one checked too)
  const io::HfConfig& hf = reader.hf_config();
  const model::ModelConfig& mc = reader.config();
  if (hf.quantization.method != io::QuantMethod::none && !reader.dequantizes())
    throw std::invalid_argument(hf.path + ": the model is already quantized (quant_method '" +
                                hf.quantization.quant_method +
                                "'); quantize takes a bf16/fp16/fp32 model, or an fp8 / mxfp4 one");
  reader.weights_open();  // every tensor's presence, dtype and shape, before any is read
  const io::ModelWeights weights = io::ModelWeights::open_dir(opt.model_dir);

  // FP8 / MXFP4 linears: their stored tensors -> the weight they dequantize to, made once (at
  // the first of them); the scales are not copied.
  std::map<std::string, std::string> dequantized_from;
  for (const auto& [name, shape] : model::expected_weight_shapes(mc))
    for (const std::string& stored : reader.dequant_sources(name)) dequantized_from[stored] = name;

  io::SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  for (const std::string& name : weights.names()) {
    const io::TensorInfo& info = weights.info(name);
    report.bytes_in += info.nbytes;
    // The reader's (inside) name: a Gemma3ForConditionalGeneration stores model.X under a prefix.
    const std::string inside = model::canonical_weight_name(mc, name);
    std::string weight_name = inside;
    if (const auto it = dequantized_from.find(inside); it != dequantized_from.end()) {
      if (reader.dequant_sources(it->second).front() != inside) continue;
      weight_name = it->second;
    }
    if (model::is_block_linear_weight(weight_name)) {
      const quant::Quantized q = reader.linear(weight_name, opt.quant);
      // Written under the prefix this tensor is stored under.
      const std::string out_name =
          inside == name ? weight_name
                         : name.substr(0, name.size() - (inside.size() - 6)) + weight_name.substr(6);
      for (const auto& [key, tensor] : quant::bnb_checkpoint_tensors(out_name, q))
        quant::writer_add(writer, key, tensor);
      ++report.tensors_quantized;
      report.params_quantized += q.state.numel();
    } else {
      quant::writer_add(writer, name, quant::tensor_from_weights(weights, name));
      ++report.tensors_copied;
    }
  }

  nlohmann::ordered_json config = nlohmann::ordered_json::parse(hf.raw.dump());
  config["quantization_config"] = quantization_config(opt.quant, mc.torch_dtype);
  // Only the language model is quantized: transformers keeps the vision tower, its projector and
  // lm_head as plain linears (its default, lm_head, otherwise).
  if (!mc.weights_prefix.empty())
    config["quantization_config"]["llm_int8_skip_modules"] = {"lm_head", "multi_modal_projector",
                                                               "vision_tower"};

  output_dir_commit(out, [&](const fs::path& tmp) {
    writer.write((tmp / "model.safetensors").string());
    io::file_write_atomic(tmp / "config.json", config.dump(2) + "\n");
    copy_side_files(in, tmp);
    report.bytes_out = fs::file_size(tmp / "model.safetensors");
  });
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return report;
}

}  // namespace qlora::app
