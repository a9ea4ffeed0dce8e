// Hugging Face Trainer's learning-rate schedules (transformers.get_scheduler with
// get_{constant,linear,cosine}_schedule_with_warmup): the rate of optimizer step `step`
// (0-based) out of `total`:
//   warmup: lr * step / warmup;  then constant: lr;  linear: lr * (total - step) / (total - warmup);
//   cosine: lr * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))
// warmup = warmup_steps if > 0 else ceil(warmup_ratio * total).
#pragma once

#include <cstdint>
#include <string>

namespace qlora::train {

enum class LrSchedulerType { constant, linear, cosine };

// "constant" | "linear" | "cosine"; anything else throws std::invalid_argument naming it.
LrSchedulerType lr_scheduler_from_name(const std::string& name);
const char* lr_scheduler_name(LrSchedulerType type);

struct LrSchedule {
  double learning_rate = 1e-4;
  LrSchedulerType type = LrSchedulerType::linear;
  int64_t warmup_steps = 0;  // > 0 wins over warmup_ratio (as in HF Trainer)
  double warmup_ratio = 0.0;
};

int64_t lr_warmup_steps(const LrSchedule& schedule, int64_t total);
double lr_at(const LrSchedule& schedule, int64_t step, int64_t total);

}  // namespace qlora::train
