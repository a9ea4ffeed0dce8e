// Reading and writing bitsandbytes' per-weight tensor set; see bnb_checkpoint.h.
#include "quant/bnb_checkpoint.h"
#include "io/shape_str.h"

#include <ATen/ATen.h>

#include <cstring>
#include <stdexcept>

namespace qlora::quant {
namespace {

const char* const kStateSuffixes[] = {".absmax", ".quant_map", ".nested_absmax",
                                      ".nested_quant_map", ".quant_state.bitsandbytes__nf4",
                                      ".quant_state.bitsandbytes__fp4"};

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

std::vector<std::pair<std::string, at::Tensor>> bnb_checkpoint_tensors(
    const std::string& weight_name, const Quantized& q) {
  const QuantState& st = q.state;
  std::vector<std::pair<std::string, at::Tensor>> out;
  out.emplace_back(weight_name, q.packed);
  out.emplace_back(weight_name + ".absmax", st.absmax);
  out.emplace_back(weight_name + ".quant_map", st.code);
  if (st.nested) {
    out.emplace_back(weight_name + ".nested_absmax", st.nested->absmax);
    out.emplace_back(weight_name + ".nested_quant_map", st.nested->code);
  }
  const std::string json = quant_state_json(st);
  at::Tensor bytes = at::empty({static_cast<int64_t>(json.size())}, at::kByte);
  std::memcpy(bytes.data_ptr(), json.data(), json.size());
  out.emplace_back(weight_name + ".quant_state.bitsandbytes__" + quant_type_name(st.quant_type),
                   bytes);
  return out;
}

std::string bnb_quant_state_key(const std::string& weight_name,
                                const std::function<bool(const std::string&)>& contains) {
  for (const char* type : {"nf4", "fp4"}) {
    const std::string key = weight_name + ".quant_state.bitsandbytes__" + type;
    if (contains(key)) return key;
  }
  return "";
}

bool bnb_is_state_tensor(const std::string& name) {
  for (const char* s : kStateSuffixes)
    if (ends_with(name, s)) return true;
  return false;
}

Quantized bnb_read_quantized(const std::string& weight_name, const TensorLookup& get) {
  auto require = [&](const std::string& name) {
    std::optional<at::Tensor> t = get(name);
    if (!t) throw std::invalid_argument("tensor '" + name + "' is missing from the checkpoint");
    return *t;
  };
  std::string key;
  for (const char* type : {"nf4", "fp4"}) {
    const std::string k = weight_name + ".quant_state.bitsandbytes__" + type;
    if (get(k)) key = k;
  }
  if (key.empty())
    throw std::invalid_argument("tensor '" + weight_name +
                                ".quant_state.bitsandbytes__nf4' (or __fp4) is missing");
  const at::Tensor json_bytes = require(key).contiguous();
  if (json_bytes.scalar_type() != at::kByte)
    throw std::invalid_argument("tensor '" + key + "' must be uint8 JSON bytes");
  const std::string json(reinterpret_cast<const char*>(json_bytes.data_ptr()),
                         static_cast<size_t>(json_bytes.numel()));
  Quantized q;
  q.state = quant_state_from_json(json, key);
  const std::string type_from_key = key.substr(key.size() - 3);
  if (type_from_key != quant_type_name(q.state.quant_type))
    throw std::invalid_argument(key + ": quant_type '" + quant_type_name(q.state.quant_type) +
                                "' disagrees with the tensor name (" + type_from_key + ")");
  q.packed = require(weight_name);
  q.state.absmax = require(weight_name + ".absmax");
  q.state.code = require(weight_name + ".quant_map");
  if (q.state.nested) {
    q.state.nested->absmax = require(weight_name + ".nested_absmax");
    q.state.nested->code = require(weight_name + ".nested_quant_map");
  } else if (get(weight_name + ".nested_absmax")) {
    throw std::invalid_argument(key + ": has no nested_offset but '" + weight_name +
                                ".nested_absmax' exists");
  }
  q.state.validate(weight_name);
  const int64_t need = kernels::packed_nbytes(q.state.numel());
  const int64_t have = q.packed.numel() * static_cast<int64_t>(q.packed.element_size());
  const int64_t item = static_cast<int64_t>(q.packed.element_size());
  if (have < need || have >= need + item) {
    throw std::invalid_argument("tensor '" + weight_name + "' holds " + std::to_string(have) +
                                " packed bytes but its quant_state shape " +
                                io::shape_str(q.state.shape) + " needs " +
                                std::to_string(need));
  }
  return q;
}

}  // namespace qlora::quant
