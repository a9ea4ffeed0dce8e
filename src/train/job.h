// The training job of the engine: given typed options and the inputs the application opened and
// checked (model source, token datasets, output plan), it builds the trainer, resumes, runs the
// step loop with evaluation, metrics and checkpoints, and saves the final adapter. It never sees
// argv, INI text or configuration strings; the application (src/app) makes these options.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "data/dataset.h"
#include "dist/device_context.h"
#include "train/checkpoint.h"
#include "train/lr_schedule.h"
#include "train/metrics.h"
#include "train/sharded_model.h"
#include "train/trainer.h"

namespace qlora::train {

struct LoopOptions {
  int64_t per_device_batch = 1;        // rows per micro-batch and rank
  int64_t accumulation = 1;            // micro-batches per optimizer step
  int64_t max_steps = -1;              // > 0 wins over num_train_epochs
  double num_train_epochs = 3.0;
  bool do_train = true;
  bool do_eval = false;
  int64_t eval_steps = 0;              // 0: only at the end
  // Steps with a non-finite loss or gradient norm are skipped (no update; the learning-rate
  // schedule, a function of the updates made, does not advance: HF Trainer / torch GradScaler);
  // this many in a row stop the run (exit status 1) after a checkpoint of the last good state.
  int64_t max_skipped_steps = 10;
};

struct JobOptions {
  std::string model_path;    // recorded as the adapter's base_model_name_or_path
  std::string adapter_path;  // "" = a fresh LoRA; else its weights (and its settings) to start from
  TrainerOptions trainer;
  LrSchedule schedule;
  LoopOptions loop;
  OutputOptions output;
  std::string config_ini;    // the resolved configuration: written to output_dir and checkpoints
  double comm_timeout_s = 600.0;  // [dist] timeout_s: the communicator's watchdog (the caller
                                  // that makes the communicator applies it)
};

// A training or evaluation file as the step loop reads it: token rows (stage sft) or preference
// pairs (stage dpo: each item is two rows, see PrefOptions).
class BatchData {
 public:
  explicit BatchData(data::TokenDataset rows) : data_(std::move(rows)) {}
  explicit BatchData(data::PairDataset pairs) : data_(std::move(pairs)) {}
  bool pairs() const { return std::holds_alternative<data::PairDataset>(data_); }
  int64_t items() const;    // rows, or pairs
  int64_t seq_len() const;  // of each row
  // The micro-batch of these items ([n, T], or [2n, T] for pairs); items whose `real` is false
  // (padding of an evaluation) get no targets.
  Batch read(const std::vector<int64_t>& items, const std::vector<bool>& real = {}) const;

 private:
  std::variant<data::TokenDataset, data::PairDataset> data_;
};

// Opened and checked by the application before any heavy work (phase 1, on every rank).
struct JobInputs {
  std::unique_ptr<UnitSource> source;
  std::optional<BatchData> train_data, eval_data;
  OutputPlan plan;
  // Before MPI_Finalize: parallel HDF5 shuts itself down there, and a file closed after that
  // fails with HDF5's diagnostics on stderr.
  void close() {
    source.reset();
    train_data.reset();
    eval_data.reset();
  }
};

// What the job asks of its caller: a line for rank 0's log, rank 0's one-line error when the job
// ends itself with status 1 (too many non-finite steps; falls back to log), and the stop signal
// received so far (0: none), asked once per step on every rank.
struct JobHooks {
  std::function<void(const std::string&)> log;
  std::function<void(const std::string&)> error;
  std::function<int()> stop_signal;
};

// Test-only fault injection (not a user setting): QLORA_FAULT_NAN_AT_STEP=k makes the loss of
// the last rank NaN at step k (1-based, as in metrics.jsonl), "k-" at step k and every later one.
// Read once when the job starts; a malformed value is an error naming the variable.
struct FaultNan {
  int64_t first = 0, last = 0;  // steps [first, last]; first = 0: none
  bool covers(int64_t step) const { return first > 0 && step >= first && step <= last; }
};
FaultNan fault_nan_from_env();

// Exit status after SIGTERM / SIGUSR1 / SIGINT: every rank finished the current step and a
// complete checkpoint was written; a batch script requeues on it (EX_TEMPFAIL).
constexpr int kExitPreempted = 75;

// Trains (or, with loop.do_train = false, evaluates) and returns the exit status (0,
// kExitPreempted, or 1 after loop.max_skipped_steps non-finite steps in a row, or 1 on every
// rank when a checkpoint could not be written: CheckpointWriteError, one line from the rank that
// failed). Throws on other errors; the caller ends the job then.
int job_run(const JobOptions& options, JobInputs& inputs, dist::DeviceContext& device,
            const JobHooks& hooks);

}  // namespace qlora::train
