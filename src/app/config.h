// The training configuration: one INI file (sections = [model], [quantization], [finetuning],
// [data], [train], [dist], [output]) read with Boost.Program_options, every key overridable on
// the command line as --section.key=value (command line over file over defaults). Unknown keys
// are errors naming the nearest known key. Key names follow LLaMA-Factory / PEFT / HF Trainer.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace qlora::app {

struct TrainConfig {
  // [model]
  std::string model_name_or_path;    // HF directory or HDF5 unit file (required)
  std::string adapter_name_or_path;  // "" = none; a comma list = several (rejected when quantized)
  std::string tokenizer_name_or_path;  // "" = model_name_or_path (tokenizer.json, tokenizer_config.json)
  std::string compute_dtype = "auto";  // auto | bf16 | fp16 | fp32 (auto: see config_compute_dtype)
  std::string device = "auto";         // auto | cpu | cuda
  // Not a key: what this process sees of GPUs (set by the app from dist::gpus_visible() before
  // the guards; 0 in tests and tools that do not ask). Decides model.device = auto.
  int gpus_visible = 0;
  std::string gpus_reason;  // why none is visible
  bool upcast_layernorm = false;
  bool resize_vocab = false;
  bool create_new_adapter = false;
  // [quantization]
  std::string quantization_bit = "4";  // 4 | 8 | none
  std::string quantization_method = "bnb";
  std::string quantization_type = "nf4";  // nf4 | fp4
  bool double_quantization = true;
  int64_t quantization_blocksize = 64;
  std::string quant_storage = "auto";  // auto | uint8 | bf16 | fp16 | fp32
  std::string quantization_device_map = "none";  // none | auto ("auto" is inference only)
  // [finetuning]
  std::string finetuning_type = "lora";  // lora | oft | full | freeze
  int64_t lora_rank = 8;
  double lora_alpha = 16.0;
  double lora_dropout = 0.0;
  std::string lora_target = "all";
  std::vector<std::string> lora_targets;  // lora_target parsed (by config_read; not a key)
  bool use_rslora = false;
  bool pissa_init = false;
  // [data]
  std::string train_file;  // HDF5: input_ids, labels int32 [rows, seq]
  std::string eval_file;   // "" = no evaluation data
  std::string dataset;       // comma list of JSON / JSONL files (tokenized on rank 0)
  std::string eval_dataset;  // comma list of JSON / JSONL files for evaluation
  std::string template_name;  // key data.template: default | alpaca | chatml | ... | empty
  std::string formatting = "auto";  // auto | alpaca | sharegpt | openai | text
  int64_t cutoff_len = 1024;
  bool train_on_prompt = false;
  bool mask_history = false;
  bool packing = false;
  bool neat_packing = false;
  int64_t max_samples = 0;  // 0 = all
  double val_size = 0.0;    // < 1: fraction, >= 1: number of samples held out for evaluation
  std::string tokenized_path;  // "" = output_dir/data/<key>
  bool dataset_skip_bad = false;
  // [train]
  std::string stage = "sft";         // sft | dpo (LLaMA-Factory's names)
  double pref_beta = 0.1;            // DPO beta (ORPO lambda, SimPO beta)
  std::string pref_loss = "sigmoid";  // sigmoid | ipo | orpo | simpo
  double simpo_gamma = 0.5;          // SimPO target reward margin
  double pref_ftx = 0.0;             // weight of an SFT term on the chosen answers
  double dpo_label_smoothing = 0.0;  // cDPO: probability that a pair's labels are flipped
  int64_t per_device_train_batch_size = 1;
  int64_t gradient_accumulation_steps = 1;
  double learning_rate = 1e-4;
  std::string lr_scheduler_type = "linear";  // constant | linear | cosine
  double warmup_ratio = 0.0;
  int64_t warmup_steps = 0;  // > 0 wins over warmup_ratio (as in HF Trainer)
  double num_train_epochs = 3.0;
  int64_t max_steps = -1;  // > 0 wins over num_train_epochs
  double weight_decay = 0.0;
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.999;
  double adam_epsilon = 1e-8;
  double max_grad_norm = 1.0;
  int64_t seed = 42;
  bool gradient_checkpointing = true;  // false: keep every block's activations, no recompute
  bool disable_gradient_checkpointing = false;  // LLaMA-Factory's name: true = the above false
  bool do_train = true;
  bool do_eval = false;
  int64_t eval_steps = 0;  // 0 = only at the end
  int64_t max_skipped_steps = 10;  // non-finite steps in a row that stop the run
  // [dist]
  std::string backend = "auto";  // auto | mpi | nccl
  std::string sharding = "full";  // full | none
  int64_t prefetch = 1;           // 0 | 1 | 2
  double timeout_s = 600.0;       // watchdog: the longest wait for a collective
  // [output]
  std::string output_dir;  // required
  int64_t logging_steps = 10;
  int64_t save_steps = 0;  // 0 = only at the end
  int64_t save_total_limit = 0;  // 0 = keep all
  std::string resume_from_checkpoint = "auto";  // auto | none | PATH
  std::string report_to = "jsonl";  // comma list of jsonl, tensorboard, none
  bool overwrite_output_dir = false;

