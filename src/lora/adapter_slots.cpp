// The adapter lifecycle over slots; see adapter_slots.h.
#include "lora/adapter_slots.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <set>
#include <stdexcept>

#include "lora/lora_target.h"
#include "quant/tensor_io.h"

namespace qlora::lora {

using quant::shape_str;

void adapter_init(const std::vector<AdapterSlot>& slots, at::Generator gen) {
  at::NoGradGuard no_grad;  // the slots may be leaves that require grad
  for (const AdapterSlot& s : slots) {
    // kaiming_uniform_(a = sqrt 5) on a [r, in] weight: gain sqrt(2 / (1 + 5)), bound
    // gain * sqrt(3 / fan_in) = 1 / sqrt(in).
    const double bound = 1.0 / std::sqrt(static_cast<double>(s.lora_A.size(1)));
    s.lora_A.uniform_(-bound, bound, gen);
    s.lora_B.zero_();
  }
}

void adapter_load(const std::vector<AdapterSlot>& slots, const PeftAdapter& adapter,
                  const std::string& hint) {
  const auto counts = [&] {
    return " (" + std::to_string(slots.size()) + " layers to load, the adapter has " +
           std::to_string(adapter.weights.size()) + ")" + (hint.empty() ? "" : "; " + hint);
  };
  const auto sizes = [](const at::Tensor& t) {
    return t.defined() ? t.sizes().vec() : std::vector<int64_t>{};
  };
  // Everything is checked before any slot changes.
  std::set<std::string> modules;
  for (const AdapterSlot& s : slots) {
    modules.insert(s.module);
    const auto it = adapter.weights.find(s.module);
    if (it == adapter.weights.end())
      throw std::invalid_argument("adapter layer '" + s.module + "' is missing from the adapter" +
                                  counts());
    const at::Tensor& a = it->second.first;
    const at::Tensor& b = it->second.second;
    const std::vector<int64_t> want_a = sizes(s.lora_A), want_b = sizes(s.lora_B);
    if (sizes(a) != want_a || sizes(b) != want_b)
      throw std::invalid_argument(
          "adapter layer '" + s.module + "': lora_A " + shape_str(sizes(a)) + " and lora_B " +
          shape_str(sizes(b)) + " do not fit; rank " + std::to_string(want_a.at(0)) +
          " on this layer needs lora_A " + shape_str(want_a) + " and lora_B " + shape_str(want_b));
    if (!a.is_floating_point() || !b.is_floating_point())
      throw std::invalid_argument("adapter layer '" + s.module + "': lora_A " +
                                  c10::toString(a.scalar_type()) + " and lora_B " +
                                  c10::toString(b.scalar_type()) + " must be float tensors");
  }
  for (const auto& [name, ab] : adapter.weights)
    if (modules.count(name) == 0)
      throw std::invalid_argument("adapter layer '" + name + "' is not one of the layers to load" +
                                  counts());
  at::NoGradGuard no_grad;
  for (const AdapterSlot& s : slots) {
    const auto& ab = adapter.weights.at(s.module);
    s.lora_A.copy_(ab.first);  // converted to the slot's fp32 and device
    s.lora_B.copy_(ab.second);
  }
}

void adapter_export(const std::vector<AdapterSlot>& slots, PeftAdapter& out) {
  for (const AdapterSlot& s : slots)
    out.weights[s.module] = {s.lora_A.detach().clone(), s.lora_B.detach().clone()};
  std::set<std::string> present;  // "model.layers.0.self_attn.q_proj" -> "q_proj"
  for (const auto& [module, ab] : out.weights) present.insert(module.substr(module.rfind('.') + 1));
  out.target_modules.clear();
  for (const std::string& name : block_linear_names())
    if (present.count(name) != 0) out.target_modules.push_back(name);
}

}  // namespace qlora::lora
