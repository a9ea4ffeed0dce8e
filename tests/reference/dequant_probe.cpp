// Test driver for the FP8 / MXFP4 reference tests: reads a Hugging Face model directory through
// model::ModelReader (the one reader every loader uses) and writes each block linear's float
// weight as the reader gives it: dequantized from FP8 / MXFP4, or as stored. pytest compares the
// bits with transformers' dequantization of the same tensors.
//   dequant_probe MODEL_DIR OUT
//     OUT: safetensors, `model.layers.i.<proj>.weight` [out, in] in the dequantized dtype
//     stdout: one line "dtype <name>", then "dequantized <weight name>" for each dequantized one
#include <ATen/ATen.h>

#include <cstdio>
#include <string>

#include "io/safetensors.h"
#include "model/model_config.h"
#include "model/model_reader.h"
#include "quant/quant_state.h"
#include "quant/tensor_io.h"

using namespace qlora;

int main(int argc, char** argv) {
  try {
    if (argc != 3) {
      std::fprintf(stderr, "usage: dequant_probe MODEL_DIR OUT\n");
      return 2;
    }
    model::ModelReader reader(argv[1]);
    reader.weights_open();
    std::printf("dtype %s\n", quant::float_dtype_name(reader.dequant_dtype()).c_str());
    io::SafetensorsWriter writer;
    for (const auto& [name, shape] : model::expected_weight_shapes(reader.config())) {
      if (!model::is_block_linear_weight(name)) continue;
      quant::writer_add(writer, name, reader.linear_weight(name).contiguous());
      if (!reader.dequant_sources(name).empty()) std::printf("dequantized %s\n", name.c_str());
    }
    writer.write(argv[2]);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dequant_probe: %s\n", e.what());
    return 1;
  }
}
