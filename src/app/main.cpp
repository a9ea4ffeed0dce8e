// qlora_dist: the one binary. Commands: train (also `qlora_dist config.ini`), eval, quantize,
// init-model, inspect, export, generate, prep, synth-data, plot. Every error a user
// can cause ends as one line "qlora_dist <command>: error: ..." and exit status 1; usage errors exit 2.
#include <ATen/core/ScalarType.h>
#include <boost/program_options.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <stdexcept>
#include <string>

#include "io/safetensors.h"
#include "quant4_format.h"
#include "model/init_model.h"
#include "quant/quant_state.h"
#include "app/export_command.h"
#include "app/generate_command.h"
#include "app/inspect_command.h"
#include "app/quantize_command.h"
#include "app/config.h"
#include "data/dataset.h"
#include "app/plot_command.h"
#include "app/prep_command.h"
#include "train/sharded_model.h"
#include "app/train_command.h"
#include "app/usage_error.h"
#include "dist/device_context.h"

namespace po = boost::program_options;
namespace fs = std::filesystem;

namespace {

using qlora::app::UsageError;

const char* const kUsage =
    "usage: qlora_dist <command> [options]\n"
    "commands:\n"
    "  quantize    --model DIR --out DIR|FILE.h5 [--format safetensors|h5] [--quantization_type nf4|fp4]\n"
    "              [--quantization_blocksize 64] [--double_quantization true|false]\n"
    "              [--quant_storage uint8|bf16|fp16|fp32]\n"
    "              Hugging Face model -> pre-quantized bitsandbytes 4-bit checkpoint, or (h5) one\n"
    "              HDF5 file of sharded units that each rank reads only its part of\n"
    "  init-model  --preset tiny|small|1b --out DIR [--seed N]\n"
    "              random-initialized LLaMA model in Hugging Face format\n"
    "  export      --model DIR --adapter DIR --out DIR [--dtype bf16|fp16|fp32]\n"
    "              base model + PEFT LoRA adapter -> merged Hugging Face checkpoint\n"
    "  inspect     --model DIR\n"
    "              what a model directory holds; checks every bitsandbytes 4-bit weight\n"
    "  train       config.ini [--section.key=value ...]   (also: qlora_dist config.ini ...)\n"
    "              QLoRA fine-tuning across MPI ranks; 'qlora_dist train --help' lists every key\n"
    "  eval        config.ini [--section.key=value ...]\n"
    "              eval loss and perplexity of the model (+ adapter) on data.eval_file\n"
    "  generate    --model DIR [--adapter DIR] (--template NAME | --raw) (--prompt TEXT | --prompts FILE.jsonl)\n"
    "              [--max_new_tokens 128] [--temperature 0] [--top_p 1] [--seed 0] [--system TEXT]\n"
    "              text from the 4-bit model (+ adapter) on the CPU with a KV cache; greedy by default\n"
    "  prep        config.ini --out FILE.h5 [--section.key=value ...]\n"
    "              JSON datasets (data.dataset, data.template, ...) -> token HDF5 file(s), with\n"
    "              the model's tokenizer.json; FILE.eval.h5 too with data.eval_dataset or val_size\n"
    "  synth-data  --out FILE --vocab V --seq-len T --rows N [--task copy|reverse|sort] [--seed S]\n"
    "              a synthetic instruction-style token dataset (HDF5)\n"
    "  plot        OUT_DIR [--out FILE.png]\n"
    "              loss (train, eval) and learning rate against steps from OUT_DIR/metrics.jsonl\n"
    "run 'qlora_dist <command> --help' for a command's options; 'qlora_dist --version' prints the\n"
    "libtorch version and the devices and backends this build supports\n";

bool parse_bool(const std::string& key, const std::string& v) {
  if (v == "true" || v == "1" || v == "True") return true;
  if (v == "false" || v == "0" || v == "False") return false;
  throw UsageError("--" + key + " '" + v + "' is not a boolean (expected true or false)");
}

// Option values that parse but are not allowed are usage errors too (exit 2), like those the
// parser itself rejects; errors in the files a user hands us exit 1.
template <typename F>
void as_usage_error(F&& f, const char* /*what*/) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    throw UsageError(e.what());
  }
}

