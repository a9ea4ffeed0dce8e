// Fuzzes config.json as the model loaders read it: io::read_hf_config (JSON, architectures,
// model_type, quantization_config and the method detection), then
// model::model_config_from_json (sizes, heads, rope_scaling / rope_parameters, sliding windows,
// layer_types) and expected_weight_shapes (every tensor the config implies). The input is the
// file. Bad input must be io::FormatError (read_hf_config) or std::invalid_argument
// (model_config_from_json): both are what those functions document for a bad file.
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "fuzz_util.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/model_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qlora;
  const std::string path =
      fuzz::scratch_write("config.json", {reinterpret_cast<const char*>(data), size});
  io::HfConfig hf;
  try {
    hf = io::read_hf_config(path);
  } catch (const io::FormatError& e) {
    fuzz::refused(e);
    return 0;
  }
  (void)io::quant_method_name(hf.quantization.method);
  model::ModelConfig config;
  try {
    config = model::model_config_from_json(hf.raw, hf.path);
  } catch (const std::invalid_argument& e) {
    fuzz::refused(e);
    return 0;
  }
  const auto shapes = model::expected_weight_shapes(config);
  for (const auto& [name, shape] : shapes) {
    int64_t numel = 1;
    for (int64_t d : shape) {
      if (d <= 0 || __builtin_mul_overflow(numel, d, &numel)) {
        std::fprintf(stderr, "hf_config fuzz: accepted config gives %s shape %s\n", name.c_str(),
                     model::shape_str(shape).c_str());
        std::abort();
      }
    }
  }
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer)
    (void)config.attention_window(layer);
  return 0;
}
