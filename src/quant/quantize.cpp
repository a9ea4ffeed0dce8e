// quantize_4bit / dequantize_4bit on tensors: thin wrappers that validate, convert to fp32,
// call the kernels, and do bitsandbytes' double quantization of absmax:
//   offset = mean(absmax);  (absmax - offset) -> 8-bit dynamic map, blocks of 256.
#include "quant/quantize.h"

#include <ATen/ATen.h>

#include <cstring>
#include <stdexcept>

#include "dynamic_map.h"
#include "quant4_cpu.h"
#ifdef QLORA_HAVE_CUDA
#include "quant4_cuda.h"
#endif
#include "quant4_ref.h"

namespace qlora::quant {
namespace {

bool is_storage_dtype(at::ScalarType t) {
  return t == at::kByte || t == at::kBFloat16 || t == at::kHalf || t == at::kFloat;
}

// What the kernels decode with [16] fp32: FP4 code 8 is -0.0 (quant4_format.h says why).
at::Tensor decode_table(QuantType type) {
  return at::from_blob(const_cast<float*>(kernels::quant4_traits(type).code), {16},
                       at::TensorOptions().dtype(at::kFloat))
      .clone();
}

}  // namespace

at::Tensor code_table(QuantType type) {
  // bitsandbytes builds its quant_map from Python ints, where -0 is 0: every zero is +0.0.
  at::Tensor map = decode_table(type);
  float* v = map.data_ptr<float>();
  for (int i = 0; i < 16; ++i)
    if (v[i] == 0.0f) v[i] = 0.0f;
  return map;
}

at::Tensor nested_code_table() {
  return at::from_blob(const_cast<float*>(kernels::kDynamicMap8), {256},
                       at::TensorOptions().dtype(at::kFloat))
      .clone();
}

at::ScalarType storage_dtype_from_name(const std::string& name) {
  if (name == "uint8") return at::kByte;
  if (name == "bf16" || name == "bfloat16") return at::kBFloat16;
  if (name == "fp16" || name == "float16") return at::kHalf;
  if (name == "fp32" || name == "float32") return at::kFloat;
  throw std::invalid_argument("unsupported quant storage '" + name +
                              "' (expected uint8, bf16, fp16 or fp32)");
}

at::Tensor packed_bytes(const at::Tensor& packed) {
  return packed.contiguous().view(at::kByte).reshape({-1});
}

at::Tensor pack_storage(const at::Tensor& bytes, at::ScalarType storage) {
  if (!is_storage_dtype(storage))
    throw std::invalid_argument(std::string("unsupported quant storage dtype ") +
                                c10::toString(storage));
  const int64_t item = static_cast<int64_t>(c10::elementSize(storage));
  at::Tensor b = bytes.contiguous().view(at::kByte).reshape({-1});
  const int64_t padded = (b.numel() + item - 1) / item * item;
  if (padded != b.numel()) b = at::constant_pad_nd(b, {0, padded - b.numel()}, 0);
  return b.view(storage).reshape({padded / item, 1});
}

Quantized quantize_4bit(const at::Tensor& weight, const QuantizeOptions& options) {
  if (!kernels::valid_blocksize(options.blocksize))
    throw std::invalid_argument("unsupported quantization blocksize " +
                                std::to_string(options.blocksize) +
                                " (expected a power of two from 32 to 4096)");
  const at::ScalarType src = weight.scalar_type();
  if (src != at::kFloat && src != at::kBFloat16 && src != at::kHalf)
    throw std::invalid_argument(std::string("cannot quantize a ") + c10::toString(src) +
                                " tensor (expected float32, bfloat16 or float16)");
  const at::Tensor x = weight.detach().to(at::kCPU).contiguous().to(at::kFloat);  // exact
  const int64_t n = x.numel();
  const int64_t blocks = kernels::num_blocks(n, options.blocksize);

  at::Tensor bytes = at::empty({kernels::packed_nbytes(n)}, at::kByte);    // [(n+1)/2]
  at::Tensor absmax = at::empty({blocks}, at::kFloat);                     // [blocks]
  kernels::quantize_4bit_ref(x.data_ptr<float>(), n, options.blocksize, options.quant_type,
                             bytes.data_ptr<uint8_t>(), absmax.data_ptr<float>());

  Quantized out;
  QuantState& st = out.state;
  st.shape = weight.sizes().vec();
  st.blocksize = options.blocksize;
  st.quant_type = options.quant_type;
  st.dtype = src;
  st.code = code_table(options.quant_type);
  if (options.double_quant && blocks > 0) {
    // at::mean is the very reduction bitsandbytes calls (absmax.mean()), so the offset matches
    // to the bit; the subtraction too.
    const at::Tensor offset = absmax.mean();
    const at::Tensor centered = (absmax - offset).contiguous();
    const int64_t nested_blocks = kernels::num_blocks(blocks, kernels::kNestedBlocksize);
    at::Tensor q = at::empty({blocks}, at::kByte);
    at::Tensor nested_absmax = at::empty({nested_blocks}, at::kFloat);
    kernels::quantize_8bit_blockwise_ref(centered.data_ptr<float>(), blocks,
                                         kernels::kNestedBlocksize, kernels::kDynamicMap8,
                                         q.data_ptr<uint8_t>(), nested_absmax.data_ptr<float>());
    NestedState nested;
    nested.absmax = nested_absmax;
    nested.code = nested_code_table();
    nested.offset = offset.item<float>();
    st.absmax = q;
    st.nested = nested;
  } else {
    st.absmax = absmax;
  }
  out.packed = pack_storage(bytes, options.storage);
  return out;
}

at::Tensor dequantize_4bit(const at::Tensor& packed, const QuantState& state,
                           std::optional<at::ScalarType> dtype) {
  const at::ScalarType want = dtype.value_or(state.dtype);
  at::Tensor out = at::empty(state.shape, packed.options().dtype(want));
  dequantize_4bit_into(packed, state, out);
  return out;
}

namespace {

// One backend's pair of kernels (the *_ref signature): fp32 and bf16 output.
struct DequantizeKernels {
  void (*f32)(const uint8_t*, const float*, int64_t, int32_t, kernels::QuantType, float*);
  void (*bf16)(const uint8_t*, const float*, int64_t, int32_t, kernels::QuantType, uint16_t*);
};

// Runs `k` on tensors of out's device: bf16 and fp32 directly, fp16 (and others) through fp32,
// rounded once.
void dequantize_with(const DequantizeKernels& k, const at::Tensor& packed, const QuantState& state,
                     const at::Tensor& out) {
  const int64_t n = state.numel();
  const at::Tensor bytes = packed_bytes(packed);
  if (bytes.numel() < kernels::packed_nbytes(n))
    throw std::invalid_argument("packed weight has " + std::to_string(bytes.numel()) +
                                " bytes, shape needs " + std::to_string(kernels::packed_nbytes(n)));
  const at::Tensor absmax = state.absmax_fp32().to(out.device(), at::kFloat).contiguous();
  if (absmax.numel() < state.blocks())
    throw std::invalid_argument("absmax has " + std::to_string(absmax.numel()) +
                                " entries, the shape needs " + std::to_string(state.blocks()));
  const uint8_t* b = bytes.data_ptr<uint8_t>();
  const float* a = absmax.data_ptr<float>();
  if (out.scalar_type() == at::kBFloat16) {
    k.bf16(b, a, n, state.blocksize, state.quant_type, reinterpret_cast<uint16_t*>(out.data_ptr()));
  } else if (out.scalar_type() == at::kFloat) {
    k.f32(b, a, n, state.blocksize, state.quant_type, out.data_ptr<float>());
  } else {
    at::Tensor tmp = at::empty({n}, out.options().dtype(at::kFloat));
    k.f32(b, a, n, state.blocksize, state.quant_type, tmp.data_ptr<float>());
    out.view({n}).copy_(tmp);
  }
}

}  // namespace

void dequantize_4bit_into(const at::Tensor& packed, const QuantState& state, const at::Tensor& out) {
  const int64_t n = state.numel();
  if (!out.is_contiguous() || out.numel() != n || packed.device() != out.device())
    throw std::invalid_argument("dequantize_4bit_into: out must be a contiguous tensor of " +
                                std::to_string(n) + " elements on the packed weight's device (" +
                                packed.device().str() + "), not " + out.device().str());
  if (out.device().is_cpu()) {
    dequantize_with({kernels::dequantize_4bit_cpu, kernels::dequantize_4bit_bf16_cpu}, packed,
                    state, out);
  } else if (out.device().is_cuda()) {
    dequantize_4bit_into_cuda(packed, state, out);
  } else {  // any other device: libtorch ops (bit-identical to the CPU kernels)
    out.view({n}).copy_(dequantize_4bit_torch(packed, state, out.scalar_type()).reshape({n}));
  }
}

void dequantize_4bit_into_cuda(const at::Tensor& packed, const QuantState& state,
                               const at::Tensor& out) {
#ifdef QLORA_HAVE_CUDA
  // The CUDA kernels on the legacy default stream (where libtorch enqueues by default).
  const DequantizeKernels cuda{
      [](const uint8_t* p, const float* a, int64_t n, int32_t bs, kernels::QuantType t, float* o) {
        kernels::dequantize_4bit_cuda(p, a, n, bs, t, o);
      },
      [](const uint8_t* p, const float* a, int64_t n, int32_t bs, kernels::QuantType t,
         uint16_t* o) { kernels::dequantize_4bit_bf16_cuda(p, a, n, bs, t, o); }};
  dequantize_with(cuda, packed, state, out);
#else
  (void)packed;
  (void)state;
  throw std::invalid_argument("dequantize_4bit_into: out is on " + out.device().str() +
                              " but this build has no CUDA kernels (configured without nvcc)");
#endif
}

at::Tensor dequantize_4bit_torch(const at::Tensor& packed, const QuantState& state,
                                 std::optional<at::ScalarType> dtype) {
  const at::ScalarType want = dtype.value_or(state.dtype);
  const int64_t n = state.numel();
  const int64_t bs = state.blocksize;
  const int64_t blocks = state.blocks();
  const at::Tensor bytes = packed.contiguous().view(at::kByte).reshape({-1})
                               .slice(0, 0, kernels::packed_nbytes(n));
  // Unpack: first element in the high nibble.
  const at::Tensor codes =
      at::stack({at::bitwise_right_shift(bytes, 4), at::bitwise_and(bytes, 15)}, 1)
          .reshape({-1}).slice(0, 0, n).to(at::kLong);
  // The kernels' table, not state.code: bitsandbytes' kernels decode with their own tables too
  // (QuantState::validate checks that the quant_map agrees in value).
  const at::Tensor values = decode_table(state.quant_type).to(packed.device()).index({codes});
  const at::Tensor scales = state.absmax_fp32().to(packed.device()).view({blocks, 1});
  at::Tensor out = at::constant_pad_nd(values, {0, blocks * bs - n}).view({blocks, bs}) * scales;
  return out.reshape({-1}).slice(0, 0, n).reshape(state.shape).to(want);
}

}  // namespace qlora::quant
