// QuantState fields, its decoding of double-quantized absmax, and the packed JSON form.
#include "quant/quant_state.h"
#include "io/shape_str.h"

#include <ATen/ATen.h>

#include <charconv>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <stdexcept>

namespace qlora::quant {

QuantType quant_type_from_name(const std::string& name) {
  if (name == "nf4") return QuantType::nf4;
  if (name == "fp4") return QuantType::fp4;
  throw std::invalid_argument("unsupported quantization type '" + name + "' (expected nf4 or fp4)");
}

const char* quant_type_name(QuantType type) { return kernels::quant4_traits(type).name; }

at::ScalarType float_dtype_from_name(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  throw std::invalid_argument("unsupported float dtype '" + name +
                              "' (expected float32, bfloat16 or float16)");
}

std::string float_dtype_name(at::ScalarType dtype) {
  if (dtype == at::kFloat) return "float32";
  if (dtype == at::kBFloat16) return "bfloat16";
  if (dtype == at::kHalf) return "float16";
  throw std::invalid_argument(std::string("not a 4-bit source dtype: ") + c10::toString(dtype));
}

int64_t QuantState::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

at::Tensor QuantState::absmax_fp32() const {
  if (!nested) return absmax;
  // bitsandbytes: dequantize_blockwise(absmax_q, state2) + offset, both steps in fp32.
  const at::Tensor codes = nested->code.index({absmax.to(at::kLong)});
  const int64_t n = absmax.numel();
  const int64_t bs = nested->blocksize;
  const int64_t blocks = kernels::num_blocks(n, bs);
  at::Tensor scales = at::constant_pad_nd(codes, {0, blocks * bs - n}).view({blocks, bs});
  scales = (scales * nested->absmax.view({blocks, 1})).reshape({-1}).slice(0, 0, n);
  return scales + nested->offset;
}

void QuantState::validate(const std::string& where) const {
  auto fail = [&](const std::string& what) { throw std::invalid_argument(where + ": " + what); };
  if (!kernels::valid_blocksize(blocksize))
    fail("blocksize " + std::to_string(blocksize) + " is not a power of two in 32..4096");
  for (int64_t d : shape)
    if (d < 0) fail("negative dimension in shape");
  const int64_t want_blocks = blocks();
  if (!absmax.defined() || absmax.dim() != 1 || absmax.numel() != want_blocks)
    fail("absmax has " + (absmax.defined() ? std::to_string(absmax.numel()) : std::string("no")) +
         " entries, the shape and blocksize " + std::to_string(blocksize) + " need " +
         std::to_string(want_blocks));
  if (!code.defined() || code.numel() != 16 || code.scalar_type() != at::kFloat)
    fail("quant_map must be float32 [16]");
  // Kernels decode with the format's own table (as bitsandbytes' do): a different quant_map
  // would be silently ignored, so it is an error. Compared by value: bitsandbytes writes +0.0
  // at FP4 index 8, where the kernels decode -0.0.
  const at::Tensor map = code.contiguous().to(at::kCPU);
  for (int i = 0; i < 16; ++i)
    if (map.data_ptr<float>()[i] != kernels::quant4_traits(quant_type).code[i])
      fail(std::string("quant_map differs from bitsandbytes' ") + quant_type_name(quant_type) +
           " table at index " + std::to_string(i));
  if (nested) {
    if (absmax.scalar_type() != at::kByte) fail("double-quantized absmax must be uint8");
    if (nested->blocksize <= 0) fail("nested_blocksize must be positive");  // before dividing by it
    const int64_t want_nested = kernels::num_blocks(want_blocks, nested->blocksize);
    if (!nested->absmax.defined() || nested->absmax.numel() != want_nested ||
        nested->absmax.scalar_type() != at::kFloat)
      fail("nested_absmax must be float32 [" + std::to_string(want_nested) + "]");
    if (!nested->code.defined() || nested->code.numel() != 256 ||
        nested->code.scalar_type() != at::kFloat)
      fail("nested_quant_map must be float32 [256]");
  } else if (absmax.scalar_type() != at::kFloat) {
    fail("absmax must be float32 when not double-quantized");
  }
}

std::string python_float_repr(double value) {
  if (std::isnan(value)) return "NaN";  // what json.dumps writes
  if (std::isinf(value)) return value > 0 ? "Infinity" : "-Infinity";
  char sci[64];
  const auto res = std::to_chars(sci, sci + sizeof sci, value, std::chars_format::scientific);
  std::string s(sci, res.ptr);  // shortest round-trip digits: "-d.ddde[+-]XX"
  const bool neg = s[0] == '-';
  if (neg) s.erase(0, 1);
  const size_t e = s.find('e');
  std::string digits = s.substr(0, 1) + (e > 2 ? s.substr(2, e - 2) : "");
  const int exp = std::stoi(s.substr(e + 1));
  std::string out;
  if (exp >= -4 && exp < 16) {  // Python's repr switches to exponent form outside this range
    if (exp < 0) {
      out = "0." + std::string(static_cast<size_t>(-exp - 1), '0') + digits;
    } else if (static_cast<int>(digits.size()) <= exp + 1) {
      out = digits + std::string(static_cast<size_t>(exp + 1 - digits.size()), '0') + ".0";
    } else {
      out = digits.substr(0, exp + 1) + "." + digits.substr(exp + 1);
    }
  } else {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char buf[16];
    std::snprintf(buf, sizeof buf, "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    out += buf;
  }
  return neg ? "-" + out : out;
}

std::string quant_state_json(const QuantState& state) {
  const std::string shape = io::shape_str(state.shape);
  std::string s = std::string("{\"quant_type\": \"") + quant_type_name(state.quant_type) +
                  "\", \"blocksize\": " + std::to_string(state.blocksize) + ", \"dtype\": \"" +
                  float_dtype_name(state.dtype) + "\", \"shape\": " + shape;
  if (state.nested) {
    s += ", \"nested_blocksize\": " + std::to_string(state.nested->blocksize) +
         ", \"nested_dtype\": \"float32\", \"nested_offset\": " +
         python_float_repr(static_cast<double>(state.nested->offset));
  }
  return s + "}";
}

QuantState quant_state_from_json(const std::string& text, const std::string& where) {
  auto fail = [&](const std::string& what) -> QuantState {
    throw std::invalid_argument(where + ": " + what);
  };
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return fail("quant_state is not a JSON object");
  QuantState st;
  try {
    st.quant_type = quant_type_from_name(j.at("quant_type").get<std::string>());
    st.blocksize = j.at("blocksize").get<int32_t>();
    st.dtype = float_dtype_from_name(j.at("dtype").get<std::string>());
    st.shape = j.at("shape").get<std::vector<int64_t>>();
    if (j.contains("nested_blocksize") || j.contains("nested_offset")) {
      NestedState n;
      n.blocksize = j.at("nested_blocksize").get<int32_t>();
      if (j.value("nested_dtype", std::string("float32")) != "float32")
        return fail("nested_dtype must be float32");
      n.offset = static_cast<float>(j.at("nested_offset").get<double>());
      st.nested = n;
    }
  } catch (const nlohmann::json::exception& e) {
    return fail(std::string("quant_state JSON: ") + e.what());
  } catch (const std::invalid_argument& e) {
    return fail(e.what());
  }
  return st;
}

}  // namespace qlora::quant
