// Tensor <-> safetensors conversion (copies; the mapped file is never aliased by a tensor).
#include "quant/tensor_io.h"

#include <ATen/ATen.h>

#include <cstring>
#include <stdexcept>

namespace qlora::quant {

at::ScalarType scalar_type_from(io::DType dtype) {
  switch (dtype) {
    case io::DType::BOOL: return at::kBool;
    case io::DType::U8: return at::kByte;
    case io::DType::I8: return at::kChar;
    case io::DType::I16: return at::kShort;
    case io::DType::I32: return at::kInt;
    case io::DType::I64: return at::kLong;
    case io::DType::F16: return at::kHalf;
    case io::DType::BF16: return at::kBFloat16;
    case io::DType::F32: return at::kFloat;
    case io::DType::F64: return at::kDouble;
    case io::DType::F8_E4M3: return at::kFloat8_e4m3fn;
    case io::DType::F8_E5M2: return at::kFloat8_e5m2;
    case io::DType::F8_E8M0: return at::kFloat8_e8m0fnu;
    case io::DType::F8_E4M3FNUZ: return at::kFloat8_e4m3fnuz;
    case io::DType::F8_E5M2FNUZ: return at::kFloat8_e5m2fnuz;
    default:
      throw std::invalid_argument(std::string("safetensors dtype ") + io::dtype_name(dtype) +
                                  " has no torch equivalent here");
  }
}

io::DType dtype_from(at::ScalarType type) {
  switch (type) {
    case at::kBool: return io::DType::BOOL;
    case at::kByte: return io::DType::U8;
    case at::kChar: return io::DType::I8;
    case at::kShort: return io::DType::I16;
    case at::kInt: return io::DType::I32;
    case at::kLong: return io::DType::I64;
    case at::kHalf: return io::DType::F16;
    case at::kBFloat16: return io::DType::BF16;
    case at::kFloat: return io::DType::F32;
    case at::kDouble: return io::DType::F64;
    case at::kFloat8_e4m3fn: return io::DType::F8_E4M3;
    case at::kFloat8_e5m2: return io::DType::F8_E5M2;
    case at::kFloat8_e8m0fnu: return io::DType::F8_E8M0;
    case at::kFloat8_e4m3fnuz: return io::DType::F8_E4M3FNUZ;
    case at::kFloat8_e5m2fnuz: return io::DType::F8_E5M2FNUZ;
    default:
      throw std::invalid_argument(std::string("cannot store a ") + c10::toString(type) +
                                  " tensor in safetensors");
  }
}

at::Tensor tensor_from_safetensors(const io::TensorInfo& info, const uint8_t* data) {
  at::Tensor t = at::empty(info.shape, at::TensorOptions().dtype(scalar_type_from(info.dtype)));
  if (info.nbytes) std::memcpy(t.data_ptr(), data, info.nbytes);
  return t;
}

at::Tensor tensor_from_weights(const io::ModelWeights& weights, const std::string& name) {
  return tensor_from_safetensors(weights.info(name), weights.data(name));
}


void writer_add(io::SafetensorsWriter& writer, const std::string& name, const at::Tensor& tensor) {
  const at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
  writer.add(name, dtype_from(t.scalar_type()), t.sizes().vec(), t.data_ptr(),
             static_cast<size_t>(t.numel()) * t.element_size());
}

}  // namespace qlora::quant
