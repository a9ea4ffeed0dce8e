// The training configuration: one table of keys (section, name, TrainConfig member, help) from
// which the Boost.Program_options description, --help, the INI writer and the nearest-key search
// are all made. Precedence: command line over file over the member initializers in config.h.
// Errors are one line: where (file, file:line or "command line --section.key"), key, value, and
// what would be right. Torch-free on purpose (this file is rebuilt often and must stay cheap).
#include "app/config.h"

#include "lora/lora_target.h"
#include "cpu_features.h"

#include <boost/program_options.hpp>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <variant>


namespace qlora::app {
namespace {

namespace po = boost::program_options;

using Member = std::variant<std::string TrainConfig::*, int64_t TrainConfig::*,
                            double TrainConfig::*, bool TrainConfig::*>;

struct KeyDef {
  const char* section;
  const char* key;
  Member member;
  const char* help;
  std::string name() const { return std::string(section) + "." + key; }
};

// Every key, in section order (model, quantization, finetuning, data, train, dist, output).
// Allowed values are checked in config_validate below; the help text states them.
const std::vector<KeyDef>& key_defs() {
  using C = TrainConfig;
  static const std::vector<KeyDef> defs = {
      {"model", "model_name_or_path", &C::model_name_or_path,
       "Required. The base model: a Hugging Face model directory (config.json + safetensors) or "
       "an HDF5 unit file written by qlora_dist quantize."},
      {"model", "adapter_name_or_path", &C::adapter_name_or_path,
       "A PEFT LoRA adapter directory to start from; empty = a fresh adapter. A quantized model "
       "accepts a single adapter only (merge several first)."},
      {"model", "tokenizer_name_or_path", &C::tokenizer_name_or_path,
       "Directory with the tokenizer files (tokenizer.json, tokenizer_config.json) that "
       "data.dataset is tokenized with; empty = model_name_or_path (give the Hugging Face "
       "directory here when the model is an HDF5 unit file)."},
      {"model", "compute_dtype", &C::compute_dtype,
       "auto | bf16 | fp16 | fp32: the dtype of activations and dequantized weights (auto: bf16 "
       "on cuda and on CPUs with AVX512_BF16 or AMX-BF16, checked at run time, else fp32; the "
       "log says which and why). LoRA master weights are always fp32."},
      {"model", "device", &C::device,
       "auto | cpu | cuda: where each rank computes (auto: cuda where this build has CUDA and a "
       "GPU is visible, else cpu). On cuda each rank uses the GPU of its local rank on the node "
       "(CUDA_VISIBLE_DEVICES applies); more ranks on a node than GPUs is refused."},
      {"model", "upcast_layernorm", &C::upcast_layernorm,
       "true | false: compute RMSNorm in fp32 (more stable with a quantized base)."},
      {"model", "resize_vocab", &C::resize_vocab,
       "true | false: resize the embedding to the tokenizer (refused on a quantized model)."},
      {"model", "create_new_adapter", &C::create_new_adapter,
       "true | false: add a new adapter on top of adapter_name_or_path (refused on a quantized "
       "model)."},
      {"quantization", "quantization_bit", &C::quantization_bit,
       "4 | 8 | none: bit width of the frozen base weights (only 4 is trained today)."},
      {"quantization", "quantization_method", &C::quantization_method,
       "bnb: bitsandbytes-compatible quantization on the fly (pre-quantized GPTQ/AWQ/... models "
       "are not supported)."},
      {"quantization", "quantization_type", &C::quantization_type,
       "nf4 | fp4: the 4-bit code (bitsandbytes bnb_4bit_quant_type)."},
      {"quantization", "double_quantization", &C::double_quantization,
       "true | false: quantize the per-block absmax constants again (8-bit, blocks of 256), "
       "bnb_4bit_use_double_quant."},
      {"quantization", "quantization_blocksize", &C::quantization_blocksize,
       "Elements per absmax block: a power of two in [32, 4096] (bitsandbytes default 64)."},
      {"quantization", "quant_storage", &C::quant_storage,
       "auto | uint8 | bf16 | fp16 | fp32: dtype the packed 4-bit bytes are stored as "
       "(bnb_4bit_quant_storage); sharded training needs it equal to the compute dtype, so any "
       "other value is corrected with a warning."},
      {"quantization", "quantization_device_map", &C::quantization_device_map,
       "none | auto: device map of the quantized model (auto is for inference only)."},
      {"finetuning", "finetuning_type", &C::finetuning_type,
       "lora | oft | full | freeze: what is trained (only lora is supported)."},
      {"finetuning", "lora_rank", &C::lora_rank, "LoRA rank r (>= 1)."},
      {"finetuning", "lora_alpha", &C::lora_alpha,
       "LoRA alpha (> 0): the adapter is scaled by alpha / r (alpha / sqrt(r) with use_rslora)."},
      {"finetuning", "lora_dropout", &C::lora_dropout,
       "Dropout on the adapter input, in [0, 1)."},
      {"finetuning", "lora_target", &C::lora_target,
       "all, or a comma list of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj: "
       "the linears that get an adapter."},
      {"finetuning", "use_rslora", &C::use_rslora,
       "true | false: rank-stabilized LoRA scale alpha / sqrt(r)."},
      {"finetuning", "pissa_init", &C::pissa_init,
       "true | false: PiSSA adapter initialization (refused on a quantized model)."},
      {"data", "train_file", &C::train_file,
       "HDF5 file with input_ids and labels, int32 [rows, seq_len] (required when "
       "train.do_train = true)."},
      {"data", "eval_file", &C::eval_file,
       "HDF5 file like train_file for evaluation (required when train.do_eval = true)."},
      {"data", "dataset", &C::dataset,
       "Comma list of JSON (array) or JSON Lines files to train on, in LLaMA-Factory's alpaca, "
       "sharegpt / OpenAI messages or text format. Rank 0 tokenizes them with the model's "
       "tokenizer.json into data.tokenized_path while the other ranks wait; instead of "
       "data.train_file."},
      {"data", "eval_dataset", &C::eval_dataset,
       "Comma list of JSON / JSON Lines files to evaluate on (instead of data.eval_file)."},
      {"data", "template", &C::template_name,
       "Chat template, LLaMA-Factory's names: default | alpaca | chatml | qwen | llama2 | llama3 "
       "| mistral | smollm2 | empty. Required with data.dataset unless data.formatting = text."},
      {"data", "formatting", &C::formatting,
       "auto | alpaca | sharegpt | openai | text: the dataset format (auto: from the first row's "
       "keys)."},
      {"data", "cutoff_len", &C::cutoff_len,
       "Rows are cut to this many tokens (>= 2); with data.dataset, samples are truncated as "
       "LLaMA-Factory does (prompt and answer shares; cutoff_len - 1 when packing) and packed "
       "rows have this length (text blocks: cutoff_len - 1)."},
      {"data", "train_on_prompt", &C::train_on_prompt,
       "true | false: compute the loss on the prompt tokens too."},
      {"data", "mask_history", &C::mask_history,
       "true | false: learn only the last turn's answer of a multi-turn conversation."},
      {"data", "packing", &C::packing,
       "true | false: concatenate samples into rows of cutoff_len tokens."},
      {"data", "neat_packing", &C::neat_packing,
       "true | false: packing where samples do not attend to each other (position ids restart "
       "per sample, block-diagonal causal attention); implies packing."},
      {"data", "max_samples", &C::max_samples,
       "Use at most this many samples of each dataset file (0 = all)."},
      {"data", "val_size", &C::val_size,
       "Hold out part of data.dataset for evaluation: a fraction in (0, 1) or a number of "
       "samples >= 1 (a split seeded by train.seed); 0 = none."},
      {"data", "tokenized_path", &C::tokenized_path,
       "Directory for the tokenized HDF5 files (train.h5, eval.h5); empty = "
       "output_dir/data/<hash of the inputs and options>. Re-used when the inputs match."},
      {"data", "dataset_skip_bad", &C::dataset_skip_bad,
       "true | false: skip bad rows (missing fields, wrong roles, nothing left to learn) and "
       "count them, instead of refusing the dataset."},
      {"train", "stage", &C::stage,
       "sft | dpo: supervised fine-tuning on answers, or preference training on pairs of a "
       "chosen and a rejected answer (train.pref_loss)."},
      {"train", "pref_beta", &C::pref_beta,
       "Preference temperature (> 0): DPO/IPO beta, the ORPO weight of the odds-ratio term, "
       "SimPO beta."},
      {"train", "pref_loss", &C::pref_loss,
       "sigmoid | ipo | orpo | simpo: DPO's loss, IPO (length-normalised log ratios), ORPO and "
       "SimPO (both without a reference forward)."},
      {"train", "simpo_gamma", &C::simpo_gamma, "SimPO's target reward margin (>= 0)."},
      {"train", "pref_ftx", &C::pref_ftx,
       "Weight (>= 0) of an SFT term added to the preference loss: the mean negative "
       "log-likelihood of the chosen answers' tokens (TRL's loss_type sft)."},
      {"train", "dpo_label_smoothing", &C::dpo_label_smoothing,
       "cDPO label smoothing in [0, 0.5): the assumed probability that a pair's preference is "
       "flipped (sigmoid and simpo losses)."},
      {"train", "per_device_train_batch_size", &C::per_device_train_batch_size,
       "Rows per rank per micro-batch (>= 1); with stage = dpo, pairs (twice as many rows)."},
      {"train", "gradient_accumulation_steps", &C::gradient_accumulation_steps,
       "Micro-batches per optimizer step (>= 1)."},
      {"train", "learning_rate", &C::learning_rate, "Peak AdamW learning rate (>= 0)."},
      {"train", "lr_scheduler_type", &C::lr_scheduler_type,
       "constant | linear | cosine, after a linear warmup, as transformers.get_scheduler "
       "(constant = its constant_with_warmup)."},
      {"train", "warmup_ratio", &C::warmup_ratio,
       "Fraction of the steps spent warming up linearly, in [0, 1]."},
      {"train", "warmup_steps", &C::warmup_steps,
       "Warmup steps (>= 0); > 0 wins over warmup_ratio."},
      {"train", "num_train_epochs", &C::num_train_epochs,
       "Passes over train_file (> 0 unless max_steps > 0)."},
      {"train", "max_steps", &C::max_steps,
       "Optimizer steps: -1 = from num_train_epochs, else >= 1 (wins over num_train_epochs)."},
      {"train", "weight_decay", &C::weight_decay, "AdamW decoupled weight decay (>= 0)."},
      {"train", "adam_beta1", &C::adam_beta1, "AdamW beta1, in [0, 1)."},
      {"train", "adam_beta2", &C::adam_beta2, "AdamW beta2, in [0, 1)."},
      {"train", "adam_epsilon", &C::adam_epsilon, "AdamW epsilon (> 0)."},
      {"train", "max_grad_norm", &C::max_grad_norm,
       "Clip the global gradient norm to this (>= 0; 0 = no clipping)."},
      {"train", "seed", &C::seed,
       "Seed of adapter init, data order and dropout (>= 0); same seed and world size, same run."},
      {"train", "gradient_checkpointing", &C::gradient_checkpointing,
       "true: the forward keeps each block's input only and the backward recomputes the block "
       "(activations of one block at a time). false: the forward keeps every block's "
       "activations and nothing is recomputed (faster, more memory; the base weights are still "
       "gathered and dequantized again for the backward). A configuration whose activations "
       "would exceed half of this node's memory per rank is refused."},
      {"train", "disable_gradient_checkpointing", &C::disable_gradient_checkpointing,
       "true | false: LLaMA-Factory's name for gradient_checkpointing = false (either one "
       "turns recompute off)."},
      {"train", "do_train", &C::do_train, "true | false: run training on train_file."},
      {"train", "do_eval", &C::do_eval, "true | false: evaluate the loss on eval_file."},
      {"train", "eval_steps", &C::eval_steps,
       "Evaluate every this many steps (>= 0; 0 = only at the end)."},
      {"train", "max_skipped_steps", &C::max_skipped_steps,
       "A step with a NaN or Inf loss or gradient norm (on any rank) is skipped: no update, "
       "counted as skipped_steps in metrics.jsonl. This many in a row (>= 1) stop the run with "
       "exit status 1 after a checkpoint of the last good state."},
      {"dist", "backend", &C::backend,
       "auto | mpi | nccl: collectives between ranks (auto: nccl on cuda, mpi on the cpu; mpi on "
       "cuda stages every collective through host memory: slow, for clusters without NCCL and "
       "for debugging)."},
      {"dist", "sharding", &C::sharding,
       "full | none: full shards base weights, adapters and optimizer state over the ranks "
       "(FSDP-like); none replicates them (data parallel only)."},
      {"dist", "prefetch", &C::prefetch,
       "Units gathered ahead of the one computing: 0, 1 or 2 (more overlap, more memory)."},
      {"dist", "timeout_s", &C::timeout_s,
       "Watchdog (> 0): a rank that waits longer than this many seconds for a collective or an "
       "agreement prints which one and which ranks had not arrived, then ends the job."},
      {"output", "output_dir", &C::output_dir,
       "Required. Directory for the adapter, checkpoints, the resolved config and logs."},
      {"output", "logging_steps", &C::logging_steps, "Log the loss every this many steps (>= 1)."},
      {"output", "save_steps", &C::save_steps,
       "Save a checkpoint every this many steps (>= 0; 0 = only at the end)."},
      {"output", "save_total_limit", &C::save_total_limit,
       "Checkpoints kept, oldest removed first (>= 0; 0 = keep all)."},
      {"output", "resume_from_checkpoint", &C::resume_from_checkpoint,
       "auto | none | PATH: auto resumes from the newest checkpoint in output_dir if any; none "
       "starts fresh; PATH resumes from that checkpoint directory."},
      {"output", "report_to", &C::report_to,
       "Comma list of jsonl, tensorboard, or none: where metrics go besides the log."},
      {"output", "overwrite_output_dir", &C::overwrite_output_dir,
       "true | false: allow a non-empty output_dir that holds no checkpoint to resume from."},
  };
  return defs;
}

const KeyDef* key_def_find(const std::string& name) {
  for (const KeyDef& d : key_defs())
    if (d.name() == name) return &d;
  return nullptr;
}

std::string trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t\r\n") - b + 1);
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  size_t begin = 0;
  while (true) {
    const size_t comma = s.find(',', begin);
    out.push_back(trim(s.substr(begin, comma == std::string::npos ? comma : comma - begin)));
    if (comma == std::string::npos) return out;
    begin = comma + 1;
  }
}

// The shortest "%g" text that reads back as exactly `v` ("0.0001", "1e-08", "0.999"); a whole
// number keeps a ".0" so the INI shows it is a real (and is never written with an exponent:
// "600.0", not "6e+02").
std::string double_text(double v) {
  char buf[40];
  if (v == std::floor(v) && std::fabs(v) < 1e15) {
    std::snprintf(buf, sizeof buf, "%.1f", v);
    return buf;
  }
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof buf, "%.*g", precision, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::string s = buf;
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
  return s;
}

std::string member_text(const TrainConfig& c, const Member& m) {
  return std::visit(
      [&](auto ptr) -> std::string {
        using T = std::decay_t<decltype(c.*ptr)>;
        if constexpr (std::is_same_v<T, std::string>) return c.*ptr;
        else if constexpr (std::is_same_v<T, int64_t>) return std::to_string(c.*ptr);
        else if constexpr (std::is_same_v<T, double>) return double_text(c.*ptr);
        else return c.*ptr ? "true" : "false";
      },
      m);
}

// Parsers with our messages (Boost's say "the argument ('x') for option 'y' is invalid").
// They accept at most what Boost's own validators accept, so Boost never fails after them.
std::optional<bool> bool_parse(const std::string& text) {
  const std::string s = lower(trim(text));
  if (s == "true" || s == "1" || s == "yes" || s == "on") return true;
  if (s == "false" || s == "0" || s == "no" || s == "off") return false;
  return std::nullopt;
}

std::optional<int64_t> int_parse(const std::string& text) {
  const std::string s = trim(text);
  if (s.empty() || s.find_first_not_of("+-0123456789") != std::string::npos) return std::nullopt;
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (errno == ERANGE || end != s.c_str() + s.size()) return std::nullopt;
  return static_cast<int64_t>(v);
}

std::optional<double> double_parse(const std::string& text) {
  const std::string s = trim(text);
  if (s.empty() || s.find_first_not_of("+-0123456789.eE") != std::string::npos)
    return std::nullopt;  // no hex, inf or nan
  errno = 0;
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (errno == ERANGE || end != s.c_str() + s.size() || !std::isfinite(v)) return std::nullopt;
  return v;
}

// Throws unless `text` parses as the type of `d`'s member.
void value_check(const KeyDef& d, const std::string& text, const std::string& where) {
  const std::string head = where + ": " + d.name() + " = '" + text + "' is not ";
  std::visit(
      [&](auto ptr) {
        using T = std::decay_t<decltype(std::declval<TrainConfig>().*ptr)>;
        if constexpr (std::is_same_v<T, bool>) {
          if (!bool_parse(text)) throw std::invalid_argument(head + "a boolean (expected true or false)");
        } else if constexpr (std::is_same_v<T, int64_t>) {
          if (!int_parse(text))
            throw std::invalid_argument(head + "an integer (expected a whole number such as 8)");
        } else if constexpr (std::is_same_v<T, double>) {
          if (!double_parse(text))
            throw std::invalid_argument(head + "a number (expected a finite real such as 0.0001)");
        }
      },
      d.member);
}

void option_add(po::options_description& desc, const KeyDef& d, TrainConfig& c) {
  const std::string name = d.name();
  const std::string text = member_text(c, d.member);
  std::visit(
      [&](auto ptr) {
        using T = std::decay_t<decltype(c.*ptr)>;
        desc.add_options()(name.c_str(), po::value<T>(&(c.*ptr))->default_value(c.*ptr, text),
                           d.help);
      },
      d.member);
}

size_t levenshtein(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = up;
    }
  }
  return row[b.size()];
}

