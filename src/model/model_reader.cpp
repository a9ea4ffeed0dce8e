// Reading a Hugging Face model directory; see model_reader.h.
#include "model/model_reader.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <stdexcept>
#include <vector>

#include "quant/bnb_checkpoint.h"
#include "quant/quant_state.h"
#include "quant/tensor_io.h"

namespace qlora::model {

namespace {

// transformers' dtype="auto": config.json's "dtype" (v5) or "torch_dtype", else the dtype of the
// stored float tensors (the embedding's; get_state_dict_dtype skips FP8 ones).
at::ScalarType dequant_dtype_from(const io::HfConfig& hf, const io::ModelWeights& w) {
  for (const char* key : {"dtype", "torch_dtype"}) {
    const auto it = hf.raw.find(key);
    if (it == hf.raw.end() || !it->is_string()) continue;
    const std::string name = it->get<std::string>();
    if (name == "float32") return at::kFloat;
    if (name == "bfloat16") return at::kBFloat16;
    if (name == "float16") return at::kHalf;
    throw std::invalid_argument(hf.path + ": " + key + " '" + name +
                                "' cannot hold dequantized weights (expected float32, bfloat16 or "
                                "float16)");
  }
  const std::string embed = "model.embed_tokens.weight";
  if (w.contains(embed)) {
    const io::DType dt = w.info(embed).dtype;
    if (dt == io::DType::BF16) return at::kBFloat16;
    if (dt == io::DType::F16) return at::kHalf;
  }
  return at::kFloat;
}

}  // namespace

ModelReader::ModelReader(const std::string& dir)
    : dir_(dir), hf_(io::read_hf_config((std::filesystem::path(dir) / "config.json").string())) {
  config_ = model_config_from_json(hf_.raw, hf_.path);
  const io::QuantMethod m = hf_.quantization.method;
  if (m == io::QuantMethod::fp8 || m == io::QuantMethod::mxfp4)
    dequant_ = quant::dequant_format_from(hf_.quantization, hf_.path);
}

bool ModelReader::prequantized() const {
  return hf_.quantization.method == io::QuantMethod::bnb_4bit;
}

const quant::DequantFormat& ModelReader::dequant_format() const {
  if (!dequant_) throw std::logic_error(dir_ + ": not an fp8 / mxfp4 checkpoint");
  return *dequant_;
}

std::vector<std::string> ModelReader::dequant_sources(const std::string& weight_name) const {
  weights();  // std::logic_error before weights_open
  const auto it = dequant_linears_.find(weight_name);
  return it == dequant_linears_.end() ? std::vector<std::string>{} : it->second.tensors;
}

const io::ModelWeights& ModelReader::weights() const {
  if (!weights_) throw std::logic_error(dir_ + ": ModelReader::weights_open was not called");
  return *weights_;
}

void ModelReader::weights_open() {
  if (!prequantized() && !dequantizes() && hf_.quantization.method != io::QuantMethod::none)
    throw std::logic_error(hf_.path + ": quant_method '" + hf_.quantization.quant_method +
                           "' reached the model reader; the caller refuses it first");
  weights_ = io::ModelWeights::open_dir(dir_);
  // A decoder stored under a prefix (Gemma3ForConditionalGeneration) is read by the inside names.
  if (!config_.weights_prefix.empty())
    for (const std::string& name : weights_->names()) {
      const std::string inside = canonical_weight_name(config_, name);
      if (inside != name) weights_->alias(inside, name);
    }
  const io::ModelWeights& w = *weights_;
  const ModelConfig& c = config_;
  dequant_linears_.clear();
  if (dequant_) dequant_dtype_ = dequant_dtype_from(hf_, w);
  const auto find = [&](const std::string& n) -> const io::TensorInfo* {
    return w.contains(n) ? &w.info(n) : nullptr;
  };
  for (const auto& [name, shape] : expected_weight_shapes(c)) {
    std::vector<int64_t> have;
    if (dequant_ && is_block_linear_weight(name)) {
      quant::DequantSource source;
      try {
        source = quant::dequant_source_check(*dequant_, name, shape, find);
      } catch (const std::invalid_argument& e) {
        throw std::invalid_argument(dir_ + ": " + e.what());
      }
      if (!source.plain) {  // shapes checked against the config
        dequant_linears_[name] = {shape, source.tensors};
        continue;
      }
    }
    if (linear_is_quantized(name)) {
      const std::string key =
          quant::bnb_quant_state_key(name, [&](const std::string& n) { return w.contains(n); });
      const at::Tensor bytes = quant::tensor_from_weights(w, key).contiguous();
      if (bytes.scalar_type() != at::kByte)
        throw std::invalid_argument(dir_ + ": tensor '" + key + "' must be uint8 JSON bytes");
      const std::string json(reinterpret_cast<const char*>(bytes.data_ptr()),
                             static_cast<size_t>(bytes.numel()));
      have = quant::quant_state_from_json(json, dir_ + ": " + key).shape;
    } else {
      if (!w.contains(name))
        throw std::invalid_argument(
            dir_ + ": tensor '" + name + "' is missing (config.json implies " + shape_str(shape) +
            "; the config has " + std::to_string(c.num_hidden_layers) + " layers)");
      const io::TensorInfo& info = w.info(name);
      const bool linear = is_block_linear_weight(name);
      const io::DType dt = info.dtype;
      const bool ok = dt == io::DType::F32 || dt == io::DType::BF16 || dt == io::DType::F16 ||
                      (!linear && dt == io::DType::F64);
      if (!ok)
        throw std::invalid_argument(dir_ + ": tensor '" + name + "' has dtype " +
                                    io::dtype_name(dt) +
                                    (linear ? " (expected F32, BF16 or F16 to quantize)"
                                            : " (expected F32, BF16, F16 or F64)"));
      have = info.shape;
    }
    if (have != shape)
      throw std::invalid_argument(dir_ + ": tensor '" + name + "' has shape " + shape_str(have) +
                                  ", config.json implies " + shape_str(shape));
  }
}

bool ModelReader::linear_is_quantized(const std::string& weight_name) const {
  if (!prequantized() || !is_block_linear_weight(weight_name)) return false;
  const io::ModelWeights& w = weights();
  return !quant::bnb_quant_state_key(weight_name, [&](const std::string& n) {
            return w.contains(n);
          }).empty();
}

at::Tensor ModelReader::tensor(const std::string& name) {
  if (dequant_linears_.count(name))
    throw std::logic_error(dir_ + ": '" + name + "' is stored FP8/MXFP4; read it with linear_weight");
  const std::string stored =
      name == "lm_head.weight" && config_.tie_word_embeddings ? "model.embed_tokens.weight" : name;
  bytes_read_ += weights().info(stored).nbytes;
  return quant::tensor_from_weights(weights(), stored);
}

at::Tensor ModelReader::linear_weight(const std::string& weight_name) {
  const auto it = dequant_linears_.find(weight_name);
  if (it == dequant_linears_.end()) return tensor(weight_name);
  const auto get = [&](const std::string& name) {
    bytes_read_ += weights().info(name).nbytes;
    return quant::tensor_from_weights(weights(), name);
  };
  return quant::dequant_read(*dequant_, weight_name, it->second.shape, dequant_dtype_, get);
}

quant::Quantized ModelReader::linear(const std::string& weight_name,
                                     const quant::QuantizeOptions& quant) {
  if (!linear_is_quantized(weight_name))
    return quant::quantize_4bit(linear_weight(weight_name), quant);
  const auto lookup = [&](const std::string& name) -> std::optional<at::Tensor> {
    if (!weights().contains(name)) return std::nullopt;
    return tensor(name);
  };
  try {
    return quant::bnb_read_quantized(weight_name, lookup);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(dir_ + ": " + e.what());
  }
}

}  // namespace qlora::model
