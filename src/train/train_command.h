// `qlora_dist [train] config.ini [--section.key=value ...]` and `qlora_dist eval config.ini`:
// the application around the sharded trainer. Configuration and guards (agreed on by every rank
// before any heavy work), the output directory rules, resume, the step loop with its learning-
// rate schedule, evaluation, metrics.jsonl and the progress line, checkpoints:
//   output_dir/checkpoint-<step>/  adapter_config.json, adapter_model.safetensors (PEFT, whole),
//                                  optimizer/rank<r>.h5 (AdamW moments of rank r's shards),
//                                  trainer_state.json (step, scheduler, data position, seed),
//                                  config.ini (resolved)
//   written as .checkpoint-<step>.tmp and renamed when every rank has written its part.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "train/config.h"

namespace qlora::train {

// HF Trainer's schedules (get_{constant,linear,cosine}_schedule_with_warmup): the learning rate
// of optimizer step `step` (0-based) out of `total`:
//   warmup: lr * step / warmup;  then constant: lr;  linear: lr * (total - step) / (total - warmup);
//   cosine: lr * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))
// warmup = warmup_steps if > 0 else ceil(warmup_ratio * total).
double lr_at(const TrainConfig& config, int64_t step, int64_t total);
int64_t warmup_steps_of(const TrainConfig& config, int64_t total);

// Exit status after SIGTERM / SIGUSR1 / SIGINT: every rank finished the current step and a
// complete checkpoint was written; a batch script requeues on it (EX_TEMPFAIL).
constexpr int kExitPreempted = 75;

// Runs the command; MPI is initialized inside. Returns the process exit status (0, 1 for errors
// in what the user handed us, 2 for usage errors). `command` is "train" or "eval".
int train_command_main(const std::string& command, const std::vector<std::string>& args,
                       int* argc, char*** argv);

}  // namespace qlora::train
