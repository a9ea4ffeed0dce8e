// The generate command: see generate_command.h. Output: the decoded answer per prompt
// (skip_special_tokens), or JSON Lines {"prompt", "answer", "tokens"} (+ "prompt_ids", "ids" with
// --print_ids) for --prompts FILE.jsonl or --print_ids; one timing line on stderr. The model is a
// Hugging Face directory (DecoderModel::load) or our HDF5 unit file (whole units, world size 1,
// bound into a skeleton once; the tokenizer then comes from --tokenizer DIR).
#include "app/generate_command.h"

#include <ATen/Parallel.h>
#include <boost/program_options.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <stdexcept>

#include "app/model_dir_output.h"
#include "app/usage_error.h"
#include "data/model_tokenizer.h"
#include "data/sft_dataset.h"
#include "lora/peft_adapter.h"
#include "model/decoder.h"
#include "model/generate.h"
#include "quant4_format.h"
#include "quant/quant_state.h"
#include "train/sharded_model.h"

namespace po = boost::program_options;
namespace fs = std::filesystem;

namespace qlora::app {
namespace {

const char* const kGenerateUsage =
    "usage: qlora_dist generate --model DIR [--adapter DIR] (--template NAME | --raw)\n"
    "                           (--prompt TEXT | --prompts FILE.jsonl) [options]\n"
    "       qlora_dist generate --model FILE.h5 --tokenizer DIR [--adapter DIR] ...\n"
    "--model FILE.h5: the HDF5 unit file of `qlora_dist quantize --format h5` (its own 4-bit\n"
    "settings; the --quantization_* options are for a directory only), on one process without\n"
    "MPI; its tokenizer files (tokenizer.json, tokenizer_config.json) come from --tokenizer DIR.\n"
    "Greedy decoding by default (argmax, lowest id on ties); --temperature > 0 samples with\n"
    "--top_p from a generator seeded by --seed. Stops at the template's EOS or a stop word, or\n"
    "after --max_new_tokens. The prompt is LLaMA-Factory's template applied to [user prompt] +\n"
    "an empty assistant answer. --template is required (we do not guess a template from\n"
    "tokenizer_config.json's jinja text): name the one the adapter was trained with; --raw\n"
    "feeds the prompt text as it is (template 'empty').\n"
    "--prompts FILE.jsonl: rows {\"prompt\": ..., \"system\": ... (optional)}; output is JSON Lines\n"
    "{\"prompt\", \"answer\", \"tokens\"} (tokens: new tokens, a final EOS included). Timing on stderr.\n";

struct Prompt {
  std::string text;
  std::string system;
};

// Rows {"prompt", "system" (optional)} of a JSON Lines (or JSON array) file, read by the dataset
// reader (which names file and line of a parse error).
std::vector<Prompt> prompts_read(const std::string& path, const std::string& default_system) {
  std::vector<Prompt> out;
  for (const data::JsonRow& row : data::read_json_rows(path)) {
    const nlohmann::json& j = row.value;
    if (!j.contains("prompt") || !j["prompt"].is_string())
      throw std::invalid_argument(row.where + ": expected an object with a string \"prompt\"");
    Prompt p{j["prompt"].get<std::string>(), default_system};
    if (j.contains("system") && !j["system"].is_null()) {
      if (!j["system"].is_string())
        throw std::invalid_argument(row.where + ": \"system\" must be a string");
      p.system = j["system"].get<std::string>();
    }
    out.push_back(std::move(p));
  }
  if (out.empty()) throw std::invalid_argument(path + ": no prompts (one JSON object per line)");
  return out;
}

int generate_run(const std::vector<std::string>& args) {
  std::string model_dir, tokenizer_dir, adapter_dir, template_name, prompt, prompts_file, system;
  std::string quant_type = "nf4", double_quant = "true";
  int64_t max_new_tokens = 128, seed = 0;
  int blocksize = 64;
  double temperature = 0.0, top_p = 1.0;
  po::options_description desc("qlora_dist generate options");
  desc.add_options()("help", "show this help")
      ("model", po::value(&model_dir)->required(), "Hugging Face model directory with tokenizer.json: unquantized (quantized on load) or a bitsandbytes 4-bit checkpoint; or an HDF5 unit file (quantize --format h5, needs --tokenizer)")
      ("tokenizer", po::value(&tokenizer_dir), "directory with tokenizer.json (+ tokenizer_config.json): required with an HDF5 unit file --model, default the model directory")
      ("adapter", po::value(&adapter_dir), "PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)")
      ("template", po::value(&template_name), "LLaMA-Factory chat template name (chatml, llama3, qwen, alpaca, ...); required unless --raw")
      ("raw", po::bool_switch(), "no chat template: the prompt text as it is (LLaMA-Factory's 'empty')")
      ("prompt", po::value(&prompt), "one prompt (the user message)")
      ("prompts", po::value(&prompts_file), "JSON Lines file of {\"prompt\": ..., \"system\": ...} rows")
      ("system", po::value(&system), "system prompt (default: the template's own); a row's \"system\" wins")
      ("max_new_tokens", po::value(&max_new_tokens)->default_value(128), "at most this many new tokens per prompt")
      ("temperature", po::value(&temperature)->default_value(0.0), "0: greedy; > 0: sampling")
      ("top_p", po::value(&top_p)->default_value(1.0), "nucleus sampling mass, 0 < top_p <= 1 (with --temperature > 0)")
      ("seed", po::value(&seed)->default_value(0), "seed of the sampling generator")
      ("print_ids", po::bool_switch(), "JSON Lines output with \"prompt_ids\" and \"ids\" (the new token ids) too")
      ("threads", po::value<int>()->default_value(0), "CPU threads (0: libtorch's default, one per core)")
      ("quantization_type", po::value(&quant_type)->default_value("nf4"), "quantize-on-load type: nf4 or fp4")
      ("quantization_blocksize", po::value(&blocksize)->default_value(64), "quantize-on-load block size: 32, 64, ..., 4096")
      ("double_quantization", po::value(&double_quant)->default_value("true"), "quantize-on-load absmax again (true or false)");
  po::variables_map vm;
  try {
    std::vector<std::string> argv_like(args.begin(), args.end());
    po::store(po::command_line_parser(argv_like).options(desc).run(), vm);
    if (vm.count("help")) {
      std::cout << kGenerateUsage << desc << "\n";
      return 0;
    }
    po::notify(vm);
  } catch (const po::error& e) {
    throw UsageError(std::string(e.what()) + " (see qlora_dist generate --help)");
  }
  const bool raw = vm["raw"].as<bool>(), print_ids = vm["print_ids"].as<bool>();
  if ((vm.count("prompt") > 0) == (vm.count("prompts") > 0))
    throw UsageError("give one of --prompt TEXT or --prompts FILE.jsonl");
  if (raw && !template_name.empty())
    throw UsageError("--raw and --template " + template_name + " exclude each other");
  if (!raw && template_name.empty())
    throw UsageError("--template NAME is required (the chat template the model or adapter was "
                     "trained with, e.g. chatml), or --raw for the prompt text as it is");
  if (raw) template_name = "empty";
  if (max_new_tokens < 0)
    throw UsageError("--max_new_tokens " + std::to_string(max_new_tokens) + " is negative");
  if (!(temperature >= 0.0))
    throw UsageError("--temperature " + std::to_string(temperature) + " is negative (0 is greedy)");
  if (!(top_p > 0.0 && top_p <= 1.0))
    throw UsageError("--top_p " + std::to_string(top_p) + " is not in (0, 1]");
  if (seed < 0) throw UsageError("--seed " + std::to_string(seed) + " is negative");
  if (vm["threads"].as<int>() < 0) throw UsageError("--threads must be 0 or more");
  model::LoadOptions load;
  try {
    load.quant.quant_type = quant::quant_type_from_name(quant_type);
  } catch (const std::invalid_argument& e) {
    throw UsageError(e.what());
  }
  if (!kernels::valid_blocksize(blocksize))
    throw UsageError("--quantization_blocksize " + std::to_string(blocksize) +
                     " is not supported (expected 32, 64, 128, ..., 4096)");
  load.quant.blocksize = blocksize;
  if (double_quant == "true" || double_quant == "1") load.quant.double_quant = true;
  else if (double_quant == "false" || double_quant == "0") load.quant.double_quant = false;
  else throw UsageError("--double_quantization '" + double_quant + "' is not a boolean (true or false)");
  const data::ChatTemplate* chat_template = nullptr;
  try {
    chat_template = &data::chat_template_by_name(template_name);
  } catch (const std::invalid_argument& e) {
    throw UsageError(std::string("--template: ") + e.what());
  }

  // A regular file is the HDF5 unit file (UnitSource::open says so when it is not HDF5).
  const bool unit_file = fs::is_regular_file(model_dir);
  if (unit_file && tokenizer_dir.empty())
    throw UsageError("--model " + model_dir + " is a file (an HDF5 unit file has no tokenizer): "
                     "give --tokenizer DIR, the directory with the model's tokenizer.json");
  if (unit_file)
    for (const char* option : {"quantization_type", "quantization_blocksize", "double_quantization"})
      if (!vm[option].defaulted())
        throw UsageError(std::string("--") + option + " is for quantizing a model directory on "
                         "load; the HDF5 unit file " + model_dir + " keeps its own 4-bit settings");
  if (tokenizer_dir.empty()) tokenizer_dir = model_dir;

  // Files: from here on, errors are the user's files (exit 1).
  if (!unit_file) model_dir_require(model_dir);
  if (!fs::is_directory(tokenizer_dir))
    throw std::invalid_argument(tokenizer_dir + ": tokenizer directory does not exist");
  std::vector<Prompt> prompts = prompts_file.empty() ? std::vector<Prompt>{{prompt, system}}
                                                     : prompts_read(prompts_file, system);
  if (const int threads = vm["threads"].as<int>(); threads > 0) at::set_num_threads(threads);

  const std::unique_ptr<data::ModelTokenizer> model_tokenizer = data::ModelTokenizer::open(
      tokenizer_dir, template_name,
      "generate needs the Hugging Face tokenizer files beside the model, or in --tokenizer DIR");
  const data::Tokenizer& tokenizer = model_tokenizer->tokenizer();
  const data::TemplateTokenizer& template_tokenizer = model_tokenizer->templated();
  const fs::path tokenizer_json = fs::path(tokenizer_dir) / "tokenizer.json";
  model::GenerateOptions gen;
  gen.max_new_tokens = max_new_tokens;
  gen.temperature = temperature;
  gen.top_p = top_p;
  gen.seed = static_cast<uint64_t>(seed);
  gen.stop_ids = model_tokenizer->stop_ids();  // LLaMA-Factory generates with these

  using clock = std::chrono::steady_clock;
  const auto t_load = clock::now();
  model::DecoderModel model = unit_file ? train::unit_file_model(model_dir, load)
                                        : model::DecoderModel::load(model_dir, load);
  if (!adapter_dir.empty()) model.adapters_load(lora::peft_adapter_read(adapter_dir));
  const double load_seconds = std::chrono::duration<double>(clock::now() - t_load).count();

  const bool json_out = print_ids || !prompts_file.empty();
  int64_t prefill_tokens = 0, decode_tokens = 0;
  double prefill_seconds = 0, decode_seconds = 0;
  for (const Prompt& p : prompts) {
    const std::vector<data::Message> messages = {{data::Role::user, p.text},
                                                 {data::Role::assistant, ""}};
    const auto encoded =
        data::template_encode_messages(template_tokenizer, *chat_template, messages, p.system);
    const std::vector<int32_t>& prompt_ids = encoded.at(0);  // encode_oneturn's prompt
    if (prompt_ids.empty())
      throw std::invalid_argument("prompt '" + p.text + "' encodes to no tokens");
    for (const int32_t id : prompt_ids)
      if (id < 0 || id >= model.config().vocab_size)
        throw std::invalid_argument(
            "prompt '" + p.text + "': token id " + std::to_string(id) + " ('" +
            tokenizer.id_to_token(id).value_or("?") + "') is outside the model's vocabulary of " +
            std::to_string(model.config().vocab_size) + " (" + tokenizer_json.string() + ", " + model_dir +
            ": do tokenizer.json and the model belong together?)");
    const model::GenerateResult r = model::generate(model, prompt_ids, gen);
    const std::string answer = tokenizer.decode(r.ids, /*skip_special_tokens=*/true);
    prefill_tokens += static_cast<int64_t>(prompt_ids.size());
    prefill_seconds += r.prefill_seconds;
    decode_tokens += r.decode_steps;
    decode_seconds += r.decode_seconds;
    if (json_out) {
      nlohmann::ordered_json j;
      j["prompt"] = p.text;
      j["answer"] = answer;
      j["tokens"] = r.ids.size();
      if (print_ids) {
        j["prompt_ids"] = prompt_ids;
        j["ids"] = r.ids;
      }
      std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
    } else {
      std::cout << answer << "\n";
    }
    std::cout.flush();
  }
  std::fprintf(stderr,
               "generate: %zu prompt(s); load %.2f s; prefill %lld tokens in %.3f s (%.1f tokens/s); "
               "decode %lld tokens in %.3f s (%.1f tokens/s); %d threads\n",
               prompts.size(), load_seconds, static_cast<long long>(prefill_tokens), prefill_seconds,
               prefill_seconds > 0 ? prefill_tokens / prefill_seconds : 0.0,
               static_cast<long long>(decode_tokens), decode_seconds,
               decode_seconds > 0 ? decode_tokens / decode_seconds : 0.0, at::get_num_threads());
  return 0;
}

}  // namespace

int generate_command_main(const std::vector<std::string>& args) {
  try {
    return generate_run(args);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "qlora_dist generate: error: %s\n", error_line(e.what()).c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qlora_dist generate: error: %s\n", error_line(e.what()).c_str());
    return 1;
  }
}

}  // namespace qlora::app