po::variables_map parse(const po::options_description& desc, int argc, char** argv) {
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(argc, argv).options(desc).run(), vm);
    if (vm.count("help")) {
      std::cout << desc << "\n";
      std::exit(0);
    }
    po::notify(vm);
  } catch (const po::error& e) {
    throw UsageError(e.what());
  }
  return vm;
}

int run_quantize(int argc, char** argv) {
  qlora::app::QuantizeCommandOptions opt;
  std::string type = "nf4", storage = "uint8", dq = "true", format = "safetensors";
  int blocksize = 64;
  po::options_description desc("qlora_dist quantize options");
  desc.add_options()("help", "show this help")
      ("model", po::value(&opt.model_dir)->required(), "Hugging Face model directory (config.json + model.safetensors or a sharded index)")
      ("out", po::value(&opt.out_dir)->required(), "output directory (must not exist or be empty), or the .h5 file to write (must not exist) with --format h5")
      ("format", po::value(&format)->default_value("safetensors"), "safetensors (a bitsandbytes checkpoint directory transformers loads) or h5 (our sharded unit file)")
      ("quantization_type", po::value(&type)->default_value("nf4"), "nf4 or fp4")
      ("quantization_blocksize", po::value(&blocksize)->default_value(64), "32, 64, ..., 4096")
      ("double_quantization", po::value(&dq)->default_value("true"), "quantize the absmax again (8-bit, blocks of 256)")
      ("quant_storage", po::value(&storage)->default_value("uint8"), "dtype the packed bytes are stored as: uint8, bf16, fp16, fp32");
  parse(desc, argc, argv);
  as_usage_error([&] {
    opt.quant.quant_type = qlora::quant::quant_type_from_name(type);
    opt.quant.storage = qlora::quant::storage_dtype_from_name(storage);
  }, "quantization_type/--quant_storage");
  if (!qlora::kernels::valid_blocksize(blocksize))
    throw UsageError("--quantization_blocksize " + std::to_string(blocksize) +
                     " is not supported (expected 32, 64, 128, ..., 4096)");
  opt.quant.blocksize = blocksize;
  opt.quant.double_quant = parse_bool("double_quantization", dq);
  if (format == "h5") {
    const auto t0 = std::chrono::steady_clock::now();
    auto source = qlora::train::UnitSource::open(opt.model_dir, opt.quant);
    const size_t written = qlora::train::units_h5_write(*source, opt.out_dir);
    std::printf("quantized %s -> %s (HDF5 units, %s blocksize %d, double quantization %s)\n"
                "  %.2f MiB of units in %.2f s; read %.2f MiB\n",
                opt.model_dir.c_str(), opt.out_dir.c_str(),
                qlora::quant::quant_type_name(source->spec().quant.quant_type),
                source->spec().quant.blocksize, source->spec().quant.double_quant ? "on" : "off",
                written / 1048576.0,
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
                source->bytes_read() / 1048576.0);
    return 0;
  }
  if (format != "safetensors")
    throw UsageError("--format '" + format + "' is not supported (expected safetensors or h5)");

  const auto r = qlora::app::quantize_model_dir(opt);
  std::printf(
      "quantized %s -> %s\n"
      "  %lld linear weights to %s (blocksize %d, double quantization %s, storage %s): %lld params\n"
      "  %lld tensors kept as they were (embeddings, norms, biases, lm_head)\n"
      "  weights %.2f MiB -> %.2f MiB (%.2fx smaller) in %.2f s\n",
      opt.model_dir.c_str(), opt.out_dir.c_str(), static_cast<long long>(r.tensors_quantized),
      type.c_str(), blocksize, opt.quant.double_quant ? "on" : "off", storage.c_str(),
      static_cast<long long>(r.params_quantized), static_cast<long long>(r.tensors_copied),
      r.bytes_in / 1048576.0, r.bytes_out / 1048576.0,
      r.bytes_out ? static_cast<double>(r.bytes_in) / r.bytes_out : 0.0, r.seconds);
  return 0;
}