std::string bare_key(const std::string& name) {
  const size_t dot = name.rfind('.');
  return dot == std::string::npos ? name : name.substr(dot + 1);
}

// A key name from a file, quoted at most this long: a hostile file's megabyte-long "key" must
// neither flood the message nor drive the quadratic edit distance (no real key is near 64 chars).
constexpr size_t kMaxKeyQuoted = 64;

std::string unknown_key_message(const std::string& key) {
  const bool long_key = key.size() > kMaxKeyQuoted;
  const std::string shown = long_key ? key.substr(0, kMaxKeyQuoted) + "..." : key;
  return "unknown key '" + shown + "' (did you mean '" +
         config_nearest_key(long_key ? key.substr(0, kMaxKeyQuoted) : key) + "'?)";
}

// One line of an INI file as Boost reads it: '#' starts a comment anywhere, blanks are trimmed.
struct IniLine {
  int number;
  std::string text;
};

bool key_name_ok(const std::string& s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char ch) {
    return std::isalnum(static_cast<unsigned char>(ch)) || ch == '_' || ch == '.' || ch == '-';
  });
}

// Checks what Boost would reject without a line number (or accept silently): every line must be
// blank, a comment, "[section]" or "key = value" inside a section; no key set twice.
void ini_prescan(const std::string& path, const std::string& content) {
  std::istringstream in(content);
  std::string raw;
  std::string section;
  std::map<std::string, int> seen;  // "section.key" -> line
  for (int number = 1; std::getline(in, raw); ++number) {
    std::string s = raw;
    if (const size_t hash = s.find('#'); hash != std::string::npos) s.resize(hash);
    s = trim(s);
    if (s.empty()) continue;
    const std::string at = path + ":" + std::to_string(number) + ": ";
    if (s.front() == '[') {
      const std::string name = s.back() == ']' ? trim(s.substr(1, s.size() - 2)) : "";
      if (name.empty() || name.find('.') != std::string::npos || !key_name_ok(name))
        throw std::invalid_argument(at + "malformed section header '" + trim(raw) +
                                    "' (expected [model], [quantization], [finetuning], [data], "
                                    "[train], [dist] or [output])");
      section = name;
      continue;
    }
    const size_t eq = s.find('=');
    const std::string key = eq == std::string::npos ? "" : trim(s.substr(0, eq));
    if (!key_name_ok(key))
      throw std::invalid_argument(at + "malformed line '" + trim(raw) +
                                  "' (expected [section], key = value or a # comment)");
    if (section.empty()) {
      const std::string nearest = config_nearest_key(key);
      throw std::invalid_argument(at + "'" + trim(raw) +
                                  "' is outside any section (every key lives in a section: "
                                  "did you mean '" + bare_key(nearest) + "' under [" +
                                  nearest.substr(0, nearest.find('.')) + "]?)");
    }
    const std::string name = section + "." + key;
    const auto [it, inserted] = seen.emplace(name, number);
    if (!inserted)
      throw std::invalid_argument(at + name + " is set twice (first on line " +
                                  std::to_string(it->second) + ")");
  }
}

