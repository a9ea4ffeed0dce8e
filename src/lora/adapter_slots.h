// The LoRA adapter lifecycle, once for every holder of adapter weights: peft's init, loading a
// PEFT adapter (every check before any change) and exporting one, over a list of slots. A slot
// is where one linear's A [r, in] and B [out, r] live: a QLoraLinear's lora_A() / lora_B(), or
// views into a flat fp32 LoRA unit buffer (train::lora_view). Writes go into the views in place.
//   init:  for each slot in list order: A ~ U(-1/sqrt(in), 1/sqrt(in)) from one generator
//          (kaiming_uniform, a = sqrt 5), B = 0
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "lora/peft_adapter.h"

namespace qlora::lora {

struct AdapterSlot {
  std::string module;  // peft's layer name: "model.layers.0.self_attn.q_proj"
  at::Tensor lora_A;   // [r, in] fp32
  at::Tensor lora_B;   // [out, r] fp32
};

// peft's init, drawn from `gen` in the order of `slots`. peft draws block by block, linear by
// linear in block_linear_names() order: list the slots that way to get its numbers for a seed.
void adapter_init(const std::vector<AdapterSlot>& slots, at::Generator gen);

// Copies `adapter` into `slots`. Its layers must be exactly the slots' modules, each with float
// A and B of the slots' shapes. Everything is checked before any slot changes; a mismatch is
// std::invalid_argument naming the layer and the shapes (a layer missing on either side also
// says how many each side has, then `hint`: how to make them agree).
void adapter_load(const std::vector<AdapterSlot>& slots, const PeftAdapter& adapter,
                  const std::string& hint);

// Adds detached copies of the slots' A and B to `out.weights` and keeps `out.target_modules` the
// linears present there (short names, in block_linear_names() order). `out.config` and
// `out.base_model_name_or_path` are the caller's.
void adapter_export(const std::vector<AdapterSlot>& slots, PeftAdapter& out);

}  // namespace qlora::lora
