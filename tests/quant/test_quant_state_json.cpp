// The checkpoint side of quant: python_float_repr against CPython's repr, the quant_state JSON
// text (exactly what json.dumps writes) and its parser's errors, and bitsandbytes' per-weight
// tensor set (names, dtypes, shapes) read back through bnb_read_quantized with its cross-checks.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "quant/bnb_checkpoint.h"
#include "quant/quantize.h"

#include "expect_error.h"

namespace qlora::quant {
namespace {

using qlora::testing::contains;
using qlora::testing::invalid_argument_message;

bool tensors_identical(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  const at::Tensor x = a.contiguous(), y = b.contiguous();
  return std::memcmp(x.data_ptr(), y.data_ptr(), x.numel() * x.element_size()) == 0;
}

// ------------------------------------------------------------------------------------------
// python_float_repr

TEST(PythonFloatRepr, MatchesCPythonRepr) {
  // Every expected string was printed by CPython 3 (/work/main/.venv/bin/python -c
  // 'print(repr(x))'); the float32 rows are float(np.float32(x)), i.e. the float32 widened to a
  // double as quant_state_json does with nested_offset.
  const std::vector<std::pair<double, std::string>> table = {
      {0.1, "0.1"},
      {1e-05, "1e-05"},
      {0.0001, "0.0001"},
      {0.00012345, "0.00012345"},
      {9.999999999999999e-05, "9.999999999999999e-05"},
      {123456789.0, "123456789.0"},
      {1e15, "1000000000000000.0"},
      {9999999999999998.0, "9999999999999998.0"},
      {1e16, "1e+16"},
      {1e22, "1e+22"},
      {1.2345678901234567e19, "1.2345678901234567e+19"},
      {1e100, "1e+100"},
      {1.5e300, "1.5e+300"},
      {1.7976931348623157e308, "1.7976931348623157e+308"},
      {1.5e-10, "1.5e-10"},
      {-1e-07, "-1e-07"},
      {2.2250738585072014e-308, "2.2250738585072014e-308"},
      {5e-324, "5e-324"},
      {-2.5, "-2.5"},
      {0.0, "0.0"},
      {-0.0, "-0.0"},
      {1.0, "1.0"},
      {0.5, "0.5"},
      {100.0, "100.0"},
      {65504.0, "65504.0"},
      {1234.5678, "1234.5678"},
      {-0.00099, "-0.00099"},
      {0.3, "0.3"},
      {2.0 / 3.0, "0.6666666666666666"},
      {static_cast<double>(0.05307142809033394f), "0.05307142809033394"},
      {static_cast<double>(0.1f), "0.10000000149011612"},
      {static_cast<double>(1e-5f), "9.999999747378752e-06"},
      {static_cast<double>(0.02f), "0.019999999552965164"},
      {static_cast<double>(-3.4028234663852886e+38f), "-3.4028234663852886e+38"},
  };
  for (const auto& [value, want] : table)
    EXPECT_EQ(python_float_repr(value), want) << "value " << std::hexfloat << value;
  // json.dumps spells the non-finite values this way (allow_nan=True, its default).
  EXPECT_EQ(python_float_repr(NAN), "NaN");
  EXPECT_EQ(python_float_repr(INFINITY), "Infinity");
  EXPECT_EQ(python_float_repr(-INFINITY), "-Infinity");
}

// ------------------------------------------------------------------------------------------
// quant_state JSON

QuantState nested_state_64x96() {
  QuantState st;
  st.shape = {64, 96};
  st.blocksize = 64;
  st.quant_type = QuantType::nf4;
  st.dtype = at::kFloat;
  NestedState n;
  n.offset = 0.05307142809033394f;
  st.nested = n;
  return st;
}

TEST(QuantStateJson, ExactTextAsJsonDumps) {
  // The strings are Python's json.dumps of the same dicts.
  EXPECT_EQ(quant_state_json(nested_state_64x96()),
            "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": "
            "[64, 96], \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", "
            "\"nested_offset\": 0.05307142809033394}");

  QuantState plain;
  plain.shape = {7};
  plain.blocksize = 128;
  plain.quant_type = QuantType::fp4;
  plain.dtype = at::kBFloat16;
  EXPECT_EQ(quant_state_json(plain),
            "{\"quant_type\": \"fp4\", \"blocksize\": 128, \"dtype\": \"bfloat16\", \"shape\": [7]}");

  QuantState st;
  st.shape = {3, 5, 7};
  st.blocksize = 4096;
  st.dtype = at::kHalf;
  st.nested = NestedState{};
  st.nested->offset = static_cast<float>(-1.5e-10);
  // float32(-1.5e-10) widened; CPython: repr(float(np.float32(-1.5e-10)))
  EXPECT_EQ(quant_state_json(st),
            "{\"quant_type\": \"nf4\", \"blocksize\": 4096, \"dtype\": \"float16\", \"shape\": "
            "[3, 5, 7], \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", "
            "\"nested_offset\": " + python_float_repr(static_cast<float>(-1.5e-10)) + "}");
}

TEST(QuantStateJson, RoundTrip) {
  std::vector<QuantState> states;
  states.push_back(nested_state_64x96());
  QuantState plain;
  plain.shape = {1, 2049};
  plain.blocksize = 32;
  plain.quant_type = QuantType::fp4;
  plain.dtype = at::kHalf;
  states.push_back(plain);
  QuantState odd = nested_state_64x96();
  odd.shape = {};
  odd.nested->offset = -1.0e-30f;
  odd.nested->blocksize = 128;
  states.push_back(odd);
  for (const QuantState& st : states) {
    const std::string json = quant_state_json(st);
    SCOPED_TRACE(json);
    const QuantState back = quant_state_from_json(json, "w.quant_state.bitsandbytes__nf4");
    EXPECT_EQ(back.shape, st.shape);
    EXPECT_EQ(back.blocksize, st.blocksize);
    EXPECT_EQ(back.quant_type, st.quant_type);
    EXPECT_EQ(back.dtype, st.dtype);
    ASSERT_EQ(back.is_nested(), st.is_nested());
    if (st.nested) {
      EXPECT_EQ(back.nested->blocksize, st.nested->blocksize);
      // float -> shortest double repr -> double -> float is exact.
      EXPECT_EQ(back.nested->offset, st.nested->offset);
    }
    EXPECT_FALSE(back.absmax.defined());
    EXPECT_EQ(quant_state_json(back), json);
  }
}

TEST(QuantStateJson, MalformedThrowsNamingWhere) {
  const std::string where = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4";
  const std::string good_tail = "\"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [64, 96]";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"", "not a JSON object"},
      {"not json", "not a JSON object"},
      {"{\"quant_type\": \"nf4\", ", "not a JSON object"},
      {"[1, 2]", "not a JSON object"},
      {"\"nf4\"", "not a JSON object"},
      {"{" + good_tail + "}", "quant_type"},
      {"{\"quant_type\": \"nf4\", \"dtype\": \"float32\", \"shape\": [64, 96]}", "blocksize"},
      {"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"shape\": [64, 96]}", "dtype"},
      {"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\"}", "shape"},
      {"{\"quant_type\": \"int4\", " + good_tail + "}", "unsupported quantization type 'int4'"},
      {"{\"quant_type\": 4, " + good_tail + "}", "quant_state JSON"},
      {"{\"quant_type\": \"nf4\", \"blocksize\": \"64\", \"dtype\": \"float32\", \"shape\": [1]}",
       "quant_state JSON"},
      {"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float64\", \"shape\": [1]}",
       "unsupported float dtype 'float64'"},
      {"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": \"[1]\"}",
       "quant_state JSON"},
      {"{\"quant_type\": \"nf4\", " + good_tail + ", \"nested_blocksize\": 256}", "nested_offset"},
      {"{\"quant_type\": \"nf4\", " + good_tail + ", \"nested_offset\": 0.5}", "nested_blocksize"},
      {"{\"quant_type\": \"nf4\", " + good_tail +
           ", \"nested_blocksize\": 256, \"nested_dtype\": \"float16\", \"nested_offset\": 0.5}",
       "nested_dtype must be float32"},
  };
  for (const auto& [json, what] : cases) {
    const std::string msg = invalid_argument_message([&] { quant_state_from_json(json, where); });
    EXPECT_EQ(msg.rfind(where + ": ", 0), 0u) << "json: " << json << "\nmessage: " << msg;
    EXPECT_TRUE(contains(msg, what)) << "json: " << json << "\nexpected '" << what
                                     << "' in: " << msg;
  }
}