void fail_value(const std::string& where, const std::string& name, const std::string& value,
                const std::string& expected) {
  throw std::invalid_argument(where + ": " + name + " = " + value + " is out of range (expected " +
                              expected + ")");
}

void check_enum(const std::string& where, const std::string& name, const std::string& value,
                const std::vector<std::string>& allowed) {
  if (std::find(allowed.begin(), allowed.end(), value) != allowed.end()) return;
  std::string list;
  for (size_t i = 0; i < allowed.size(); ++i)
    list += (i == 0 ? "" : i + 1 == allowed.size() ? " or " : ", ") + allowed[i];
  throw std::invalid_argument(where + ": " + name + " = '" + value + "' is not allowed (expected " +
                              list + ")");
}

bool power_of_two(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// Allowed values of each key and the required keys. `where(name)` says where a key's value came
// from ("<file>" or "command line --name").
template <typename Where>
void config_validate(TrainConfig& c, const Where& where) {
  auto range = [&](const char* name, bool ok, const std::string& value, const char* expected) {
    if (!ok) fail_value(where(name), name, value, expected);
  };
  auto dtext = [](double v) { return double_text(v); };
  auto itext = [](int64_t v) { return std::to_string(v); };

  if (c.model_name_or_path.empty())
    throw std::invalid_argument(where("model.model_name_or_path") +
                                ": model.model_name_or_path is required (a Hugging Face model "
                                "directory or an HDF5 unit file)");
  check_enum(where("model.compute_dtype"), "model.compute_dtype", c.compute_dtype,
             {"auto", "bf16", "fp16", "fp32"});
  check_enum(where("model.device"), "model.device", c.device, {"auto", "cpu", "cuda"});

  if (c.quantization_bit != "4" && c.quantization_bit != "8" && c.quantization_bit != "none")
    throw std::invalid_argument(where("quantization.quantization_bit") +
                                ": Bitsandbytes only accepts 4-bit or 8-bit quantization "
                                "(quantization.quantization_bit = " + c.quantization_bit +
                                "; expected 4, 8 or none)");
  if (c.quantization_method != "bnb")
    throw std::invalid_argument(
        where("quantization.quantization_method") + ": quantization.quantization_method = '" +
        c.quantization_method +
        "': only bnb (bitsandbytes) quantizes on the fly; a pre-quantized model (GPTQ, AWQ, ...) "
        "is not supported, give the full-precision model as model.model_name_or_path instead");
  check_enum(where("quantization.quantization_type"), "quantization.quantization_type",
             c.quantization_type, {"nf4", "fp4"});
  range("quantization.quantization_blocksize",
        power_of_two(c.quantization_blocksize) && c.quantization_blocksize >= 32 &&
            c.quantization_blocksize <= 4096,
        itext(c.quantization_blocksize), "a power of two in [32, 4096]");
  check_enum(where("quantization.quant_storage"), "quantization.quant_storage", c.quant_storage,
             {"auto", "uint8", "bf16", "fp16", "fp32"});
  check_enum(where("quantization.quantization_device_map"), "quantization.quantization_device_map",
             c.quantization_device_map, {"none", "auto"});

  check_enum(where("finetuning.finetuning_type"), "finetuning.finetuning_type", c.finetuning_type,
             {"lora", "oft", "full", "freeze"});
  range("finetuning.lora_rank", c.lora_rank >= 1, itext(c.lora_rank), ">= 1");
  range("finetuning.lora_alpha", c.lora_alpha > 0, dtext(c.lora_alpha), "> 0");
  range("finetuning.lora_dropout", c.lora_dropout >= 0 && c.lora_dropout < 1,
        dtext(c.lora_dropout), "0 <= lora_dropout < 1");
  try {
    c.lora_targets = lora::lora_target_parse(c.lora_target);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(where("finetuning.lora_target") + ": finetuning.lora_target = '" +
                                c.lora_target + "': " + e.what());
  }

  range("data.cutoff_len", c.cutoff_len >= 2, itext(c.cutoff_len), ">= 2");
  check_enum(where("data.formatting"), "data.formatting", c.formatting,
             {"auto", "alpaca", "sharegpt", "openai", "text"});
  if (!c.template_name.empty())
    check_enum(where("data.template"), "data.template", c.template_name,
               {"default", "alpaca", "chatml", "qwen", "llama2", "llama3", "mistral", "smollm2",
                "empty"});
  if (c.mask_history && c.train_on_prompt)
    throw std::invalid_argument(where("data.mask_history") +
                                ": data.mask_history and data.train_on_prompt are both true: they "
                                "exclude each other (as in LLaMA-Factory)");
  if (c.neat_packing) c.packing = true;  // LLaMA-Factory: neat_packing implies packing
  range("data.max_samples", c.max_samples >= 0, itext(c.max_samples), ">= 0; 0 = all");
  range("data.val_size", c.val_size >= 0 && (c.val_size < 1 || c.val_size == std::floor(c.val_size)),
        dtext(c.val_size), "0, a fraction in (0, 1), or a whole number of samples");
  if (!c.dataset.empty() && !c.train_file.empty())
    throw std::invalid_argument(where("data.dataset") +
                                ": data.dataset and data.train_file are both set: give one (JSON "
                                "datasets are tokenized into the HDF5 format train_file holds)");
  if (!c.eval_dataset.empty() && !c.eval_file.empty())
    throw std::invalid_argument(where("data.eval_dataset") +
                                ": data.eval_dataset and data.eval_file are both set: give one");
  if (c.val_size > 0 && c.dataset.empty())
    throw std::invalid_argument(where("data.val_size") +
                                ": data.val_size needs data.dataset (it splits that dataset)");
  if (c.val_size > 0 && !c.eval_dataset.empty())
    throw std::invalid_argument(where("data.val_size") +
                                ": data.val_size and data.eval_dataset are both set: give one");
  if ((!c.dataset.empty() || !c.eval_dataset.empty()) && c.template_name.empty() &&
      c.formatting != "text")
    throw std::invalid_argument(
        where("data.template") +
        ": data.template is required with data.dataset (default | alpaca | chatml | qwen | llama2 "
        "| llama3 | mistral | smollm2 | empty), unless data.formatting = text");

  check_enum(where("train.stage"), "train.stage", c.stage, {"sft", "dpo"});
  check_enum(where("train.pref_loss"), "train.pref_loss", c.pref_loss,
             {"sigmoid", "ipo", "orpo", "simpo"});
  range("train.pref_beta", c.pref_beta > 0, dtext(c.pref_beta), "> 0");
  range("train.simpo_gamma", c.simpo_gamma >= 0, dtext(c.simpo_gamma), ">= 0");
  range("train.pref_ftx", c.pref_ftx >= 0, dtext(c.pref_ftx), ">= 0");
  range("train.dpo_label_smoothing", c.dpo_label_smoothing >= 0 && c.dpo_label_smoothing < 0.5,
        dtext(c.dpo_label_smoothing), "0 <= dpo_label_smoothing < 0.5");
  range("train.per_device_train_batch_size", c.per_device_train_batch_size >= 1,
        itext(c.per_device_train_batch_size), ">= 1");
  range("train.gradient_accumulation_steps", c.gradient_accumulation_steps >= 1,
        itext(c.gradient_accumulation_steps), ">= 1");
  range("train.learning_rate", c.learning_rate >= 0, dtext(c.learning_rate), ">= 0");
  check_enum(where("train.lr_scheduler_type"), "train.lr_scheduler_type", c.lr_scheduler_type,
             {"constant", "linear", "cosine"});
  range("train.warmup_ratio", c.warmup_ratio >= 0 && c.warmup_ratio <= 1, dtext(c.warmup_ratio),
        "0 <= warmup_ratio <= 1");
  range("train.warmup_steps", c.warmup_steps >= 0, itext(c.warmup_steps), ">= 0");
  range("train.max_steps", c.max_steps == -1 || c.max_steps >= 1, itext(c.max_steps),
        "-1 for num_train_epochs, or >= 1");
  range("train.num_train_epochs", c.num_train_epochs > 0 || c.max_steps > 0,
        dtext(c.num_train_epochs), "> 0 unless train.max_steps > 0");
  range("train.weight_decay", c.weight_decay >= 0, dtext(c.weight_decay), ">= 0");
  range("train.adam_beta1", c.adam_beta1 >= 0 && c.adam_beta1 < 1, dtext(c.adam_beta1),
        "0 <= adam_beta1 < 1");
  range("train.adam_beta2", c.adam_beta2 >= 0 && c.adam_beta2 < 1, dtext(c.adam_beta2),
        "0 <= adam_beta2 < 1");
  range("train.adam_epsilon", c.adam_epsilon > 0, dtext(c.adam_epsilon), "> 0");
  range("train.max_grad_norm", c.max_grad_norm >= 0, dtext(c.max_grad_norm),
        ">= 0; 0 = no clipping");
  range("train.seed", c.seed >= 0, itext(c.seed), ">= 0");
  range("train.eval_steps", c.eval_steps >= 0, itext(c.eval_steps), ">= 0; 0 = only at the end");
  range("train.max_skipped_steps", c.max_skipped_steps >= 1, itext(c.max_skipped_steps), ">= 1");
  if (!c.do_train && !c.do_eval)
    throw std::invalid_argument(where("train.do_train") +
                                ": train.do_train and train.do_eval are both false: nothing to do");
  if (c.do_train && c.train_file.empty() && c.dataset.empty())
    throw std::invalid_argument(where("data.train_file") +
                                ": data.train_file is required when train.do_train = true (an "
                                "HDF5 file with input_ids and labels), or data.dataset (JSON)");
  if (c.do_eval && c.eval_file.empty() && c.eval_dataset.empty() && c.val_size == 0)
    throw std::invalid_argument(where("data.eval_file") +
                                ": data.eval_file is required when train.do_eval = true (an HDF5 "
                                "file with input_ids and labels), or data.eval_dataset / "
                                "data.val_size");

  check_enum(where("dist.backend"), "dist.backend", c.backend, {"auto", "mpi", "nccl"});
  check_enum(where("dist.sharding"), "dist.sharding", c.sharding, {"full", "none"});
  range("dist.prefetch", c.prefetch >= 0 && c.prefetch <= 2, itext(c.prefetch), "0, 1 or 2");
  range("dist.timeout_s", c.timeout_s > 0 && std::isfinite(c.timeout_s), dtext(c.timeout_s),
        "> 0 seconds");

  if (c.output_dir.empty())
    throw std::invalid_argument(where("output.output_dir") +
                                ": output.output_dir is required (the directory for the adapter, "
                                "checkpoints and logs)");
  range("output.logging_steps", c.logging_steps >= 1, itext(c.logging_steps), ">= 1");
  range("output.save_steps", c.save_steps >= 0, itext(c.save_steps), ">= 0; 0 = only at the end");
  range("output.save_total_limit", c.save_total_limit >= 0, itext(c.save_total_limit),
        ">= 0; 0 = keep all");
  if (trim(c.resume_from_checkpoint).empty())
    throw std::invalid_argument(where("output.resume_from_checkpoint") +
                                ": output.resume_from_checkpoint is empty (expected auto, none or "
                                "a checkpoint directory)");
  const std::vector<std::string> reports = split_commas(c.report_to);
  for (const std::string& r : reports) {
    if (r != "jsonl" && r != "tensorboard" && r != "none")
      throw std::invalid_argument(where("output.report_to") + ": output.report_to = '" +
                                  c.report_to + "': '" + r +
                                  "' is not allowed (expected a comma list of jsonl, tensorboard, "
                                  "or none)");
    if (r == "none" && reports.size() > 1)
      throw std::invalid_argument(where("output.report_to") + ": output.report_to = '" +
                                  c.report_to + "': 'none' cannot be combined with other targets");
  }
}

}  // namespace

