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
#include "train/lr_schedule.h"

namespace qlora::train {

// The schedule of the configuration ([train] learning_rate, lr_scheduler_type, warmup_*).
LrSchedule lr_schedule_of(const TrainConfig& config);

// Exit status after SIGTERM / SIGUSR1 / SIGINT: every rank finished the current step and a
// complete checkpoint was written; a batch script requeues on it (EX_TEMPFAIL).
constexpr int kExitPreempted = 75;

// Runs the command; MPI is initialized inside. Returns the process exit status (0, 1 for errors
// in what the user handed us, 2 for usage errors). `command` is "train" or "eval".
int train_command_main(const std::string& command, const std::vector<std::string>& args,
                       int* argc, char*** argv);

}  // namespace qlora::train