int run_init_model(int argc, char** argv) {
  std::string preset, out;
  int64_t seed = 0;
  po::options_description desc("qlora_dist init-model options");
  desc.add_options()("help", "show this help")
      ("preset", po::value(&preset)->required(), "tiny (~4M params), small (~100M params) or 1b (TinyLlama-1.1B shape, ~2.1 GiB)")
      ("out", po::value(&out)->required(), "output directory (must not exist or be empty)")
      ("seed", po::value(&seed)->default_value(0), "random seed; the same seed gives the same bytes");
  parse(desc, argc, argv);
  if (seed < 0) throw UsageError("--seed " + std::to_string(seed) + " is negative (expected 0 or more)");
  qlora::model::ModelConfig config;
  as_usage_error([&] { config = qlora::model::preset_config(preset); }, "preset");
  if (fs::exists(out) && !(fs::is_directory(out) && fs::is_empty(out)))
    throw std::invalid_argument(out + ": output directory exists and is not empty (choose a new path)");
  const auto r = qlora::model::init_model_write(config, static_cast<uint64_t>(seed), out);
  std::printf("wrote %s: %s preset, %lld layers, hidden %lld, %.2fM params, %.2f MiB (%s, seed %lld)\n",
              out.c_str(), preset.c_str(), static_cast<long long>(config.num_hidden_layers),
              static_cast<long long>(config.hidden_size), r.num_params / 1e6, r.nbytes / 1048576.0,
              config.torch_dtype.c_str(), static_cast<long long>(seed));
  return 0;
}

int run_export(int argc, char** argv) {
  qlora::app::ExportOptions opt;
  std::string dtype = "bf16";
  po::options_description desc("qlora_dist export options");
  desc.add_options()("help", "show this help")
      ("model", po::value(&opt.model_dir)->required(), "base model directory (bitsandbytes 4-bit or unquantized)")
      ("adapter", po::value(&opt.adapter_dir)->required(), "PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)")
      ("out", po::value(&opt.out_dir)->required(), "output directory (must not exist or be empty)")
      ("dtype", po::value(&dtype)->default_value("bf16"), "dtype of the merged weights: bf16, fp16 or fp32");
  parse(desc, argc, argv);
  if (dtype == "bf16") opt.dtype = at::kBFloat16;
  else if (dtype == "fp16") opt.dtype = at::kHalf;
  else if (dtype == "fp32") opt.dtype = at::kFloat;
  else throw UsageError("--dtype '" + dtype + "' is not supported (expected bf16, fp16 or fp32)");
  const auto r = qlora::app::export_merged(opt);
  std::printf("merged %s + %s -> %s\n  %lld layers merged (W + s * B @ A), %lld tensors, %.2f MiB (%s)\n",
              opt.model_dir.c_str(), opt.adapter_dir.c_str(), opt.out_dir.c_str(),
              static_cast<long long>(r.layers_merged), static_cast<long long>(r.tensors_written),
              r.bytes_out / 1048576.0, dtype.c_str());
  return 0;
}

int run_synth_data(int argc, char** argv) {
  qlora::data::SynthOptions opt;
  std::string task = "copy";
  int64_t seed = 0;
  po::options_description desc("qlora_dist synth-data options");
  desc.add_options()("help", "show this help")
      ("out", po::value(&opt.out)->required(), "HDF5 file to write (must not exist)")
      ("vocab", po::value(&opt.vocab)->required(), "vocabulary size (token ids < vocab; the model's vocab_size or less)")
      ("seq-len", po::value(&opt.seq_len)->required(), "tokens per row")
      ("rows", po::value(&opt.rows)->required(), "number of rows")
      ("task", po::value(&task)->default_value("copy"), "copy, reverse or sort: what the answer does with the prompt")
      ("seed", po::value(&seed)->default_value(0), "random seed; the same seed gives the same rows");
  parse(desc, argc, argv);
  if (seed < 0) throw UsageError("--seed " + std::to_string(seed) + " is negative (expected 0 or more)");
  as_usage_error([&] { opt.task = qlora::data::synth_task_from_name(task); }, "task");
  opt.seed = static_cast<uint64_t>(seed);
  qlora::data::synth_data_write(opt);
  std::printf("wrote %s: %lld rows x %lld tokens, task %s, vocab %lld, seed %lld\n", opt.out.c_str(),
              static_cast<long long>(opt.rows), static_cast<long long>(opt.seq_len), task.c_str(),
              static_cast<long long>(opt.vocab), static_cast<long long>(seed));
  return 0;
}