std::string config_device(const TrainConfig& c) {
  if (c.device == "cuda" || (c.device == "auto" && c.gpus_visible > 0)) return "cuda";
  return "cpu";
}

std::string config_compute_dtype(const TrainConfig& c) {
  if (c.compute_dtype != "auto") return c.compute_dtype;
  if (config_device(c) == "cuda") return "bf16";
  return *kernels::cpu_bf16_feature() != '\0' ? "bf16" : "fp32";
}

std::string config_compute_dtype_reason(const TrainConfig& c) {
  const std::string d = config_compute_dtype(c);
  if (c.compute_dtype != "auto") return "compute dtype: " + d + " (model.compute_dtype = " + d + ")";
  if (config_device(c) == "cuda")
    return "compute dtype: bf16 (model.compute_dtype = auto on cuda)";
  const std::string feature = kernels::cpu_bf16_feature();
  return "compute dtype: " + d + " (model.compute_dtype = auto: this CPU " +
         (feature.empty() ? "has neither AVX512_BF16 nor AMX-BF16" : "has " + feature) + ")";
}

std::vector<std::string> config_split_list(const std::string& list) { return split_commas(list); }

const std::vector<ConfigKey>& config_keys() {
  static const std::vector<ConfigKey> keys = [] {
    const TrainConfig defaults;
    std::vector<ConfigKey> out;
    for (const KeyDef& d : key_defs()) out.push_back({d.name(), member_text(defaults, d.member), d.help});
    return out;
  }();
  return keys;
}

