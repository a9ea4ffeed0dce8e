// Learning-rate schedules: see lr_schedule.h.
#include "train/lr_schedule.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace qlora::train {

LrSchedulerType lr_scheduler_from_name(const std::string& name) {
  if (name == "constant") return LrSchedulerType::constant;
  if (name == "linear") return LrSchedulerType::linear;
  if (name == "cosine") return LrSchedulerType::cosine;
  throw std::invalid_argument("lr_scheduler_type '" + name + "' (expected constant, linear or cosine)");
}

const char* lr_scheduler_name(LrSchedulerType type) {
  switch (type) {
    case LrSchedulerType::constant: return "constant";
    case LrSchedulerType::linear: return "linear";
    case LrSchedulerType::cosine: return "cosine";
  }
  throw std::invalid_argument("lr_scheduler_name: unknown LrSchedulerType " +
                              std::to_string(static_cast<int>(type)));
}

int64_t lr_warmup_steps(const LrSchedule& s, int64_t total) {
  if (s.warmup_steps > 0) return s.warmup_steps;
  return static_cast<int64_t>(std::ceil(s.warmup_ratio * static_cast<double>(total)));
}

double lr_at(const LrSchedule& s, int64_t step, int64_t total) {
  const int64_t warmup = lr_warmup_steps(s, total);
  // lr * (step / warmup), in transformers' order (its LambdaLR multiplies lr by the factor).
  if (step < warmup)
    return s.learning_rate *
           (static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, warmup)));
  const double decay_steps = static_cast<double>(std::max<int64_t>(1, total - warmup));
  switch (s.type) {
    case LrSchedulerType::constant:
      return s.learning_rate;
    case LrSchedulerType::linear:
      return s.learning_rate * std::max(0.0, static_cast<double>(total - step) / decay_steps);
    case LrSchedulerType::cosine: {
      const double progress = static_cast<double>(step - warmup) / decay_steps;
      return s.learning_rate * std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * progress)));
    }
  }
  throw std::invalid_argument("lr_at: unknown LrSchedulerType " + std::to_string(static_cast<int>(s.type)));
}

}  // namespace qlora::train
