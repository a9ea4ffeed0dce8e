// Test driver for the model reference tests: loads a model (and optionally a peft adapter) with
// our code, runs forward, loss and backward on given tokens, and writes everything to
// safetensors for pytest to compare with transformers + bitsandbytes + peft.
//   model_probe MODEL_DIR IN OUT [--adapter DIR] [--write-adapter DIR] [--chunk N]
//     IN:  input_ids int64 [B, T], labels int64 [B, T], optionally position_ids int64 [B, T]
//          (packed rows: RoPE at those positions, block-diagonal causal attention)
//     OUT: logits fp32 [B, T, V], loss fp32 [1], num_targets int64 [1],
//          <layer>.lora_A.grad / <layer>.lora_B.grad for every adapted layer
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cstdio>
#include <cstring>
#include <string>

#include "io/safetensors.h"
#include "lora/peft_adapter.h"
#include "model/decoder.h"
#include "quant/tensor_io.h"

using namespace qlora;

int main(int argc, char** argv) {
  try {
    if (argc < 4) {
      std::fprintf(stderr, "usage: model_probe MODEL_DIR IN OUT [--adapter DIR] "
                           "[--write-adapter DIR] [--chunk N]\n");
      return 2;
    }
    std::string adapter_dir, write_adapter_dir;
    int64_t chunk = 1024;
    for (int i = 4; i + 1 < argc; i += 2) {
      const std::string key = argv[i];
      if (key == "--adapter") adapter_dir = argv[i + 1];
      else if (key == "--write-adapter") write_adapter_dir = argv[i + 1];
      else if (key == "--chunk") chunk = std::stoll(argv[i + 1]);
      else throw std::invalid_argument("unknown option " + key);
    }
    at::set_num_threads(1);  // deterministic reductions
    model::LoadOptions options;
    options.quant.double_quant = true;  // quantize-on-load as the tests' BitsAndBytesConfig
    model::DecoderModel m = model::DecoderModel::load(argv[1], options);
    if (!adapter_dir.empty()) m.adapters_load(lora::peft_adapter_read(adapter_dir));

    auto in = io::SafetensorsFile::open(argv[2]);
    const at::Tensor tokens = quant::tensor_from_safetensors(in->at("input_ids"), in->data(in->at("input_ids")));
    const at::Tensor labels = quant::tensor_from_safetensors(in->at("labels"), in->data(in->at("labels")));

    at::Tensor positions;  // undefined: 0..T-1, one causal sequence per row
    if (in->find("position_ids") != nullptr)
      positions = quant::tensor_from_safetensors(in->at("position_ids"),
                                                 in->data(in->at("position_ids")));

    at::Tensor x = m.embed(tokens);
    for (int64_t i = 0; i < m.num_blocks(); ++i)
      x = m.block_forward(i, x, false, std::nullopt, positions);
    const at::Tensor normed = m.final_norm(x);
    const model::LossResult loss = m.loss(normed, labels, chunk);
    at::Tensor logits;
    {
      at::AutoGradMode no_grad(false);
      logits = m.logits(normed).to(at::kFloat);
    }
    io::SafetensorsWriter w;
    quant::writer_add(w, "logits", logits);
    quant::writer_add(w, "loss", loss.loss.detach().reshape({1}).to(at::kFloat));
    quant::writer_add(w, "num_targets", at::full({1}, loss.num_targets, at::kLong));
    if (!adapter_dir.empty()) {
      loss.loss.backward();
      for (int64_t i = 0; i < m.num_blocks(); ++i) {
        for (lora::QLoraLinear& lin : m.block(i).linears) {
          if (!lin.has_adapter()) continue;
          quant::writer_add(w, lin.name() + ".lora_A.grad", lin.lora_A().grad());
          quant::writer_add(w, lin.name() + ".lora_B.grad", lin.lora_B().grad());
        }
      }
    }
    w.write(argv[3]);
    if (!write_adapter_dir.empty())
      lora::peft_adapter_write(write_adapter_dir, m.adapters_export(argv[1]));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "model_probe: error: %s\n", e.what());
    return 1;
  }
}