  std::string config_path;  // the INI it was read from ("" when none)
};

// One key: "section.key", its default as text, and its meaning (for --help and the README).
struct ConfigKey {
  std::string name;
  std::string default_value;
  std::string help;
};
const std::vector<ConfigKey>& config_keys();

// Reads `ini_path` (may be "" for defaults + command line only) and applies `overrides`
// ("--section.key=value" or "--section.key value" pairs already split by the caller into
// {"section.key", "value"}). Throws std::invalid_argument with one line naming the file, line
// or option, the key and what would be right: malformed INI, unknown key ("did you mean
// 'train.learning_rate'?"), a value of the wrong type, a value out of range (negative sizes,
// unknown enum value, dropout outside [0, 1), ...), a missing required key.
TrainConfig config_read(const std::string& ini_path,
                        const std::vector<std::pair<std::string, std::string>>& overrides);

// The resolved configuration as INI text (every key, sections in order): printed by rank 0 and
// written to output_dir; reading it back gives the same TrainConfig.
std::string config_to_ini(const TrainConfig& config);

// --help text: every key with its default and meaning, grouped by section.
std::string config_help();

// The one decision of device and compute dtype: model.device (auto -> cuda where a GPU is
// visible, TrainConfig::gpus_visible, else cpu) and
// model.compute_dtype (auto -> bf16 on cuda; on the cpu bf16 where it has AVX512_BF16 or
// AMX-BF16, checked at run time, else fp32) as "cpu" | "cuda" and "fp32" | "bf16" | "fp16". The
// guards, the printed configuration and the engine's options all use these.
std::string config_device(const TrainConfig& config);
std::string config_compute_dtype(const TrainConfig& config);
// One line for the log: the compute dtype and why, e.g. "compute dtype: bf16 (model.compute_dtype
// = auto: this CPU has AVX512_BF16)".
std::string config_compute_dtype_reason(const TrainConfig& config);

// A comma list ("jsonl, tensorboard") as trimmed items.
std::vector<std::string> config_split_list(const std::string& list);

// The nearest known key to `key` (edit distance), for "did you mean" messages.
std::string config_nearest_key(const std::string& key);

// Guards of DESIGN.md section 5 that depend on the configuration alone (the model's own
// quantization method is checked where it is read). Throws std::invalid_argument with the
// message the Python tools use, e.g. "Quantization is only compatible with the LoRA or OFT
// method (finetuning_type = full)". Returns warnings to log (e.g. the 4/8-bit evaluation warning,
// quant_storage corrected to the compute dtype).
std::vector<std::string> config_guards(const TrainConfig& config, int world_size);

}  // namespace qlora::app