// ------------------------------------------------------------------------------------------
// bitsandbytes tensor set

const std::string kWeight = "model.layers.1.self_attn.v_proj.weight";

Quantized quantized_make(bool nested, QuantType type, at::ScalarType storage,
                         std::vector<int64_t> shape = {64, 96}) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(17);
  QuantizeOptions opt;
  opt.double_quant = nested;
  opt.quant_type = type;
  opt.storage = storage;
  return quantize_4bit(at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat)), opt);
}

std::map<std::string, at::Tensor> tensor_map(const std::vector<std::pair<std::string, at::Tensor>>& v) {
  return std::map<std::string, at::Tensor>(v.begin(), v.end());
}

TensorLookup lookup(const std::map<std::string, at::Tensor>& m) {
  return [&m](const std::string& name) -> std::optional<at::Tensor> {
    const auto it = m.find(name);
    if (it == m.end()) return std::nullopt;
    return it->second;
  };
}

at::Tensor json_tensor(const std::string& json) {
  at::Tensor t = at::empty({static_cast<int64_t>(json.size())}, at::kByte);
  std::memcpy(t.data_ptr(), json.data(), json.size());
  return t;
}

TEST(BnbCheckpoint, TensorNamesDtypesShapes) {
  const at::ScalarType storages[] = {at::kByte, at::kBFloat16, at::kHalf, at::kFloat};
  for (bool nested : {false, true})
    for (QuantType type : {QuantType::nf4, QuantType::fp4})
      for (at::ScalarType storage : storages) {
        const std::vector<int64_t> shape = {300, 65};  // 19500 elements: 305 blocks, 2 nested
        const Quantized q = quantized_make(nested, type, storage, shape);
        const std::string tn = quant_type_name(type);
        SCOPED_TRACE(tn + (nested ? " nested" : "") + " storage " + c10::toString(storage));
        const auto tensors = bnb_checkpoint_tensors(kWeight, q);
        std::vector<std::string> names;
        for (const auto& [name, t] : tensors) names.push_back(name);
        std::vector<std::string> want = {kWeight, kWeight + ".absmax", kWeight + ".quant_map"};
        if (nested) {
          want.push_back(kWeight + ".nested_absmax");
          want.push_back(kWeight + ".nested_quant_map");
        }
        want.push_back(kWeight + ".quant_state.bitsandbytes__" + tn);
        ASSERT_EQ(names, want);

        const int64_t item = static_cast<int64_t>(c10::elementSize(storage));
        const int64_t nbytes = (19500 / 2 + item - 1) / item * item;
        auto m = tensor_map(tensors);
        EXPECT_EQ(m[kWeight].scalar_type(), storage);
        EXPECT_EQ(m[kWeight].sizes(), (std::vector<int64_t>{nbytes / item, 1}));
        EXPECT_EQ(m[kWeight + ".absmax"].scalar_type(), nested ? at::kByte : at::kFloat);
        EXPECT_EQ(m[kWeight + ".absmax"].sizes(), (std::vector<int64_t>{305}));
        EXPECT_EQ(m[kWeight + ".quant_map"].scalar_type(), at::kFloat);
        EXPECT_EQ(m[kWeight + ".quant_map"].sizes(), (std::vector<int64_t>{16}));
        if (nested) {
          EXPECT_EQ(m[kWeight + ".nested_absmax"].scalar_type(), at::kFloat);
          EXPECT_EQ(m[kWeight + ".nested_absmax"].sizes(), (std::vector<int64_t>{2}));
          EXPECT_EQ(m[kWeight + ".nested_quant_map"].scalar_type(), at::kFloat);
          EXPECT_EQ(m[kWeight + ".nested_quant_map"].sizes(), (std::vector<int64_t>{256}));
        }
        const at::Tensor js = m[kWeight + ".quant_state.bitsandbytes__" + tn];
        EXPECT_EQ(js.scalar_type(), at::kByte);
        EXPECT_EQ(js.dim(), 1);
        EXPECT_EQ(std::string(static_cast<const char*>(js.data_ptr()), js.numel()),
                  quant_state_json(q.state));

        for (const auto& [name, t] : tensors) {
          EXPECT_EQ(bnb_is_state_tensor(name), name != kWeight) << name;
        }
        EXPECT_EQ(bnb_quant_state_key(kWeight, [&](const std::string& k) { return m.count(k) > 0; }),
                  kWeight + ".quant_state.bitsandbytes__" + tn);
        EXPECT_EQ(bnb_quant_state_key("lm_head.weight",
                                      [&](const std::string& k) { return m.count(k) > 0; }),
                  "");
      }
  EXPECT_FALSE(bnb_is_state_tensor("model.layers.0.mlp.up_proj.weight"));
  EXPECT_FALSE(bnb_is_state_tensor("model.norm.weight"));
}