TrainConfig config_read(const std::string& ini_path,
                        const std::vector<std::pair<std::string, std::string>>& overrides) {
  TrainConfig config;
  config.config_path = ini_path;
  po::options_description desc("qlora_dist configuration");
  for (const KeyDef& d : key_defs()) option_add(desc, d, config);

  std::map<std::string, std::string> where_of;  // "section.key" -> where its value came from
  auto where = [&](const std::string& name) {
    const auto it = where_of.find(name);
    if (it != where_of.end()) return it->second;
    return ini_path.empty() ? std::string("command line") : ini_path;
  };

  // Command line first: Boost's store() keeps the first value stored for a key.
  po::parsed_options from_command_line(&desc);
  std::map<std::string, std::string> override_values;  // the last of repeated overrides wins
  for (const auto& [raw_key, raw_value] : overrides) {
    std::string key = trim(raw_key);
    if (key.rfind("--", 0) == 0) key = key.substr(2);
    const std::string at = "command line --" + key;
    const KeyDef* d = key_def_find(key);
    if (d == nullptr) throw std::invalid_argument(at + ": " + unknown_key_message(key));
    const std::string value = trim(raw_value);
    value_check(*d, value, at);
    override_values[key] = value;
    where_of[key] = at;
  }
  for (const auto& [key, value] : override_values)
    from_command_line.options.emplace_back(key, std::vector<std::string>{value});

  po::variables_map vm;
  try {
    po::store(from_command_line, vm);
  } catch (const po::error& e) {
    throw std::invalid_argument("command line: " + std::string(e.what()));
  }

  if (!ini_path.empty()) {
    std::ifstream in(ini_path, std::ios::binary);
    if (!in) throw std::invalid_argument(ini_path + ": cannot open (" + std::strerror(errno) + ")");
    const std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    ini_prescan(ini_path, content);
    std::istringstream text(content);
    po::parsed_options from_file(&desc);
    try {
      from_file = po::parse_config_file(text, desc, /*allow_unregistered=*/true);
    } catch (const po::error& e) {
      throw std::invalid_argument(ini_path + ": " + e.what());
    }
    std::string unknown;
    size_t unknown_count = 0;  // the first kMaxUnknownListed are named
    constexpr size_t kMaxUnknownListed = 5;
    for (const po::option& opt : from_file.options) {
      if (opt.unregistered) {
        if (++unknown_count <= kMaxUnknownListed)
          unknown += (unknown.empty() ? "" : "; ") + unknown_key_message(opt.string_key);
        continue;
      }
      if (override_values.count(opt.string_key) == 0) {
        value_check(*key_def_find(opt.string_key), opt.value.empty() ? "" : opt.value.front(),
                    ini_path);
        where_of[opt.string_key] = ini_path;
      }
    }
    if (unknown_count > kMaxUnknownListed)
      unknown += "; and " + std::to_string(unknown_count - kMaxUnknownListed) + " more unknown keys";
    if (!unknown.empty()) throw std::invalid_argument(ini_path + ": " + unknown);
    try {
      po::store(from_file, vm);
    } catch (const po::error& e) {
      throw std::invalid_argument(ini_path + ": " + e.what());
    }
  }
  try {
    po::notify(vm);
  } catch (const po::error& e) {
    throw std::invalid_argument(where("") + ": " + e.what());
  }

  config_validate(config, where);
  return config;
}

