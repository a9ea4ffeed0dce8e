// FP8 / MXFP4 dequantization on load; the formulas and tensor names are in fp8_mxfp4.h.
// Every element is one fp32 product, written into an fp32 buffer of a few rows that ATen's copy
// rounds to the model's dtype (the rounding transformers' `.to(dtype)` applies): a weight is never
// held in fp32 whole.
#include "quant/fp8_mxfp4.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>

#include <cctype>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <set>
#include <stdexcept>

#include "io/shape_str.h"
#include "mxfp4_format.h"

namespace qlora::quant {
namespace {

using json = nlohmann::json;

// Elements per fp32 buffer before it is rounded into the output.
constexpr int64_t kChunkNumel = int64_t{1} << 20;

std::string json_text(const json& value) {
  std::string text = value.dump();
  return text.size() > 80 ? text.substr(0, 80) + "..." : text;
}

std::string module_of(const std::string& weight_name) {
  const std::string suffix = ".weight";
  if (weight_name.size() <= suffix.size() ||
      weight_name.compare(weight_name.size() - suffix.size(), suffix.size(), suffix) != 0)
    throw std::logic_error("'" + weight_name + "' is not a linear weight name");
  return weight_name.substr(0, weight_name.size() - suffix.size());
}

std::string dtype_list(const std::vector<io::DType>& dtypes) {
  std::string text;
  for (size_t i = 0; i < dtypes.size(); ++i)
    text += (i == 0 ? "" : i + 1 == dtypes.size() ? " or " : ", ") + std::string(io::dtype_name(dtypes[i]));
  return text;
}

// 2^(byte - 127) for every E8M0 byte, as fp32: byte 0 is the subnormal 2^-127 and byte 255 is
// +inf, which is what transformers computes from uint8 scales (exp2(byte - 127.0) in fp32). As
// torch.float8_e8m0fnu, byte 255 is NaN instead (nan_for_ff).
at::Tensor e8m0_table(bool nan_for_ff) {
  std::array<float, 256> table{};
  for (int b = 0; b < 256; ++b)
    table[b] = std::ldexp(1.0f, b - kernels::kE8M0Bias);  // 2^128 overflows to +inf
  if (nan_for_ff) table[255] = std::nanf("");
  return at::tensor(at::ArrayRef<float>(table.data(), table.size()),
                    at::TensorOptions().dtype(at::kFloat));
}

at::Tensor e8m0_to_float(const at::Tensor& bytes, bool nan_for_ff) {
  const at::Tensor index = bytes.contiguous().view(at::kByte).to(at::kLong);
  return e8m0_table(nan_for_ff).index_select(0, index.reshape({-1})).reshape(bytes.sizes());
}

void check_float_dtype(at::ScalarType dtype) {
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf)
    throw std::invalid_argument(std::string("dequantize to ") + c10::toString(dtype) +
                                " is not supported (expected float32, bfloat16 or float16)");
}

// Fills out [rows, cols] (any float dtype) from fp32 values fill(i, j, dst) writes row by row.
template <class RowFill>
void rows_fill(const at::Tensor& out, RowFill fill_row) {
  const int64_t rows = out.size(0), cols = out.size(1);
  const int64_t chunk_rows = std::max<int64_t>(1, kChunkNumel / std::max<int64_t>(cols, 1));
  at::Tensor buf = at::empty({std::min(rows, chunk_rows), cols}, at::TensorOptions().dtype(at::kFloat));
  for (int64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
    const int64_t n = std::min(chunk_rows, rows - r0);
    float* dst = buf.data_ptr<float>();
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) fill_row(r0 + r, dst + r * cols);
    });
    out.narrow(0, r0, n).copy_(buf.narrow(0, 0, n));
  }
}

const std::set<std::string>& fp8_keys() {
  static const std::set<std::string> keys = {
      "quant_method",  "activation_scheme",      "weight_block_size", "dequantize", "fmt",
      "scale_fmt",     "modules_to_not_convert", "ignored_layers",    "modules_to_convert",
      "expert_dtype"};
  return keys;
}