TEST(BnbCheckpoint, ReadRoundTrip) {
  for (bool nested : {false, true})
    for (QuantType type : {QuantType::nf4, QuantType::fp4})
      for (at::ScalarType storage : {at::kByte, at::kBFloat16, at::kFloat}) {
        SCOPED_TRACE(std::string(quant_type_name(type)) + (nested ? " nested" : "") +
                     " storage " + c10::toString(storage));
        const Quantized q = quantized_make(nested, type, storage, {33, 65});
        const auto m = tensor_map(bnb_checkpoint_tensors(kWeight, q));
        const Quantized back = bnb_read_quantized(kWeight, lookup(m));
        EXPECT_TRUE(tensors_identical(back.packed, q.packed));
        EXPECT_EQ(back.state.shape, q.state.shape);
        EXPECT_EQ(back.state.blocksize, q.state.blocksize);
        EXPECT_EQ(back.state.quant_type, q.state.quant_type);
        EXPECT_EQ(back.state.dtype, q.state.dtype);
        EXPECT_TRUE(tensors_identical(back.state.absmax, q.state.absmax));
        EXPECT_TRUE(tensors_identical(back.state.code, q.state.code));
        ASSERT_EQ(back.state.is_nested(), nested);
        if (nested) {
          EXPECT_EQ(back.state.nested->offset, q.state.nested->offset);
          EXPECT_EQ(back.state.nested->blocksize, q.state.nested->blocksize);
          EXPECT_TRUE(tensors_identical(back.state.nested->absmax, q.state.nested->absmax));
          EXPECT_TRUE(tensors_identical(back.state.nested->code, q.state.nested->code));
        }
        EXPECT_TRUE(tensors_identical(dequantize_4bit(back.packed, back.state),
                                      dequantize_4bit(q.packed, q.state)));
      }
}

