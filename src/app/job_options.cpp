// TrainConfig -> typed engine options: see job_options.h.
#include "app/job_options.h"

#include <stdexcept>

#include "lora/lora_target.h"
#include "quant/quantize.h"

namespace qlora::app {

dist::Device device_of(const TrainConfig& c) {
  const std::string d = config_device(c);
  if (d == "cpu") return dist::Device::cpu;
  if (d == "cuda") return dist::Device::cuda;
  throw std::invalid_argument("model.device '" + d + "' (expected auto, cpu or cuda)");
}

at::ScalarType compute_dtype_of(const TrainConfig& c) {
  const std::string d = config_compute_dtype(c);
  if (d == "fp32") return at::kFloat;
  if (d == "bf16") return at::kBFloat16;
  if (d == "fp16") return at::kHalf;
  throw std::invalid_argument("model.compute_dtype '" + d + "' (expected auto, bf16, fp16 or fp32)");
}

namespace {

train::ReportTo report_to_of(const std::string& list) {
  train::ReportTo r{false, false};
  for (const std::string& name : config_split_list(list)) {
    if (name == "jsonl") r.jsonl = true;
    else if (name == "tensorboard") r.tensorboard = true;
    else if (name == "none") continue;
    else throw std::invalid_argument("output.report_to: '" + name + "' (expected jsonl, tensorboard or none)");
  }
  return r;
}

train::Sharding sharding_of(const std::string& name) {
  if (name == "full") return train::Sharding::full;
  if (name == "none") return train::Sharding::none;
  throw std::invalid_argument("dist.sharding '" + name + "' (expected full or none)");
}

}  // namespace

train::JobOptions job_options(const TrainConfig& c) {
  train::JobOptions o;
  o.model_path = c.model_name_or_path;
  o.adapter_path = c.adapter_name_or_path;

  train::TrainerOptions& t = o.trainer;
  t.sharding = sharding_of(c.sharding);
  t.prefetch = static_cast<int>(c.prefetch);
  t.max_grad_norm = c.max_grad_norm;
  t.adam.beta1 = c.adam_beta1;
  t.adam.beta2 = c.adam_beta2;
  t.adam.eps = c.adam_epsilon;
  t.adam.weight_decay = c.weight_decay;
  t.seed = static_cast<uint64_t>(c.seed);
  t.lora.rank = c.lora_rank;
  t.lora.alpha = c.lora_alpha;
  t.lora.dropout = c.lora_dropout;
  t.lora.use_rslora = c.use_rslora;
  t.targets = c.lora_targets.empty() ? lora::lora_target_parse(c.lora_target) : c.lora_targets;
  t.upcast_layernorm = c.upcast_layernorm;
  t.gradient_checkpointing = c.gradient_checkpointing && !c.disable_gradient_checkpointing;
  t.quant.quant_type = quant::quant_type_from_name(c.quantization_type);
  t.quant.blocksize = static_cast<int32_t>(c.quantization_blocksize);
  t.quant.double_quant = c.double_quantization;
  t.preference = c.stage == "dpo";
  t.pref.loss = train::pref_loss_from_name(c.pref_loss);
  t.pref.beta = c.pref_beta;
  t.pref.simpo_gamma = c.simpo_gamma;
  t.pref.ftx = c.pref_ftx;
  t.pref.label_smoothing = c.dpo_label_smoothing;

  o.schedule.learning_rate = c.learning_rate;
  o.schedule.type = train::lr_scheduler_from_name(c.lr_scheduler_type);
  o.schedule.warmup_steps = c.warmup_steps;
  o.schedule.warmup_ratio = c.warmup_ratio;

  o.loop.per_device_batch = c.per_device_train_batch_size;
  o.loop.accumulation = c.gradient_accumulation_steps;
  o.loop.max_steps = c.max_steps;
  o.loop.num_train_epochs = c.num_train_epochs;
  o.loop.do_train = c.do_train;
  o.loop.do_eval = c.do_eval;
  o.loop.eval_steps = c.eval_steps;
  o.loop.max_skipped_steps = c.max_skipped_steps;
  o.comm_timeout_s = c.timeout_s;

  train::OutputOptions& out = o.output;
  out.dir = c.output_dir;
  out.logging_steps = c.logging_steps;
  out.save_steps = c.save_steps;
  out.save_total_limit = c.save_total_limit;
  if (c.resume_from_checkpoint == "auto") {
    out.resume = train::ResumeMode::auto_latest;
  } else if (c.resume_from_checkpoint == "none") {
    out.resume = train::ResumeMode::none;
  } else {
    out.resume = train::ResumeMode::path;
    out.resume_path = c.resume_from_checkpoint;
  }
  out.report_to = report_to_of(c.report_to);
  out.overwrite = c.overwrite_output_dir;
  o.config_ini = config_to_ini(c);
  return o;
}

data::PrepareOptions prepare_options(const TrainConfig& c) {
  data::PrepareOptions o;
  if (!c.dataset.empty()) o.dataset = config_split_list(c.dataset);
  if (!c.eval_dataset.empty()) o.eval_dataset = config_split_list(c.eval_dataset);
  o.model_dir = c.tokenizer_name_or_path.empty() ? c.model_name_or_path : c.tokenizer_name_or_path;
  o.template_name = c.template_name;
  o.formatting = c.formatting;
  o.cutoff_len = c.cutoff_len;
  o.train_on_prompt = c.train_on_prompt;
  o.mask_history = c.mask_history;
  o.packing = c.packing || c.neat_packing;
  o.neat_packing = c.neat_packing;
  o.max_samples = c.max_samples;
  o.val_size = c.val_size;
  o.seed = static_cast<uint64_t>(c.seed);
  o.skip_bad = c.dataset_skip_bad;
  o.pairwise = c.stage == "dpo";
  return o;
}

}  // namespace qlora::app
