// inspect_model_dir: config + weights summary, validating every bitsandbytes 4-bit weight and
// naming an FP8 / MXFP4 checkpoint's format (its tensors checked as loading checks them).
#include "app/inspect_command.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <map>
#include <sstream>
#include <stdexcept>

#include "app/model_dir_output.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/model_config.h"
#include "model/model_reader.h"
#include "quant/bnb_checkpoint.h"
#include "quant/tensor_io.h"

namespace fs = std::filesystem;

namespace qlora::app {

std::string inspect_model_dir(const std::string& model_dir) {
  model_dir_require(model_dir);
  const io::HfConfig hf = io::read_hf_config((fs::path(model_dir) / "config.json").string());
  const model::ModelConfig mc = model::model_config_from_json(hf.raw, hf.path);
  const io::ModelWeights weights = io::ModelWeights::open_dir(model_dir);

  std::ostringstream out;
  out << model_dir << ": " << mc.architecture << ", " << mc.num_hidden_layers << " layers, hidden "
      << mc.hidden_size << ", " << mc.num_attention_heads << "/" << mc.num_key_value_heads
      << " heads, vocab " << mc.vocab_size << ", " << weights.files().size()
      << " safetensors file(s)\n"
      << "  architecture: " << model::architecture_summary(mc) << "\n"
      << "  quantization: " << io::quant_method_name(hf.quantization.method) << "\n";
  const io::QuantMethod method = hf.quantization.method;
  if (method == io::QuantMethod::fp8 || method == io::QuantMethod::mxfp4) {
    model::ModelReader reader(model_dir);  // the format's settings and every tensor checked
    reader.weights_open();
    int64_t dequantized = 0, plain = 0, dequantized_params = 0;
    for (const auto& [name, shape] : model::expected_weight_shapes(mc)) {
      if (!model::is_block_linear_weight(name)) continue;
      if (reader.dequant_sources(name).empty()) {
        ++plain;
      } else {
        ++dequantized;
        dequantized_params += shape[0] * shape[1];
      }
    }
    out << "  format: " << reader.dequant_format().describe() << ", dequantized on load to "
        << quant::float_dtype_name(reader.dequant_dtype()) << " then quantized to 4-bit: " << dequantized
        << " linears (" << dequantized_params << " params), " << plain
        << " stored as float (modules_to_not_convert)\n";
  }

  auto contains = [&](const std::string& n) { return weights.contains(n); };
  auto get = [&](const std::string& n) -> std::optional<at::Tensor> {
    if (!weights.contains(n)) return std::nullopt;
    return quant::tensor_from_weights(weights, n);
  };
  // (quant type, blocksize, nested, storage) -> count
  std::map<std::string, int64_t> kinds;
  int64_t quantized = 0, params = 0, other = 0;
  size_t nbytes = 0;
  for (const std::string& name : weights.names()) {
    nbytes += weights.info(name).nbytes;
    if (quant::bnb_is_state_tensor(name)) continue;
    if (quant::bnb_quant_state_key(name, contains).empty()) {
      ++other;
      continue;
    }
    const quant::Quantized q = quant::bnb_read_quantized(name, get);
    ++quantized;
    params += q.state.numel();
    std::ostringstream kind;
    kind << quant::quant_type_name(q.state.quant_type) << ", blocksize " << q.state.blocksize
         << ", double quantization " << (q.state.is_nested() ? "on" : "off") << ", storage "
         << (q.packed.scalar_type() == at::kByte ? std::string("uint8")
                                                 : quant::float_dtype_name(q.packed.scalar_type()));
    ++kinds[kind.str()];
  }
  if (hf.quantization.method == io::QuantMethod::bnb_4bit && quantized == 0)
    throw std::invalid_argument(hf.path +
                                ": quantization_config says bitsandbytes 4-bit but no weight "
                                "carries a quant_state");
  if (quantized > 0) {
    out << "  " << quantized << " bitsandbytes 4-bit weights (" << params
        << " params), every quant_state consistent with its tensors:\n";
    for (const auto& [kind, count] : kinds) out << "    " << count << " x " << kind << "\n";
  }
  out << "  " << other << " other tensors; " << nbytes / 1048576.0 << " MiB of tensor data\n";
  return out.str();
}

}  // namespace qlora::app