void expect_read_error(const std::map<std::string, at::Tensor>& m,
                       const std::vector<std::string>& parts) {
  const std::string msg = invalid_argument_message([&] { bnb_read_quantized(kWeight, lookup(m)); });
  for (const std::string& part : parts)
    EXPECT_TRUE(contains(msg, part)) << "expected '" << part << "' in: " << msg;
}

TEST(BnbCheckpoint, ReadErrors) {
  const std::string key = kWeight + ".quant_state.bitsandbytes__nf4";
  const auto plain = tensor_map(bnb_checkpoint_tensors(kWeight, quantized_make(false, QuantType::nf4, at::kByte)));
  const auto nested = tensor_map(bnb_checkpoint_tensors(kWeight, quantized_make(true, QuantType::nf4, at::kByte)));

  // A tensor of the set is missing.
  for (const std::string suffix : {"", ".absmax", ".quant_map"}) {
    auto m = plain;
    m.erase(kWeight + suffix);
    expect_read_error(m, {"tensor '" + kWeight + suffix + "' is missing"});
  }
  for (const std::string suffix : {".nested_absmax", ".nested_quant_map"}) {
    auto m = nested;
    m.erase(kWeight + suffix);
    expect_read_error(m, {"tensor '" + kWeight + suffix + "' is missing"});
  }
  {
    auto m = plain;
    m.erase(key);
    expect_read_error(m, {kWeight + ".quant_state.bitsandbytes__nf4", "missing"});
  }

  // The JSON shape disagrees with the packed byte count (same block count: absmax agrees).
  {
    auto m = plain;
    m[key] = json_tensor(
        "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [6100]}");
    expect_read_error(m, {"tensor '" + kWeight + "'", "3072 packed bytes", "[6100]", "needs 3050"});
  }
  // The absmax count disagrees with shape and blocksize.
  {
    auto m = plain;
    m[kWeight + ".absmax"] = m[kWeight + ".absmax"].slice(0, 0, 90);
    expect_read_error(m, {kWeight + ": ", "absmax has 90 entries", "need 96"});
  }
  // Nested tensors without the nested JSON fields.
  {
    auto m = plain;
    m[kWeight + ".nested_absmax"] = nested.at(kWeight + ".nested_absmax");
    m[kWeight + ".nested_quant_map"] = nested.at(kWeight + ".nested_quant_map");
    expect_read_error(m, {key, "no nested_offset", kWeight + ".nested_absmax"});
  }
  // The nested JSON fields without nested tensors.
  {
    auto m = nested;
    m.erase(kWeight + ".nested_absmax");
    m.erase(kWeight + ".nested_quant_map");
    expect_read_error(m, {"tensor '" + kWeight + ".nested_absmax' is missing"});
  }
  // quant_type in the JSON disagrees with the tensor name.
  {
    auto m = plain;
    m[kWeight + ".quant_state.bitsandbytes__fp4"] = m[key];
    m.erase(key);
    expect_read_error(m, {kWeight + ".quant_state.bitsandbytes__fp4", "quant_type 'nf4'",
                          "disagrees"});
  }
  // The quant_state is not uint8, or not JSON.
  {
    auto m = plain;
    m[key] = m[key].to(at::kInt);
    expect_read_error(m, {key, "uint8 JSON bytes"});
    m[key] = json_tensor("{nope");
    expect_read_error(m, {key + ": ", "not a JSON object"});
  }
  // A nested_blocksize of 0 in the JSON is an error, not a division by zero.
  {
    auto m = nested;
    std::string json(static_cast<const char*>(m[key].data_ptr()), m[key].numel());
    const size_t at = json.find("\"nested_blocksize\": 256");
    ASSERT_NE(at, std::string::npos) << json;
    json.replace(at, std::strlen("\"nested_blocksize\": 256"), "\"nested_blocksize\": 0");
    m[key] = json_tensor(json);
    expect_read_error(m, {kWeight + ": ", "nested_blocksize must be positive"});
  }
}

}  // namespace
}  // namespace qlora::quant
