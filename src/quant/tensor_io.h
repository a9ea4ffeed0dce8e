// Bridges between safetensors entries (src/io, torch-free) and at::Tensor.
#pragma once

#include "io/shape_str.h"

#include <ATen/core/Tensor.h>

#include <string>

#include "io/safetensors.h"

namespace qlora::quant {

at::ScalarType scalar_type_from(io::DType dtype);  // throws std::invalid_argument if no torch type
io::DType dtype_from(at::ScalarType type);

// An owned CPU tensor holding a copy of the entry's bytes.
at::Tensor tensor_from_safetensors(const io::TensorInfo& info, const uint8_t* data);
at::Tensor tensor_from_weights(const io::ModelWeights& weights, const std::string& name);

// "[2, 3]": how error messages print a shape.
inline std::string shape_str(at::IntArrayRef sizes) { return io::shape_str(sizes.data(), sizes.size()); }
using io::shape_str;

// Adds a (CPU, any layout) tensor to a writer under `name`.
void writer_add(io::SafetensorsWriter& writer, const std::string& name, const at::Tensor& tensor);

}  // namespace qlora::quant
