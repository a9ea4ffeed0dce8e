// Test driver for the reference tests: runs our quantize/dequantize on inputs prepared by the
// Python side and writes every result to safetensors, so that pytest can compare them with the
// real bitsandbytes package byte for byte.
//   quant_probe cases IN OUT            IN: tensors "x/<id>" + metadata "cases" (JSON list of
//                                        {id, blocksize, quant_type, double_quant, storage});
//                                        optional "state/<id>/..." = a bitsandbytes state to
//                                        dequantize with our kernels.
//   quant_probe dequant-checkpoint DIR OUT   every bnb-quantized weight of a HF checkpoint,
//                                        read with bnb_read_quantized and dequantized to fp32.
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <iostream>
#include <string>

#include "io/safetensors.h"
#include "quant/bnb_checkpoint.h"
#include "quant/quantize.h"
#include "quant/tensor_io.h"

using namespace qlora;

namespace {

void add(io::SafetensorsWriter& w, const std::string& name, const at::Tensor& t) {
  quant::writer_add(w, name, t);
}

// Our dequantizations of (packed, state) in every output dtype and by both paths.
void add_dequants(io::SafetensorsWriter& w, const std::string& prefix, const at::Tensor& packed,
                  const quant::QuantState& st) {
  add(w, prefix + "/deq_fp32", quant::dequantize_4bit(packed, st, at::kFloat));
  add(w, prefix + "/deq_bf16", quant::dequantize_4bit(packed, st, at::kBFloat16));
  add(w, prefix + "/deq_fp16", quant::dequantize_4bit(packed, st, at::kHalf));
  add(w, prefix + "/deq_torch_fp32", quant::dequantize_4bit_torch(packed, st, at::kFloat));
  add(w, prefix + "/deq_torch_bf16", quant::dequantize_4bit_torch(packed, st, at::kBFloat16));
}

int run_cases(const std::string& in_path, const std::string& out_path) {
  auto in = io::SafetensorsFile::open(in_path);
  const auto cases = nlohmann::json::parse(in->metadata().at("cases"));
  io::SafetensorsWriter w;
  for (const auto& c : cases) {
    const std::string id = c.at("id");
    quant::QuantizeOptions o;
    o.blocksize = c.at("blocksize");
    o.quant_type = quant::quant_type_from_name(c.at("quant_type"));
    o.double_quant = c.at("double_quant");
    o.storage = quant::storage_dtype_from_name(c.at("storage"));
    const at::Tensor x = quant::tensor_from_safetensors(in->at("x/" + id), in->data(in->at("x/" + id)));
    const quant::Quantized q = quant::quantize_4bit(x, o);
    add(w, id + "/packed", q.packed);
    add(w, id + "/absmax", q.state.absmax);
    add(w, id + "/code", q.state.code);
    if (q.state.nested) {
      add(w, id + "/nested_absmax", q.state.nested->absmax);
      add(w, id + "/nested_code", q.state.nested->code);
      add(w, id + "/offset", at::full({1}, q.state.nested->offset, at::kFloat));
    }
    add(w, id + "/absmax_fp32", q.state.absmax_fp32());
    add_dequants(w, id, q.packed, q.state);
    // bitsandbytes' own state for the same input, if given: dequantize it with our code.
    const std::string sp = "state/" + id + "/";
    if (in->find(sp + "packed")) {
      quant::QuantState st = q.state;
      auto get = [&](const std::string& n) { return quant::tensor_from_safetensors(in->at(sp + n), in->data(in->at(sp + n))); };
      st.absmax = get("absmax");
      if (st.nested) {
        st.nested->absmax = get("nested_absmax");
        st.nested->offset = get("offset").item<float>();
      }
      add_dequants(w, "bnb/" + id, get("packed"), st);
    }
  }
  w.write(out_path);
  return 0;
}

int run_dequant_checkpoint(const std::string& dir, const std::string& out_path) {
  const io::ModelWeights weights = io::ModelWeights::open_dir(dir);
  auto contains = [&](const std::string& n) { return weights.contains(n); };
  auto get = [&](const std::string& n) -> std::optional<at::Tensor> {
    if (!weights.contains(n)) return std::nullopt;
    return quant::tensor_from_weights(weights, n);
  };
  io::SafetensorsWriter w;
  for (const std::string& name : weights.names()) {
    if (quant::bnb_is_state_tensor(name) || quant::bnb_quant_state_key(name, contains).empty()) continue;
    const quant::Quantized q = quant::bnb_read_quantized(name, get);
    add(w, name, quant::dequantize_4bit(q.packed, q.state, at::kFloat));
  }
  w.write(out_path);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string mode = argc > 1 ? argv[1] : "";
    if (mode == "cases" && argc == 4) return run_cases(argv[2], argv[3]);
    if (mode == "dequant-checkpoint" && argc == 4) return run_dequant_checkpoint(argv[2], argv[3]);
    std::fprintf(stderr, "usage: quant_probe cases IN OUT | dequant-checkpoint DIR OUT\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "quant_probe: error: %s\n", e.what());
    return 1;
  }
}
