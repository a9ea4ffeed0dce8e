// export_merged: dequantize each block linear, add the adapter's s * B @ A (lora::lora_merge),
// write the merged checkpoint without quantization_config.
#include "app/export_command.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <stdexcept>

#include "io/atomic_write.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "lora/lora_linear.h"
#include "lora/peft_adapter.h"
#include "model/model_config.h"
#include "quant/bnb_checkpoint.h"
#include "quant/quant_state.h"
#include "quant/tensor_io.h"
#include "app/model_dir_output.h"

namespace fs = std::filesystem;

namespace qlora::app {

ExportReport export_merged(const ExportOptions& opt) {
  model_dir_require(opt.model_dir);
  const fs::path out = output_dir_check(opt.out_dir);
  const io::HfConfig hf = io::read_hf_config((fs::path(opt.model_dir) / "config.json").string());
  // A supported architecture, or a clear error; its weights_prefix maps stored names to the
  // adapter's layer names.
  const model::ModelConfig mc = model::model_config_from_json(hf.raw, hf.path);
  if (hf.quantization.method != io::QuantMethod::none &&
      hf.quantization.method != io::QuantMethod::bnb_4bit)
    throw std::invalid_argument(hf.path + ": cannot export from a '" + hf.quantization.quant_method +
                                "' model (expected bitsandbytes 4-bit or unquantized)");
  const lora::PeftAdapter adapter = lora::peft_adapter_read(opt.adapter_dir);
  const io::ModelWeights weights = io::ModelWeights::open_dir(opt.model_dir);
  auto contains = [&](const std::string& n) { return weights.contains(n); };
  auto get = [&](const std::string& n) -> std::optional<at::Tensor> {
    if (!weights.contains(n)) return std::nullopt;
    return quant::tensor_from_weights(weights, n);
  };

  std::set<std::string> unmerged;
  for (const auto& [layer, ab] : adapter.weights) unmerged.insert(layer);
  const double scale = adapter.config.scale();
  ExportReport report;
  io::SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  for (const std::string& name : weights.names()) {
    if (quant::bnb_is_state_tensor(name)) continue;
    at::Tensor w;
    if (!quant::bnb_quant_state_key(name, contains).empty()) {
      const quant::Quantized q = quant::bnb_read_quantized(name, get);
      w = quant::dequantize_4bit(q.packed, q.state, at::kFloat);
    } else {
      w = quant::tensor_from_weights(weights, name);
    }
    const std::string inside = model::canonical_weight_name(mc, name);
    const std::string layer =
        inside.size() > 7 && inside.compare(inside.size() - 7, 7, ".weight") == 0
            ? inside.substr(0, inside.size() - 7)
            : inside;
    const auto it = adapter.weights.find(layer);
    if (it != adapter.weights.end() && inside != layer) {
      const at::Tensor& a = it->second.first;   // [r, in]
      const at::Tensor& b = it->second.second;  // [out, r]
      if (w.dim() != 2 || b.size(0) != w.size(0) || a.size(1) != w.size(1))
        throw std::invalid_argument(opt.adapter_dir + ": adapter layer '" + layer + "' has A " +
                                    c10::str(a.sizes()) + " and B " + c10::str(b.sizes()) +
                                    ", the model's weight is " + c10::str(w.sizes()));
      w = lora::lora_merge(w, a, b, scale);
      unmerged.erase(layer);
      ++report.layers_merged;
    }
    quant::writer_add(writer, name, at::isFloatingType(w.scalar_type()) ? w.to(opt.dtype) : w);
    ++report.tensors_written;
  }
  if (!unmerged.empty())
    throw std::invalid_argument(opt.adapter_dir + ": adapter layer '" + *unmerged.begin() +
                                "' does not exist in " + opt.model_dir + " (" +
                                std::to_string(unmerged.size()) + " such layers)");

  nlohmann::ordered_json config = nlohmann::ordered_json::parse(hf.raw.dump());
  config.erase("quantization_config");
  config[config.contains("torch_dtype") ? "torch_dtype" : "dtype"] = quant::float_dtype_name(opt.dtype);
  output_dir_commit(out, [&](const fs::path& tmp) {
    writer.write((tmp / "model.safetensors").string());
    io::file_write_atomic(tmp / "config.json", config.dump(2) + "\n");
    copy_side_files(opt.model_dir, tmp);
    report.bytes_out = fs::file_size(tmp / "model.safetensors");
  });
  return report;
}

}  // namespace qlora::app