std::string config_to_ini(const TrainConfig& config) {
  std::string out;
  std::string section;
  for (const KeyDef& d : key_defs()) {
    if (section != d.section) {
      out += (section.empty() ? "[" : "\n[") + std::string(d.section) + "]\n";
      section = d.section;
    }
    const std::string value = member_text(config, d.member);
    out += std::string(d.key) + (value.empty() ? " =\n" : " = " + value + "\n");
  }
  return out;
}

std::string config_help() {
  constexpr size_t kWidth = 96;
  constexpr const char* kIndent = "      ";
  std::string out =
      "Configuration keys: set in the INI file under their [section] as key = value, or on the\n"
      "command line as --section.key=value (command line over file over defaults).\n";
  std::string section;
  const std::vector<ConfigKey>& keys = config_keys();
  for (size_t i = 0; i < keys.size(); ++i) {
    const KeyDef& d = key_defs()[i];
    if (section != d.section) {
      out += "\n[" + std::string(d.section) + "]\n";
      section = d.section;
    }
    const ConfigKey& k = keys[i];
    out += "  --" + k.name +
           (k.default_value.empty() ? std::string(" (default: empty)")
                                    : " (default: " + k.default_value + ")") +
           "\n";
    std::string line = kIndent;  // the help, wrapped at kWidth columns
    std::istringstream words(k.help);
    std::string word;
    bool first = true;
    while (words >> word) {
      if (!first && line.size() + 1 + word.size() > kWidth) {
        out += line + "\n";
        line = kIndent;
        first = true;
      }
      line += (first ? "" : " ") + word;
      first = false;
    }
    out += line + "\n";
  }
  return out;
}

