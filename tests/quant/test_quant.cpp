// quant unit tests, our own invariants (bitsandbytes equality is tests/reference's job):
//   round trip  |w - code[q] * absmax| <= absmax * max_gap(code) / 2   per element, every block;
//   storage     the packed bytes are the same for uint8/bf16/fp16/fp32 storage, zero-padded;
//   dequantize  the CPU kernel path == dequantize_4bit_torch, bit for bit;
//   double quant  absmax_fp32() is within one nearest-code distance of the plain absmax;
//   and the std::invalid_argument errors of quantize_4bit and QuantState::validate.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "dynamic_map.h"
#include "quant/quantize.h"

#include "expect_error.h"

namespace qlora::quant {
namespace {

constexpr uint64_t kSeed = 20240607;

// Quantize computes x * (1 / absmax) and dequantize code * absmax in fp32: two roundings of
// relative size FLT_EPSILON / 2 each, plus the bucket bounds being fp32 midpoints. Four epsilons
// of absmax cover them with room to spare.
constexpr double kRoundingSlack = 4 * FLT_EPSILON;

std::string shape_str(at::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// N(0, 1) weights with a few outliers and exact zeros, so blocks have varied absmax.
at::Tensor weight_make(std::vector<int64_t> shape, at::ScalarType dtype, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::Tensor w = at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat));
  at::Tensor flat = w.view({-1});
  const int64_t n = flat.numel();
  for (int64_t i = 0; i < n; i += 97) flat[i] = 0.0f;
  for (int64_t i = 13; i < n; i += 331) flat[i] = flat[i] * 40.0f;
  return w.to(dtype);
}

// Half the largest distance between neighbouring values of the format's code table.
double code_half_gap_max(QuantType type) {
  const float* code = kernels::quant4_traits(type).code;
  std::vector<float> sorted(code, code + 16);
  std::sort(sorted.begin(), sorted.end());
  double gap = 0.0;
  for (int i = 0; i + 1 < 16; ++i) gap = std::max(gap, double(sorted[i + 1]) - sorted[i]);
  return gap / 2;
}

// Exact equality of dtype, shape and every bit; prints the first differing element.
::testing::AssertionResult bits_equal(const at::Tensor& got, const at::Tensor& want) {
  if (got.scalar_type() != want.scalar_type())
    return ::testing::AssertionFailure() << "dtype " << got.scalar_type() << " vs "
                                         << want.scalar_type();
  if (got.sizes() != want.sizes())
    return ::testing::AssertionFailure() << "shape " << shape_str(got.sizes()) << " vs "
                                         << shape_str(want.sizes());
  const at::Tensor a = got.contiguous(), b = want.contiguous();
  const size_t item = a.element_size();
  const auto* pa = static_cast<const uint8_t*>(a.data_ptr());
  const auto* pb = static_cast<const uint8_t*>(b.data_ptr());
  for (int64_t i = 0; i < a.numel(); ++i) {
    if (std::memcmp(pa + i * item, pb + i * item, item) != 0)
      return ::testing::AssertionFailure()
             << "element " << i << " of " << a.numel() << ": " << a.view({-1})[i].item<double>()
             << " vs " << b.view({-1})[i].item<double>();
  }
  return ::testing::AssertionSuccess();
}

using qlora::testing::contains;
using qlora::testing::invalid_argument_message;

const std::vector<std::vector<int64_t>> kShapes = {
    {1}, {2}, {7}, {31}, {33}, {64}, {65}, {5, 13}, {64, 96}, {3, 1001}, {256 * 64 + 3}, {3, 5, 7}};
const std::vector<int32_t> kBlocksizes = {32, 64, 128, 256, 1024, 4096};
const QuantType kTypes[] = {QuantType::nf4, QuantType::fp4};

// ------------------------------------------------------------------------------------------
// Round trip

TEST(Quantize, RoundTripErrorWithinHalfCodeGap) {
  const at::ScalarType dtypes[] = {at::kFloat, at::kBFloat16, at::kHalf};
  int cases = 0;
  for (QuantType type : kTypes)
    for (at::ScalarType dtype : dtypes)
      for (int32_t bs : kBlocksizes)
        for (const auto& shape : kShapes) {
          SCOPED_TRACE(std::string(quant_type_name(type)) + " " + c10::toString(dtype) +
                       " blocksize " + std::to_string(bs) + " shape " + shape_str(shape));
          const at::Tensor w = weight_make(shape, dtype, kSeed + cases++);
          QuantizeOptions opt;
          opt.blocksize = bs;
          opt.quant_type = type;
          const Quantized q = quantize_4bit(w, opt);
          ASSERT_NO_THROW(q.state.validate("round trip"));
          EXPECT_EQ(q.state.shape, shape);
          EXPECT_EQ(q.state.dtype, dtype);

          const at::Tensor deq_default = dequantize_4bit(q.packed, q.state);
          EXPECT_EQ(deq_default.scalar_type(), dtype);
          EXPECT_EQ(deq_default.sizes(), w.sizes());

          const at::Tensor x = w.to(at::kFloat).contiguous().view({-1});
          const at::Tensor deq = dequantize_4bit(q.packed, q.state, at::kFloat).contiguous().view({-1});
          const at::Tensor absmax = q.state.absmax;
          const float* px = x.data_ptr<float>();
          const float* pd = deq.data_ptr<float>();
          const float* pa = absmax.data_ptr<float>();
          const double half_gap = code_half_gap_max(type);
          const int64_t n = x.numel();
          for (int64_t b = 0; b < q.state.blocks(); ++b) {
            // absmax is the block's max |w|; a partial last block stores it floored at 1e-38.
            float am = 0.0f;
            for (int64_t i = b * bs; i < std::min<int64_t>(n, (b + 1) * bs); ++i)
              am = std::max(am, std::fabs(px[i]));
            const bool full = (b + 1) * bs <= n;
            ASSERT_EQ(pa[b], full ? am : std::max(am, kernels::kAbsmaxFloor)) << "block " << b;
          }
          for (int64_t i = 0; i < n; ++i) {
            const double a = pa[i / bs];
            const double bound = a * half_gap + a * kRoundingSlack;
            ASSERT_LE(std::fabs(double(px[i]) - pd[i]), bound)
                << "element " << i << " w " << px[i] << " deq " << pd[i] << " absmax " << a;
          }
        }
  EXPECT_EQ(cases, 2 * 3 * 6 * 12);
}

TEST(Quantize, RoundTripWithDoubleQuantAddsOnlyTheAbsmaxError) {
  for (QuantType type : kTypes)
    for (int32_t bs : {32, 64, 256})
      for (const std::vector<int64_t>& shape :
           std::vector<std::vector<int64_t>>{{1001}, {64, 96}, {300 * 64 + 5}}) {
        SCOPED_TRACE(std::string(quant_type_name(type)) + " blocksize " + std::to_string(bs) +
                     " shape " + shape_str(shape));
        const at::Tensor w = weight_make(shape, at::kFloat, kSeed + bs);
        QuantizeOptions opt;
        opt.blocksize = bs;
        opt.quant_type = type;
        const Quantized plain = quantize_4bit(w, opt);
        opt.double_quant = true;
        const Quantized dq = quantize_4bit(w, opt);
        // The codes do not depend on double quantization, only the scales do.
        ASSERT_TRUE(bits_equal(packed_bytes(dq.packed), packed_bytes(plain.packed)));
        const at::Tensor x = w.contiguous().view({-1});
        const at::Tensor deq = dequantize_4bit(dq.packed, dq.state).view({-1});
        const at::Tensor a_plain = plain.state.absmax, a_dq = dq.state.absmax_fp32();
        const double half_gap = code_half_gap_max(type);
        for (int64_t i = 0; i < x.numel(); ++i) {
          const double a = a_plain[i / bs].item<float>();
          const double da = std::fabs(a - a_dq[i / bs].item<float>());
          const double bound = a * half_gap + da + (a + da) * kRoundingSlack;
          ASSERT_LE(std::fabs(x[i].item<float>() - deq[i].item<float>()), bound) << "element " << i;
        }
      }
}

TEST(Quantize, EmptyTensor) {
  const at::Tensor w = at::empty({0, 8}, at::TensorOptions().dtype(at::kFloat));
  for (bool dq : {false, true}) {
    QuantizeOptions opt;
    opt.double_quant = dq;
    const Quantized q = quantize_4bit(w, opt);
    EXPECT_EQ(q.state.blocks(), 0);
    EXPECT_EQ(packed_bytes(q.packed).numel(), 0);
    EXPECT_EQ(dequantize_4bit(q.packed, q.state).sizes(), w.sizes());
    EXPECT_EQ(dequantize_4bit_torch(q.packed, q.state).sizes(), w.sizes());
  }
}

// ------------------------------------------------------------------------------------------
// Storage dtypes

TEST(QuantStorage, SameBytesForEveryStorageDtype) {
  const at::ScalarType storages[] = {at::kByte, at::kBFloat16, at::kHalf, at::kFloat};
  for (QuantType type : kTypes)
    for (int64_t n : {1, 2, 3, 4, 5, 7, 8, 9, 63, 64, 65, 1001, 4099}) {
      const at::Tensor w = weight_make({n}, at::kFloat, kSeed + n);
      QuantizeOptions opt;
      opt.quant_type = type;
      opt.blocksize = 32;
      const Quantized base = quantize_4bit(w, opt);
      const at::Tensor want = packed_bytes(base.packed);
      const int64_t nbytes = (n + 1) / 2;
      ASSERT_EQ(want.numel(), nbytes);
      ASSERT_EQ(base.packed.sizes(), (std::vector<int64_t>{nbytes, 1}));
      if (n % 2 == 1) {  // the odd element's partner nibble is the code of 0.0
        const uint8_t zero_code = type == QuantType::nf4 ? 7 : 0;
        EXPECT_EQ(want[nbytes - 1].item<uint8_t>() & 0x0f, zero_code) << "numel " << n;
      }
      for (at::ScalarType storage : storages) {
        SCOPED_TRACE(std::string(quant_type_name(type)) + " numel " + std::to_string(n) +
                     " storage " + c10::toString(storage));
        opt.storage = storage;
        const Quantized q = quantize_4bit(w, opt);
        const int64_t item = static_cast<int64_t>(c10::elementSize(storage));
        const int64_t padded = (nbytes + item - 1) / item * item;
        EXPECT_EQ(q.packed.scalar_type(), storage);
        EXPECT_EQ(q.packed.sizes(), (std::vector<int64_t>{padded / item, 1}));
        const at::Tensor got = packed_bytes(q.packed);
        ASSERT_EQ(got.numel(), padded);
        EXPECT_TRUE(bits_equal(got.slice(0, 0, nbytes), want));
        for (int64_t i = nbytes; i < padded; ++i)
          EXPECT_EQ(got[i].item<uint8_t>(), 0) << "padding byte " << i;
        EXPECT_TRUE(bits_equal(q.state.absmax, base.state.absmax));
        // The storage changes nothing about what comes back.
        EXPECT_TRUE(bits_equal(dequantize_4bit(q.packed, q.state),
                               dequantize_4bit(base.packed, base.state)));
        // pack_storage is the same rule applied to bare bytes.
        EXPECT_TRUE(bits_equal(pack_storage(want, storage), q.packed));
      }
    }
}

TEST(QuantStorage, DtypeNames) {
  EXPECT_EQ(storage_dtype_from_name("uint8"), at::kByte);
  EXPECT_EQ(storage_dtype_from_name("bf16"), at::kBFloat16);
  EXPECT_EQ(storage_dtype_from_name("bfloat16"), at::kBFloat16);
  EXPECT_EQ(storage_dtype_from_name("fp16"), at::kHalf);
  EXPECT_EQ(storage_dtype_from_name("float16"), at::kHalf);
  EXPECT_EQ(storage_dtype_from_name("fp32"), at::kFloat);
  EXPECT_EQ(storage_dtype_from_name("float32"), at::kFloat);
  for (const char* bad : {"int8", "int32", "UINT8", "", "fp8"}) {
    const std::string msg = invalid_argument_message([&] { storage_dtype_from_name(bad); });
    EXPECT_TRUE(contains(msg, std::string("'") + bad + "'")) << msg;
    EXPECT_TRUE(contains(msg, "uint8, bf16, fp16 or fp32")) << msg;
  }
  const std::string msg = invalid_argument_message(
      [] { pack_storage(at::zeros({4}, at::TensorOptions().dtype(at::kByte)), at::kInt); });
  EXPECT_TRUE(contains(msg, "Int")) << msg;
}

// ------------------------------------------------------------------------------------------
// Kernel path == torch path

TEST(Dequantize, KernelPathEqualsTorchPathBitExact) {
  const at::ScalarType outs[] = {at::kFloat, at::kBFloat16, at::kHalf};
  int cases = 0;
  for (QuantType type : kTypes)
    for (bool dq : {false, true})
      for (int32_t bs : kBlocksizes)
        for (const auto& shape : kShapes) {
          const at::Tensor w = weight_make(shape, at::kBFloat16, kSeed + 7 * cases);
          QuantizeOptions opt;
          opt.blocksize = bs;
          opt.quant_type = type;
          opt.double_quant = dq;
          opt.storage = cases % 3 == 0 ? at::kBFloat16 : at::kByte;
          const Quantized q = quantize_4bit(w, opt);
          for (at::ScalarType out : outs) {
            SCOPED_TRACE(std::string(quant_type_name(type)) + (dq ? " double-quant" : "") +
                         " blocksize " + std::to_string(bs) + " shape " + shape_str(shape) +
                         " out " + c10::toString(out) + " storage " +
                         c10::toString(opt.storage));
            EXPECT_TRUE(bits_equal(dequantize_4bit(q.packed, q.state, out),
                                   dequantize_4bit_torch(q.packed, q.state, out)));
            ++cases;
          }
        }
  EXPECT_EQ(cases, 2 * 2 * 6 * 12 * 3);
}

TEST(Dequantize, TooFewPackedBytesThrows) {
  const at::Tensor w = weight_make({100}, at::kFloat, kSeed);
  const Quantized q = quantize_4bit(w, QuantizeOptions{});
  const std::string msg = invalid_argument_message(
      [&] { dequantize_4bit(q.packed.slice(0, 0, 49), q.state); });
  EXPECT_TRUE(contains(msg, "49 bytes")) << msg;
  EXPECT_TRUE(contains(msg, "50")) << msg;
}

// ------------------------------------------------------------------------------------------
// Double quantization

// Distance from v to the nearest entry of the (256-entry) dynamic map.
double dynamic_map_distance(double v) {
  double best = INFINITY;
  for (float c : kernels::kDynamicMap8) best = std::min(best, std::fabs(v - c));
  return best;
}

TEST(DoubleQuant, AbsmaxWithinOneEightBitStep) {
  for (QuantType type : kTypes)
    for (int32_t bs : {32, 64, 4096})
      for (int64_t n : {int64_t{1}, int64_t{100}, int64_t{64 * 256}, int64_t{64 * 256 + 1},
                        int64_t{64 * 600 + 17}}) {
        SCOPED_TRACE(std::string(quant_type_name(type)) + " blocksize " + std::to_string(bs) +
                     " numel " + std::to_string(n));
        const at::Tensor w = weight_make({n}, at::kFloat, kSeed + n + bs);
        QuantizeOptions opt;
        opt.blocksize = bs;
        opt.quant_type = type;
        const Quantized plain = quantize_4bit(w, opt);
        opt.double_quant = true;
        const Quantized dq = quantize_4bit(w, opt);
        ASSERT_TRUE(dq.state.is_nested());
        ASSERT_NO_THROW(dq.state.validate("double quant"));
        const int64_t blocks = dq.state.blocks();
        EXPECT_EQ(dq.state.absmax.scalar_type(), at::kByte);
        EXPECT_EQ(dq.state.absmax.numel(), blocks);
        EXPECT_EQ(dq.state.nested->blocksize, 256);
        EXPECT_EQ(dq.state.nested->absmax.numel(), (blocks + 255) / 256);
        // offset is the mean of the plain absmax (up to the order of the fp32 reduction).
        EXPECT_NEAR(dq.state.nested->offset, plain.state.absmax.to(at::kDouble).mean().item<double>(),
                    1e-5 * plain.state.absmax.max().item<float>());

        const at::Tensor a = plain.state.absmax;
        const at::Tensor got = dq.state.absmax_fp32();
        ASSERT_EQ(got.scalar_type(), at::kFloat);
        ASSERT_EQ(got.numel(), blocks);
        const double offset = dq.state.nested->offset;
        for (int64_t b = 0; b < blocks; ++b) {
          const double ab = a[b].item<float>();
          const double nabs = dq.state.nested->absmax[b / 256].item<float>();
          const double scaled = nabs > 0 ? (ab - offset) / nabs : 0.0;
          const double bound =
              nabs * dynamic_map_distance(scaled) + (std::fabs(ab) + std::fabs(offset)) * kRoundingSlack;
          EXPECT_LE(std::fabs(got[b].item<float>() - ab), bound)
              << "block " << b << " absmax " << ab << " nested_absmax " << nabs;
        }
      }
}

// ------------------------------------------------------------------------------------------
// QuantState::validate

QuantState state_make(bool nested, QuantType type = QuantType::nf4) {
  QuantizeOptions opt;
  opt.double_quant = nested;
  opt.quant_type = type;
  return quantize_4bit(weight_make({64, 96}, at::kFloat, kSeed), opt).state;
}

void expect_validate_error(const QuantState& st, const std::string& what) {
  const std::string where = "model.layers.3.mlp.up_proj.weight";
  const std::string msg = invalid_argument_message([&] { st.validate(where); });
  EXPECT_EQ(msg.rfind(where + ": ", 0), 0u) << msg;
  EXPECT_TRUE(contains(msg, what)) << "expected '" << what << "' in: " << msg;
}

TEST(QuantStateValidate, ValidStatesPass) {
  for (bool nested : {false, true})
    for (QuantType type : kTypes) EXPECT_NO_THROW(state_make(nested, type).validate("ok"));
}

TEST(QuantStateValidate, AbsmaxCountMismatch) {
  for (bool nested : {false, true}) {
    QuantState st = state_make(nested);
    st.absmax = st.absmax.slice(0, 0, 95);
    expect_validate_error(st, "absmax has 95 entries");
    expect_validate_error(st, "need 96");
    st.absmax = at::Tensor();
    expect_validate_error(st, "absmax has no entries");
  }
  QuantState st = state_make(false);
  st.shape = {64, 97};  // 6208 elements: 97 blocks of 64
  expect_validate_error(st, "need 97");
}

TEST(QuantStateValidate, WrongDtypes) {
  QuantState st = state_make(false);
  st.absmax = st.absmax.to(at::kDouble);
  expect_validate_error(st, "absmax must be float32");

  st = state_make(true);
  st.absmax = st.absmax.to(at::kFloat);
  expect_validate_error(st, "double-quantized absmax must be uint8");

  st = state_make(false);
  st.code = st.code.to(at::kDouble);
  expect_validate_error(st, "quant_map must be float32 [16]");

  st = state_make(true);
  st.nested->absmax = st.nested->absmax.to(at::kHalf);
  expect_validate_error(st, "nested_absmax must be float32 [1]");

  st = state_make(true);
  st.nested->code = st.nested->code.to(at::kDouble);
  expect_validate_error(st, "nested_quant_map must be float32 [256]");
}

TEST(QuantStateValidate, BadQuantMap) {
  QuantState st = state_make(false);
  st.code = st.code.slice(0, 0, 15);
  expect_validate_error(st, "quant_map must be float32 [16]");

  // An fp4 state carrying the nf4 table: the kernels would ignore it, so it is an error.
  st = state_make(false, QuantType::fp4);
  st.code = state_make(false, QuantType::nf4).code;
  expect_validate_error(st, "quant_map differs from bitsandbytes' fp4 table at index 0");

  st = state_make(false);
  st.code = st.code.clone();
  st.code[9] = 0.25f;
  expect_validate_error(st, "nf4 table at index 9");

  st = state_make(true);
  st.nested->code = st.nested->code.slice(0, 0, 255);
  expect_validate_error(st, "nested_quant_map must be float32 [256]");
}

TEST(QuantStateValidate, BadBlocksize) {
  for (int32_t bs : {0, -64, 16, 48, 100, 8192}) {
    QuantState st = state_make(false);
    st.blocksize = bs;
    expect_validate_error(st, "blocksize " + std::to_string(bs) + " is not a power of two");
  }
  for (int32_t bs : {0, -256}) {
    QuantState st = state_make(true);
    st.nested->blocksize = bs;
    expect_validate_error(st, "nested_blocksize must be positive");
  }
  QuantState st = state_make(true);
  st.nested->absmax = at::zeros({2}, at::TensorOptions().dtype(at::kFloat));
  expect_validate_error(st, "nested_absmax must be float32 [1]");
  st = state_make(false);
  st.shape = {-64, -96};
  expect_validate_error(st, "negative dimension");
}

// ------------------------------------------------------------------------------------------
// quantize_4bit errors

TEST(QuantizeErrors, UnsupportedBlocksize) {
  const at::Tensor w = weight_make({256}, at::kFloat, kSeed);
  for (int32_t bs : {0, -64, 16, 48, 96, 8192}) {
    QuantizeOptions opt;
    opt.blocksize = bs;
    const std::string msg = invalid_argument_message([&] { quantize_4bit(w, opt); });
    EXPECT_TRUE(contains(msg, "blocksize " + std::to_string(bs) + " ")) << msg;
    EXPECT_TRUE(contains(msg, "32 to 4096")) << msg;
  }
}

TEST(QuantizeErrors, UnsupportedInputDtype) {
  for (at::ScalarType t : {at::kInt, at::kLong, at::kByte, at::kBool, at::kDouble}) {
    const at::Tensor w = at::zeros({64}, at::TensorOptions().dtype(t));
    const std::string msg = invalid_argument_message([&] { quantize_4bit(w, QuantizeOptions{}); });
    EXPECT_TRUE(contains(msg, std::string("cannot quantize a ") + c10::toString(t))) << msg;
    EXPECT_TRUE(contains(msg, "float32, bfloat16 or float16")) << msg;
  }
}

TEST(QuantizeErrors, UnsupportedStorage) {
  const at::Tensor w = weight_make({256}, at::kFloat, kSeed);
  for (at::ScalarType t : {at::kInt, at::kChar, at::kDouble, at::kLong}) {
    QuantizeOptions opt;
    opt.storage = t;
    const std::string msg = invalid_argument_message([&] { quantize_4bit(w, opt); });
    EXPECT_TRUE(contains(msg, std::string("unsupported quant storage dtype ") + c10::toString(t)))
        << msg;
  }
}

TEST(QuantNames, TypesAndDtypes) {
  EXPECT_EQ(quant_type_from_name("nf4"), QuantType::nf4);
  EXPECT_EQ(quant_type_from_name("fp4"), QuantType::fp4);
  EXPECT_STREQ(quant_type_name(QuantType::nf4), "nf4");
  EXPECT_STREQ(quant_type_name(QuantType::fp4), "fp4");
  for (const char* bad : {"int4", "NF4", "", "nf8"}) {
    const std::string msg = invalid_argument_message([&] { quant_type_from_name(bad); });
    EXPECT_TRUE(contains(msg, std::string("'") + bad + "'")) << msg;
    EXPECT_TRUE(contains(msg, "nf4 or fp4")) << msg;
  }
  for (at::ScalarType t : {at::kFloat, at::kBFloat16, at::kHalf})
    EXPECT_EQ(float_dtype_from_name(float_dtype_name(t)), t);
  EXPECT_TRUE(contains(invalid_argument_message([] { float_dtype_from_name("float64"); }),
                       "'float64'"));
  EXPECT_TRUE(contains(invalid_argument_message([] { float_dtype_name(at::kDouble); }), "Double"));
}

}  // namespace
}  // namespace qlora::quant