const std::set<std::string>& mxfp4_keys() {
  static const std::set<std::string> keys = {"quant_method", "modules_to_not_convert", "dequantize"};
  return keys;
}

std::string keys_list(const std::set<std::string>& keys) {
  std::string text;
  for (const std::string& k : keys) text += (text.empty() ? "" : ", ") + k;
  return text;
}

}  // namespace

std::string DequantFormat::describe() const {
  if (method == io::QuantMethod::fp8) {
    std::string text = "fp8 (float8_e4m3fn, ";
    text += block_rows == 0 ? std::string("one scale per tensor")
                            : "block " + std::to_string(block_rows) + "x" + std::to_string(block_cols);
    return text + (ue8m0_scales ? ", E8M0 scales)" : ", float scales)");
  }
  if (method == io::QuantMethod::mxfp4) return "mxfp4 (E2M1, blocks of 32, E8M0 scales)";
  throw std::logic_error(std::string("DequantFormat of method ") + io::quant_method_name(method));
}

DequantFormat dequant_format_from(const io::QuantizationConfig& quantization,
                                  const std::string& path) {
  DequantFormat f;
  f.method = quantization.method;
  const json& q = quantization.raw;
  const std::string where = path + ": quantization_config";
  const auto refuse = [&](const std::string& key, const json& value, const std::string& right) {
    throw std::invalid_argument(where + "." + key + " " + json_text(value) +
                                " is not supported (" + right + ")");
  };
  if (f.method != io::QuantMethod::fp8 && f.method != io::QuantMethod::mxfp4)
    throw std::logic_error(where + ": quant_method '" + quantization.quant_method +
                           "' is neither fp8 nor mxfp4");
  const bool fp8 = f.method == io::QuantMethod::fp8;
  const std::set<std::string>& known = fp8 ? fp8_keys() : mxfp4_keys();
  for (const auto& [key, value] : q.items())
    if (!known.count(key))
      throw std::invalid_argument(where + " has key '" + key + "', which qlora_dist cannot honour for " +
                                  quantization.quant_method + " (known keys: " + keys_list(known) + ")");
  const auto string_list_check = [&](const char* key) {
    const auto it = q.find(key);
    if (it == q.end() || it->is_null()) return;
    bool ok = it->is_array();
    for (size_t i = 0; ok && i < it->size(); ++i) ok = (*it)[i].is_string();
    if (!ok) refuse(key, *it, "expected a list of module names, or null");
  };
  string_list_check("modules_to_not_convert");
  if (const auto it = q.find("dequantize"); it != q.end() && !it->is_boolean())
    refuse("dequantize", *it, "expected true or false");
  if (!fp8) return f;

  string_list_check("ignored_layers");
  if (const auto it = q.find("activation_scheme"); it != q.end()) {
    std::string scheme = it->is_string() ? it->get<std::string>() : "";
    std::transform(scheme.begin(), scheme.end(), scheme.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    if (scheme != "dynamic" && scheme != "static")
      refuse("activation_scheme", *it, "expected \"dynamic\" or \"static\"");
  }
  f.block_rows = f.block_cols = 128;  // transformers' default when the key is absent
  if (const auto it = q.find("weight_block_size"); it != q.end()) {
    if (it->is_null()) {
      f.block_rows = f.block_cols = 0;
    } else {
      const bool pair = it->is_array() && it->size() == 2 && (*it)[0].is_number_integer() &&
                        (*it)[1].is_number_integer() && (*it)[0].get<int64_t>() > 0 &&
                        (*it)[1].get<int64_t>() > 0;
      if (!pair)
        refuse("weight_block_size", *it,
               "expected two positive integers [rows, cols], or null for one scale per tensor");
      f.block_rows = (*it)[0].get<int64_t>();
      f.block_cols = (*it)[1].get<int64_t>();
    }
  }
  if (const auto it = q.find("fmt"); it != q.end() && !(it->is_string() && *it == "e4m3"))
    refuse("fmt", *it, "expected \"e4m3\": only float8_e4m3fn weights are supported");
  if (const auto it = q.find("scale_fmt"); it != q.end()) {
    if (!(it->is_string() && (*it == "float" || *it == "ue8m0")))
      refuse("scale_fmt", *it, "expected \"float\" or \"ue8m0\"");
    f.ue8m0_scales = *it == "ue8m0";
  }
  if (const auto it = q.find("expert_dtype");
      it != q.end() && !(it->is_string() && (*it == "fp8" || *it == "fp4")))
    refuse("expert_dtype", *it, "expected \"fp8\" or \"fp4\"");
  if (const auto it = q.find("modules_to_convert");
      it != q.end() && !it->is_null() && !(it->is_array() && it->empty()))
    refuse("modules_to_convert", *it,
           "FP8 embeddings are not supported; expected null: only linear layers stored in FP8");
  return f;
}

DequantSource dequant_source_check(
    const DequantFormat& format, const std::string& weight_name, const std::vector<int64_t>& shape,
    const std::function<const io::TensorInfo*(const std::string&)>& find) {
  if (shape.size() != 2) throw std::logic_error("'" + weight_name + "': a linear weight is 2-D");
  const std::string module = module_of(weight_name);
  const int64_t out = shape[0], in = shape[1];
  const io::TensorInfo* weight = find(weight_name);
  const auto tensor_check = [&](const std::string& name, const std::vector<io::DType>& dtypes,
                                const std::vector<int64_t>& want, const std::string& why) {
    const io::TensorInfo* info = find(name);
    if (info == nullptr)
      throw std::invalid_argument("tensor '" + name + "' is missing (" + why + ")");
    if (std::find(dtypes.begin(), dtypes.end(), info->dtype) == dtypes.end())
      throw std::invalid_argument("tensor '" + name + "' has dtype " + io::dtype_name(info->dtype) +
                                  " (expected " + dtype_list(dtypes) + ")");
    if (info->shape != want)
      throw std::invalid_argument("tensor '" + name + "' has shape " + io::shape_str(info->shape) +
                                  ", expected " + io::shape_str(want) + " for " + why);
  };
  DequantSource source;
  if (format.method == io::QuantMethod::fp8) {
    const std::string scale = module + ".weight_scale_inv";
    const bool fp8_dtype = weight != nullptr && io::dtype_size(weight->dtype) == 1;
    if (find(scale) == nullptr) {
      if (fp8_dtype)
        throw std::invalid_argument("tensor '" + weight_name + "' has dtype " +
                                    io::dtype_name(weight->dtype) + " but '" + scale +
                                    "' is missing (an FP8 weight needs its scales)");
      return source;  // plain: the caller checks it as a float weight
    }
    if (weight != nullptr && weight->dtype != io::DType::F8_E4M3)
      throw std::invalid_argument(
          "tensor '" + weight_name + "' has dtype " + io::dtype_name(weight->dtype) +
          " (expected F8_E4M3, float8_e4m3fn, next to its weight_scale_inv; e5m2 and fnuz FP8 "
          "weights are not supported)");
    tensor_check(weight_name, {io::DType::F8_E4M3}, shape, "the linear's [out, in] from config.json");
    std::vector<int64_t> scale_shape;  // [] for one scale per tensor, as FP8Linear holds it
    if (format.block_rows > 0)
      scale_shape = {(out + format.block_rows - 1) / format.block_rows,
                     (in + format.block_cols - 1) / format.block_cols};
    const std::vector<io::DType> scale_dtypes =
        format.ue8m0_scales ? std::vector<io::DType>{io::DType::F8_E8M0, io::DType::U8}
                            : std::vector<io::DType>{io::DType::F32, io::DType::BF16, io::DType::F16};
    tensor_check(scale, scale_dtypes, scale_shape,
                 format.block_rows > 0
                     ? "weight_block_size [" + std::to_string(format.block_rows) + ", " +
                           std::to_string(format.block_cols) + "] over " + io::shape_str(shape)
                     : std::string("weight_block_size null (one scale per tensor)"));
    source.plain = false;
    source.tensors = {weight_name, scale};
    if (find(module + ".activation_scale") != nullptr)  // static scheme: unused once dequantized
      source.tensors.push_back(module + ".activation_scale");
    return source;
  }
  if (format.method == io::QuantMethod::mxfp4) {
    const std::string blocks = module + ".weight_blocks", scales = module + ".weight_scales";
    if (find(blocks) == nullptr) return source;
    if (weight != nullptr)
      throw std::invalid_argument("both '" + weight_name + "' and '" + blocks +
                                  "' are stored (expected one of them)");
    if (in % kernels::kMxfp4BlockSize != 0)
      throw std::invalid_argument(
          "tensor '" + blocks + "': MXFP4 needs in_features to be a multiple of 32, and '" +
          weight_name + "' has " + std::to_string(in) + " (config.json implies " +
          io::shape_str(shape) + ")");
    const int64_t groups = in / kernels::kMxfp4BlockSize;
    tensor_check(blocks, {io::DType::U8}, {out, groups, kernels::kMxfp4BlockBytes},
                 "MXFP4 blocks of " + io::shape_str(shape) + ": [out, in/32, 16]");
    tensor_check(scales, {io::DType::U8}, {out, groups},
                 "MXFP4 scales of " + io::shape_str(shape) + ": [out, in/32]");
    source.plain = false;
    source.tensors = {blocks, scales};
    return source;
  }
  throw std::logic_error(std::string("dequant_source_check: method ") +
                         io::quant_method_name(format.method));
}

at::Tensor dequant_read(const DequantFormat& format, const std::string& weight_name,
                        const std::vector<int64_t>& shape, at::ScalarType dtype,
                        const std::function<at::Tensor(const std::string&)>& get) {
  const std::string module = module_of(weight_name);
  at::Tensor w;
  if (format.method == io::QuantMethod::fp8)
    w = fp8_dequantize(get(weight_name), get(module + ".weight_scale_inv"), format.block_rows,
                       format.block_cols, dtype);
  else if (format.method == io::QuantMethod::mxfp4)
    w = mxfp4_dequantize(get(module + ".weight_blocks"), get(module + ".weight_scales"), dtype);
  else
    throw std::logic_error(std::string("dequant_read: method ") + io::quant_method_name(format.method));
  if (w.sizes().vec() != shape)
    throw std::logic_error("'" + weight_name + "' dequantized to " + io::shape_str(w.sizes().vec()));
  return w;
}

at::Tensor fp8_dequantize(const at::Tensor& weight, const at::Tensor& scale_inv,
                          int64_t block_rows, int64_t block_cols, at::ScalarType dtype) {
  check_float_dtype(dtype);
  if (weight.dim() != 2 || weight.scalar_type() != at::kFloat8_e4m3fn)
    throw std::invalid_argument("fp8_dequantize: weight must be 2-D float8_e4m3fn");
  const int64_t out = weight.size(0), in = weight.size(1);
  const bool per_tensor = block_rows == 0;
  const int64_t bn = per_tensor ? std::max<int64_t>(out, 1) : block_rows;
  const int64_t bk = per_tensor ? std::max<int64_t>(in, 1) : block_cols;
  if (bn <= 0 || bk <= 0) throw std::invalid_argument("fp8_dequantize: block sizes must be positive");
  const int64_t scale_rows = (out + bn - 1) / bn, scale_cols = (in + bk - 1) / bk;
  if (scale_inv.numel() != scale_rows * scale_cols)
    throw std::invalid_argument("fp8_dequantize: scale_inv has " + std::to_string(scale_inv.numel()) +
                                " elements, expected " + std::to_string(scale_rows * scale_cols));
  at::Tensor s;  // fp32 [scale_rows * scale_cols]
  if (scale_inv.scalar_type() == at::kByte)
    s = e8m0_to_float(scale_inv, false);
  else if (scale_inv.scalar_type() == at::kFloat8_e8m0fnu)
    s = e8m0_to_float(scale_inv.view(at::kByte), true);
  else if (scale_inv.scalar_type() == at::kFloat || scale_inv.scalar_type() == at::kBFloat16 ||
           scale_inv.scalar_type() == at::kHalf)
    s = scale_inv.to(at::kFloat);
  else
    throw std::invalid_argument(std::string("fp8_dequantize: scale_inv dtype ") +
                                c10::toString(scale_inv.scalar_type()) + " is not supported");
  s = s.contiguous().reshape({-1});
  const at::Tensor q = weight.contiguous();
  const auto* qp = reinterpret_cast<const c10::Float8_e4m3fn*>(q.data_ptr());
  const float* sp = s.data_ptr<float>();
  at::Tensor result = at::empty({out, in}, at::TensorOptions().dtype(dtype));
  rows_fill(result, [&](int64_t i, float* dst) {
    const c10::Float8_e4m3fn* row = qp + i * in;
    const float* srow = sp + (i / bn) * scale_cols;
    for (int64_t j = 0; j < in; ++j) dst[j] = static_cast<float>(row[j]) * srow[j / bk];
  });
  return result;
}

at::Tensor mxfp4_dequantize(const at::Tensor& blocks, const at::Tensor& scales,
                            at::ScalarType dtype) {
  check_float_dtype(dtype);
  if (blocks.dim() != 3 || blocks.scalar_type() != at::kByte ||
      blocks.size(2) != kernels::kMxfp4BlockBytes)
    throw std::invalid_argument("mxfp4_dequantize: blocks must be uint8 [out, G, 16]");
  const int64_t out = blocks.size(0), groups = blocks.size(1);
  if (scales.scalar_type() != at::kByte || scales.sizes() != at::IntArrayRef{out, groups})
    throw std::invalid_argument("mxfp4_dequantize: scales must be uint8 [out, G] matching blocks");
  const at::Tensor b = blocks.contiguous(), e = scales.contiguous();
  const uint8_t* bp = b.data_ptr<uint8_t>();
  const uint8_t* ep = e.data_ptr<uint8_t>();
  const at::Tensor pow2 = e8m0_table(false);
  const float* pp = pow2.data_ptr<float>();
  const int64_t in = groups * kernels::kMxfp4BlockSize;
  at::Tensor result = at::empty({out, in}, at::TensorOptions().dtype(dtype));
  rows_fill(result, [&](int64_t o, float* dst) {
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t e = ep[o * groups + g];
      const uint8_t* src = bp + (o * groups + g) * kernels::kMxfp4BlockBytes;
      float* d = dst + g * kernels::kMxfp4BlockSize;
      if (e != 255) {  // 2^(e - 127) is an fp32 number: the product is ldexp, rounded once
        const float scale = pp[e];
        for (int64_t k = 0; k < kernels::kMxfp4BlockBytes; ++k) {
          d[2 * k] = kernels::kE2M1Code[src[k] & 15] * scale;  // low nibble first
          d[2 * k + 1] = kernels::kE2M1Code[src[k] >> 4] * scale;
        }
      } else {  // 2^128 is not: ldexp as torch.ldexp computes it (0 stays 0, 0.5 gives 2^127)
        for (int64_t k = 0; k < kernels::kMxfp4BlockBytes; ++k) {
          d[2 * k] = std::ldexp(kernels::kE2M1Code[src[k] & 15], 255 - kernels::kE8M0Bias);
          d[2 * k + 1] = std::ldexp(kernels::kE2M1Code[src[k] >> 4], 255 - kernels::kE8M0Bias);
        }
      }
    }
  });
  return result;
}

}  // namespace qlora::quant
