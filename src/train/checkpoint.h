// The output directory of a run and its checkpoints:
//   output_dir/checkpoint-<step>/  adapter_config.json, adapter_model.safetensors (PEFT, whole),
//                                  optimizer/rank<r>.h5 (AdamW moments of rank r's shards),
//                                  trainer_state.json (step, global batch, world size, seed,
//                                  next learning rate), config.ini (the resolved configuration)
// written as .checkpoint-<step>.tmp by every rank and renamed by rank 0 once every rank has
// written its part, so a crash never damages the last complete checkpoint. Optimizer moments
// are stored as byte ranges of each LoRA unit's payload, which does not depend on the world
// size: a checkpoint written by N ranks resumes on M.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "dist/communicator.h"
#include "train/metrics.h"
#include "train/trainer.h"

namespace qlora::train {

enum class ResumeMode { auto_latest, none, path };

struct OutputOptions {
  std::filesystem::path dir;
  int64_t logging_steps = 10;
  int64_t save_steps = 0;        // 0: only at the end
  int64_t save_total_limit = 0;  // 0: keep all
  ResumeMode resume = ResumeMode::auto_latest;
  std::filesystem::path resume_path;  // with ResumeMode::path
  ReportTo report_to;
  bool overwrite = false;
};

// What the run does with output_dir, decided identically on every rank. Throws
// std::invalid_argument naming output.* keys when the directory and the options disagree (a
// finished run there, checkpoints with resume = none, overwrite with a resume path, ...).
struct OutputPlan {
  std::filesystem::path dir;
  std::filesystem::path resume;  // checkpoint to resume from ("" = fresh start)
  bool wipe = false;             // overwrite: remove our earlier files first
};
OutputPlan output_plan(const OutputOptions& options);
void output_dir_prepare(const OutputPlan& plan);  // rank 0: create it, check it is writable
void output_dir_wipe(const std::filesystem::path& dir);  // only what a run of ours writes

// Complete checkpoints (those with trainer_state.json) in dir, oldest first.
std::vector<std::pair<int64_t, std::filesystem::path>> checkpoints_in(const std::filesystem::path& dir);

// trainer_state.json of a checkpoint and of the finished run.
struct TrainerState {
  int64_t step = 0;
  int64_t optimizer_steps = -1;  // updates made (step minus skipped steps); -1 when read: = step
  int64_t total_steps = 0;
  double epoch = 0.0;
  int64_t world_size = 1;
  int64_t global_batch = 0;
  double next_learning_rate = 0.0;
  int64_t seed = 0;
  bool finished = false;
  nlohmann::ordered_json to_json() const;
};

// A collective: every rank writes its optimizer shard, rank 0 the adapter, trainer_state.json and
// config.ini, then renames the directory into place and applies save_total_limit. With `final`,
// the adapter and trainer_state.json ("finished": true) also go to output_dir itself.
void checkpoint_save(Trainer& trainer, dist::Communicator& comm, const OutputOptions& output,
                     const TrainerState& state, const std::string& base_model,
                     const std::string& config_ini, bool final);

TrainerState trainer_state_read(const std::filesystem::path& checkpoint_dir);
// Loads the adapter and the optimizer moments of a checkpoint written by `state.world_size` ranks
// into the trainer and sets its step. Throws std::invalid_argument naming a missing part.
void checkpoint_load(Trainer& trainer, const std::filesystem::path& dir, const TrainerState& state);

}  // namespace qlora::train
