// The checked configuration turned into the engine's typed options, once: enums instead of
// strings, the device and compute dtype decided in one place (used by the guards, the printed
// configuration and the engine alike).
#pragma once

#include <ATen/core/ScalarType.h>

#include "app/config.h"
#include "data/prepare.h"
#include "dist/device_context.h"
#include "train/job.h"

namespace qlora::app {

// config_device and config_compute_dtype as the engine's types.
dist::Device device_of(const TrainConfig& config);
at::ScalarType compute_dtype_of(const TrainConfig& config);

// Every option of the engine; `config_ini` is the resolved configuration as written to
// output_dir and each checkpoint.
train::JobOptions job_options(const TrainConfig& config);

// The data keys as the options of data::prepare_write (model.model_name_or_path holds the
// tokenizer files; train.seed seeds the validation split).
data::PrepareOptions prepare_options(const TrainConfig& config);

}  // namespace qlora::app