int run_plot(int argc, char** argv) {
  std::string dir, png;
  po::options_description desc("qlora_dist plot options");
  desc.add_options()("help", "show this help")
      ("dir", po::value(&dir)->required(), "a training output_dir (reads its metrics.jsonl)")
      ("out", po::value(&png)->default_value(""), "PNG to write (default: <dir>/metrics.png)");
  po::positional_options_description pos;
  pos.add("dir", 1);
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(argc, argv).options(desc).positional(pos).run(), vm);
    if (vm.count("help")) {
      std::cout << "usage: qlora_dist plot OUT_DIR [--out FILE.png]\n" << desc << "\n";
      return 0;
    }
    po::notify(vm);
  } catch (const po::error& e) {
    throw UsageError(std::string(e.what()) + " (usage: qlora_dist plot OUT_DIR [--out FILE.png])");
  }
  const auto r = qlora::app::plot_metrics(dir, png);
  std::printf("wrote %s: %d training steps, %d evaluations\n", r.png.c_str(), r.train_points,
              r.eval_points);
  return 0;
}

int run_inspect(int argc, char** argv) {
  std::string model;
  po::options_description desc("qlora_dist inspect options");
  desc.add_options()("help", "show this help")
      ("model", po::value(&model)->required(), "Hugging Face model directory");
  parse(desc, argc, argv);
  std::cout << qlora::app::inspect_model_dir(model);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::cout << kUsage;
    if (argc >= 2)  // --help: the training configuration keys too
      std::cout << "\ntraining configuration (qlora_dist train config.ini; INI [section] key = value):\n"
                << qlora::app::config_help();
    return argc < 2 ? 2 : 0;
  }
  const std::string command = argv[1];
  if (command == "--version" || command == "version") {
    std::printf("qlora_dist\n%s\n", qlora::dist::build_describe().c_str());
    return 0;
  }
  try {
    if (command == "quantize") return run_quantize(argc - 1, argv + 1);
    if (command == "init-model") return run_init_model(argc - 1, argv + 1);
    if (command == "inspect") return run_inspect(argc - 1, argv + 1);
    if (command == "export") return run_export(argc - 1, argv + 1);
    if (command == "synth-data") return run_synth_data(argc - 1, argv + 1);
    if (command == "train" || command == "eval") {
      const std::vector<std::string> args(argv + 2, argv + argc);
      return qlora::app::train_command_main(command, args, &argc, &argv);
    }
    if (command.size() > 4 && command.compare(command.size() - 4, 4, ".ini") == 0) {
      // `qlora_dist config.ini ...` is `qlora_dist train config.ini ...`.
      const std::vector<std::string> args(argv + 1, argv + argc);
      return qlora::app::train_command_main("train", args, &argc, &argv);
    }
    if (command == "plot") return run_plot(argc - 1, argv + 1);
    if (command == "generate")
      return qlora::app::generate_command_main(std::vector<std::string>(argv + 2, argv + argc));
    if (command == "prep")
      return qlora::app::prep_command_main(std::vector<std::string>(argv + 2, argv + argc));
    throw UsageError("unknown command '" + command +
                     "' (expected train, eval, generate, prep, quantize, init-model, inspect, export or "
                     "synth-data, "
                     "or a config.ini; see qlora_dist --help)");
  } catch (const UsageError& e) {
    std::fprintf(stderr, "qlora_dist %s: error: %s\n", command.c_str(), qlora::app::error_line(e.what()).c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qlora_dist %s: error: %s\n", command.c_str(), qlora::app::error_line(e.what()).c_str());
    return 1;
  }
}
