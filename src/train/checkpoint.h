// The output directory of a run and its checkpoints:
//   output_dir/checkpoint-<step>/  adapter_config.json, adapter_model.safetensors (PEFT, whole),
//                                  optimizer/rank<r>.h5 (AdamW moments of rank r's shards),
//                                  trainer_state.json (step, global batch, world size, seed,
//                                  next learning rate), config.ini (the resolved configuration)
// written as .checkpoint-<step>.tmp by every rank and renamed by rank 0 once every rank has
// written and synced its part (files, then directories, then the rename and output_dir), so a
// crash never damages the last complete checkpoint. trainer_state.json is written last and
// records the size of every other file ("files"); a checkpoint is complete when it is there
// (checkpoints_in), and usable when checkpoint_check finds every file as recorded. Optimizer moments
// are stored as byte ranges of each LoRA unit's payload, which does not depend on the world
// size: a checkpoint written by N ranks resumes on M.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "dist/communicator.h"
#include "model/model_config.h"
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
  // resume = auto passed over damaged checkpoints: one line saying which and why ("" if none).
  std::string fallback_note;
};
// Every checkpoint it would resume from is checked first (checkpoint_check against `model`):
// with resume = path a damaged one is refused, with auto the newest usable one is taken (and
// fallback_note says what was passed over); none usable is refused.
OutputPlan output_plan(const OutputOptions& options, const model::ModelConfig& model);
void output_dir_prepare(const OutputPlan& plan);  // rank 0: create it, check it is writable
void output_dir_wipe(const std::filesystem::path& dir);  // only what a run of ours writes
// Rank 0 at the start of a run: removes what killed saves left (.checkpoint-<step>.tmp and
// .removing), and puts back a checkpoint whose replacement was cut (.checkpoint-<step>.replaced).
void output_dir_tidy(const std::filesystem::path& dir);

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
  // Bytes of each other file of the checkpoint (relative paths), recorded by the writer; empty
  // in checkpoints of older versions (then only their structure is checked).
  std::vector<std::pair<std::string, int64_t>> files;
  nlohmann::ordered_json to_json() const;
};

// A checkpoint could not be written (a full disk, say), agreed by every rank: the temporary
// directory is removed, earlier checkpoints are untouched, and only `report`'s rank prints it.
struct CheckpointWriteError : std::runtime_error {
  CheckpointWriteError(const std::string& what, bool report)
      : std::runtime_error(what), report(report) {}
  bool report;
};

// A collective: every rank writes its optimizer shard, rank 0 the adapter, trainer_state.json and
// config.ini, then renames the directory into place and applies save_total_limit. With `final`,
// the adapter and trainer_state.json ("finished": true) also go to output_dir itself.
void checkpoint_save(Trainer& trainer, dist::Communicator& comm, const OutputOptions& output,
                     const TrainerState& state, const std::string& base_model,
                     const std::string& config_ini, bool final);

TrainerState trainer_state_read(const std::filesystem::path& checkpoint_dir);
// Whether checkpoint `dir` can be resumed, without reading its tensors: trainer_state.json parses
// with sane values and its step matches the directory name, every file it records has its
// recorded size, the adapter's tensors have the shapes `model` and the adapter's own r and
// target_modules give, and the optimizer shards of all world_size ranks open as HDF5 and together
// cover every LoRA unit's bytes exactly once. Throws std::invalid_argument naming the file.
void checkpoint_check(const std::filesystem::path& dir, const model::ModelConfig& model);
// Loads the adapter and the optimizer moments of a checkpoint written by `state.world_size` ranks
// into the trainer and sets its step. Throws std::invalid_argument naming a missing part.
void checkpoint_load(Trainer& trainer, const std::filesystem::path& dir, const TrainerState& state);

}  // namespace qlora::train