std::string config_nearest_key(const std::string& key) {
  const std::string query = lower(trim(key));
  const std::string query_bare = bare_key(query);
  std::string best;
  size_t best_distance = std::string::npos;
  for (const KeyDef& d : key_defs()) {
    const std::string name = d.name();
    // The whole name, or only the part after the section (a key put in the wrong section, one
    // more edit unless the section is the one given).
    const bool same_section = query.rfind(std::string(d.section) + ".", 0) == 0;
    // A part of a key ("rank", "epochs") counts as one edit: plain edit distance would prefer
    // any short key ("seed") to the longer one it names.
    const std::string key = d.key;
    const size_t key_distance = query_bare.size() >= 3 && key.find(query_bare) != std::string::npos
                                    ? std::min<size_t>(1, levenshtein(query_bare, key))
                                    : levenshtein(query_bare, key);
    const size_t distance =
        std::min(levenshtein(query, name), key_distance + (same_section ? 0 : 1));
    if (distance < best_distance) {
      best_distance = distance;
      best = name;
    }
  }
  return best;
}

std::vector<std::string> config_guards(const TrainConfig& c, int world_size) {
  if (world_size < 1)
    throw std::invalid_argument("config_guards: world_size = " + std::to_string(world_size) +
                                " (expected >= 1)");
  std::vector<std::string> warnings;
  const bool quantized = c.quantization_bit == "4" || c.quantization_bit == "8";

  // Preference training: keys that do not combine.
  if (c.stage == "dpo" && c.dpo_label_smoothing > 0 &&
      (c.pref_loss == "ipo" || c.pref_loss == "orpo"))
    throw std::invalid_argument("train.dpo_label_smoothing applies to pref_loss = sigmoid or "
                                "simpo, not " + c.pref_loss);
  if (c.stage == "dpo" && (c.packing || c.neat_packing))
    throw std::invalid_argument("data.packing does not apply to train.stage = dpo (each pair is "
                                "one row of chosen and one of rejected tokens)");

  if (c.quantization_method == "bnb" && !quantized && c.quantization_bit != "none")
    throw std::invalid_argument(
        "Bitsandbytes only accepts 4-bit or 8-bit quantization (quantization.quantization_bit = " +
        c.quantization_bit + ")");
  if (c.quantization_method != "bnb")
    throw std::invalid_argument(
        "quantization.quantization_method = '" + c.quantization_method +
        "': only bnb (bitsandbytes) quantizes on the fly; a pre-quantized model (GPTQ, AWQ, ...) "
        "is not supported, give the full-precision model as model.model_name_or_path instead");

  // Fine-tuning method (LLaMA-Factory: hparams/parser.py).
  if (quantized && c.finetuning_type != "lora" && c.finetuning_type != "oft")
    throw std::invalid_argument(
        "Quantization is only compatible with the LoRA or OFT method (finetuning.finetuning_type "
        "= " + c.finetuning_type + ")");
  if (c.finetuning_type == "full" || c.finetuning_type == "freeze")
    throw std::invalid_argument("finetuning.finetuning_type = " + c.finetuning_type +
                                " is not supported: qlora_dist trains LoRA adapters");
  if (c.finetuning_type == "oft")
    throw std::invalid_argument("finetuning.finetuning_type = oft is not yet supported; use lora");
  if (c.finetuning_type != "lora")
    throw std::invalid_argument("finetuning.finetuning_type = '" + c.finetuning_type +
                                "' is not allowed (expected lora)");

  if (quantized) {
    size_t adapters = 0;
    for (const std::string& a : split_commas(c.adapter_name_or_path)) adapters += !a.empty();
    if (adapters > 1)
      throw std::invalid_argument(
          "Quantized model only accepts a single adapter. Merge them first. "
          "(model.adapter_name_or_path = " + c.adapter_name_or_path + ")");
    if (c.resize_vocab)
      throw std::invalid_argument(
          "Cannot resize embedding layers of a quantized model. (model.resize_vocab = true)");
    if (c.pissa_init)
      throw std::invalid_argument(
          "Cannot initialize PiSSA adapter on quantized models. (finetuning.pissa_init = true)");
    if (c.create_new_adapter)
      throw std::invalid_argument(
          "Cannot create new adapter upon a quantized model. (model.create_new_adapter = true)");
  }
  if (c.quantization_device_map == "auto" && c.do_train)
    throw std::invalid_argument(
        "A device map of 'auto' is for inference only; remove "
        "quantization.quantization_device_map for training.");

  // Bit widths the trainer has a path for (LLaMA-Factory: model_utils/quantization.py).
  if (c.quantization_bit == "8" && world_size > 1 && c.sharding == "full")
    throw std::invalid_argument(
        "Only 4-bit quantized model can use fsdp+qlora (quantization.quantization_bit = 8 with "
        "dist.sharding = full on " + std::to_string(world_size) + " ranks)");
  if (c.quantization_bit == "8")
    throw std::invalid_argument(
        "8-bit (LLM.int8) training is not supported yet; use quantization.quantization_bit = 4");
  if (c.quantization_bit == "none")
    throw std::invalid_argument(
        "quantization.quantization_bit = none is not supported yet: qlora_dist always trains "
        "LoRA on a 4-bit base; use quantization.quantization_bit = 4");

  // Devices and backends this build can run.
#ifdef QLORA_HAVE_NCCL
  constexpr bool kHaveCuda = true;
#else
  constexpr bool kHaveCuda = false;
#endif
  if (c.device == "cuda" && !kHaveCuda)
    throw std::invalid_argument(
        "model.device = cuda: this build has no CUDA (configured without nvcc); use model.device "
        "= cpu or auto");
  if (c.backend == "nccl" && !kHaveCuda)
    throw std::invalid_argument(
        "dist.backend = nccl: this build has no NCCL (configured without CUDA); use dist.backend "
        "= mpi or auto");
  if (c.device == "cuda" && c.gpus_visible <= 0)
    throw std::invalid_argument(
        "model.device = cuda: no GPU visible on this node (" +
        (c.gpus_reason.empty() ? std::string("none found") : c.gpus_reason) +
        "); use model.device = cpu, or auto to train on GPUs where there are some");
  if (c.backend == "nccl" && config_device(c) != "cuda")
    throw std::invalid_argument("dist.backend = nccl needs GPUs (model.device = " + c.device +
                                (c.device == "auto" ? ", no GPU visible" : "") +
                                "); use dist.backend = mpi or auto");

  // Warnings.
  if (c.do_eval && !c.do_train && quantized)
    warnings.push_back("Evaluating model in 4/8-bit mode may cause lower scores.");
  const std::string compute = config_compute_dtype(c);
  if (quantized && c.quant_storage != "auto" && c.quant_storage != compute)
    warnings.push_back("quantization.quant_storage " + c.quant_storage + " -> " +
                       compute +
                       ": in distributed mode the 4-bit storage dtype must equal the compute "
                       "dtype (FSDP+QLoRA); corrected");
  if (c.lora_dropout > 0 && world_size > 1)
    warnings.push_back("finetuning.lora_dropout = " + double_text(c.lora_dropout) + " on " +
                       std::to_string(world_size) +
                       " ranks: dropout masks are drawn per rank, so runs at different world "
                       "sizes give different (equally valid) losses");
  return warnings;
}

}  // namespace qlora::app
