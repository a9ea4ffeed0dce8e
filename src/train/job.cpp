// The training job: see job.h. run order: build the trainer, resume, loop (step, log, evaluate,
// stop or save), evaluate, save the final checkpoint.
#include "train/job.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <stdexcept>

#include "dist/sampler.h"
#include "train/activation_memory.h"
#include "io/atomic_write.h"
#include "lora/peft_adapter.h"

namespace fs = std::filesystem;

namespace qlora::train {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

std::string hms(double seconds) {
  const int64_t s = static_cast<int64_t>(std::max(0.0, seconds));
  char buf[32];
  std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", static_cast<long long>(s / 3600),
                static_cast<long long>(s / 60 % 60), static_cast<long long>(s % 60));
  return buf;
}

const char* signal_name(int signo) {
  return signo == SIGTERM ? "SIGTERM" : signo == SIGUSR1 ? "SIGUSR1" : "SIGINT";
}

// Eval micro-batches of this rank: rows split evenly, every rank the same number of
// micro-batches (rows past the end repeat row 0 with no targets).
std::vector<Batch> eval_batches(const BatchData& data, int64_t micro, int rank, int world) {
  const int64_t per_rank = (data.items() + world - 1) / world;
  const int64_t n_micro = (per_rank + micro - 1) / micro;
  std::vector<Batch> out;
  for (int64_t k = 0; k < n_micro; ++k) {
    std::vector<int64_t> rows;
    std::vector<bool> real;
    for (int64_t j = 0; j < micro; ++j) {
      const int64_t local = k * micro + j;
      const int64_t row = rank * per_rank + local;
      const bool ok = local < per_rank && row < data.items();
      rows.push_back(ok ? row : 0);
      real.push_back(ok);
    }
    out.push_back(data.read(rows, real));
  }
  return out;
}

// A metric that is null when every step of its window was skipped.
double number_or_nan(const nlohmann::ordered_json& v) {
  return v.is_number() ? v.get<double>() : std::numeric_limits<double>::quiet_NaN();
}

// Sums of the steps since the last metrics line.
struct MetricWindow {
  double loss = 0.0, grad_norm = 0.0, seconds = 0.0, wait = 0.0;  // loss, norm: good steps only
  size_t comm_bytes = 0;
  int64_t steps = 0, tokens = 0, skipped = 0;
  // Preference training: the TRL metrics, each the mean of the steps' means over pairs.
  std::vector<std::pair<std::string, double>> pref;
  void add(const StepResult& r, int64_t tokens_per_step, bool preference) {
    seconds += r.seconds;
    wait += r.comm_wait_seconds;
    comm_bytes += r.bytes_gathered + r.bytes_reduce_scattered;
    tokens += tokens_per_step;
    ++steps;
    if (r.skipped) {  // its NaN / Inf would poison the means (HF's logging_nan_inf_filter)
      ++skipped;
      return;
    }
    if (preference) {
      const auto m = r.pref.metrics("");
      if (pref.empty())
        for (const auto& [name, value] : m) pref.emplace_back(name, 0.0);
      for (size_t i = 0; i < m.size(); ++i) pref[i].second += m[i].second;
    }
    loss += r.loss;
    grad_norm += r.grad_norm;
  }
};

}  // namespace

int64_t BatchData::items() const {
  return std::visit([](const auto& d) { return d.rows(); }, data_);
}

int64_t BatchData::seq_len() const {
  return std::visit([](const auto& d) { return d.seq_len(); }, data_);
}

Batch BatchData::read(const std::vector<int64_t>& items, const std::vector<bool>& real) const {
  Batch b;
  const int64_t n = static_cast<int64_t>(items.size());
  if (const auto* rows = std::get_if<data::TokenDataset>(&data_)) {
    rows->read(items, b.input_ids, b.labels, &b.position_ids);
  } else {
    std::get<data::PairDataset>(data_).read(items, b.input_ids, b.labels);
  }
  for (int64_t j = 0; j < static_cast<int64_t>(real.size()); ++j)
    if (!real[static_cast<size_t>(j)]) {
      b.labels[j].fill_(-100);
      if (pairs()) b.labels[n + j].fill_(-100);
    }
  return b;
}

namespace {

class Job {
 public:
  Job(const JobOptions& o, JobInputs& in, dist::DeviceContext& device, const JobHooks& hooks)
      : o_(o), in_(in), device_(device), comm_(device.comm()), hooks_(hooks),
        main_rank_(comm_.rank() == 0), tty_(main_rank_ && isatty(STDERR_FILENO)) {}

  int run();

 private:
  void log(const std::string& line) const {
    if (main_rank_ && hooks_.log) hooks_.log(line);
  }
  void trainer_build();
  DeviceMemoryPlan memory_plan() const;
  nlohmann::ordered_json evaluate(int64_t step);
  int64_t resume(const dist::DistributedSampler& sampler);
  nlohmann::ordered_json metrics_line(MetricWindow& w, int64_t done, double lr,
                                      const dist::DistributedSampler& sampler);
  void save(int64_t step, bool final, const dist::DistributedSampler& sampler);
  int stop_signal_agreed();

  const JobOptions& o_;
  JobInputs& in_;
  dist::DeviceContext& device_;
  dist::Communicator& comm_;
  const JobHooks& hooks_;
  const bool main_rank_, tty_;
  std::unique_ptr<Trainer> trainer_;
  int64_t total_ = 0;
};

void Job::trainer_build() {
  TrainerOptions opts = o_.trainer;
  lora::PeftAdapter start_adapter;
  if (!o_.adapter_path.empty()) {
    start_adapter = lora::peft_adapter_read(o_.adapter_path);
    opts.lora = start_adapter.config;
    opts.targets = start_adapter.target_modules;
    log("adapter " + o_.adapter_path + ": rank " + std::to_string(opts.lora.rank) + ", alpha " +
        fmt("%g", opts.lora.alpha) + " (its own settings replace finetuning.lora_*)");
  }
  const auto t_load = Clock::now();
  trainer_ = std::make_unique<Trainer>(device_, std::move(in_.source), opts);
  if (!o_.adapter_path.empty()) {
    try {
      trainer_->adapter_load(start_adapter);
    } catch (const std::invalid_argument& e) {  // an adapter for another model: name its file
      throw std::invalid_argument(
          (fs::path(o_.adapter_path) / "adapter_model.safetensors").string() + ": " +
          e.what());
    }
    // DPO / IPO against the model the training starts from (TRL's reference for a model that
    // starts from an adapter), whatever a resume loads next.
    if (opts.preference && opts.pref.needs_reference()) {
      trainer_->set_reference_adapter();
      log("reference model: the base with the starting adapter " + o_.adapter_path +
          " (frozen)");
    }
  }
  log("loaded " + o_.model_path + " in " + fmt("%.2f", seconds_since(t_load)) +
      " s: this rank holds " + fmt("%.2f", trainer_->stats().resident_bytes / 1048576.0) +
      " MiB of " + fmt("%.2f", trainer_->base_total_bytes() / 1048576.0) +
      " MiB of 4-bit base units (read " + fmt("%.2f", trainer_->load_bytes_read() / 1048576.0) +
      " MiB)");
  if (device_.device() == dist::Device::cuda) log("GPU memory plan per rank: " + memory_plan().describe());
}

// The README's formula of device memory per rank (train/activation_memory.h) for this run.
DeviceMemoryPlan Job::memory_plan() const {
  const TrainerOptions& t = o_.trainer;
  ActivationShape shape;
  shape.compute_dtype = device_.compute_dtype();
  shape.lora_rank = t.lora.rank;
  shape.lora_targets = t.targets;
  shape.lora_dropout = t.lora.dropout > 0.0;
  DeviceMemoryInputs in;
  in.shard_bytes = static_cast<int64_t>(trainer_->stats().resident_bytes);
  for (const auto& u : trainer_->lora()) {
    in.lora_shard_numel += u->shard_numel();
    in.max_lora_unit_numel = std::max(in.max_lora_unit_numel, u->padded_numel());
  }
  in.max_base_unit_bytes = static_cast<int64_t>(trainer_->base_max_unit_bytes());
  in.prefetch = t.prefetch;
  const int64_t seq = in_.train_data ? in_.train_data->seq_len()
                                     : in_.eval_data ? in_.eval_data->seq_len() : 0;
  in.tokens = o_.loop.per_device_batch * seq * (t.preference ? 2 : 1);
  in.gradient_checkpointing = t.gradient_checkpointing;
  in.chunk_tokens = t.chunk_tokens;
  return device_memory_plan(trainer_->spec().config, shape, in);
}

nlohmann::ordered_json Job::evaluate(int64_t step) {
  const auto t0 = Clock::now();
  const Trainer::EvalSums s = trainer_->eval(
      eval_batches(*in_.eval_data, o_.loop.per_device_batch, comm_.rank(), comm_.world_size()));
  nlohmann::ordered_json j;
  j["step"] = step;
  if (o_.trainer.preference) {
    const double loss = s.pref.loss(o_.trainer.pref.ftx);
    j["eval_loss"] = loss;
    for (const auto& [name, value] : s.pref.metrics("eval_")) j[name] = value;
    j["eval_pairs"] = static_cast<int64_t>(std::llround(s.pref.pairs));
    log("eval step " + std::to_string(step) + ": eval_loss " + fmt("%.4f", loss) +
        " rewards/accuracies " + fmt("%.3f", j["eval_rewards/accuracies"].get<double>()) +
        " rewards/margins " + fmt("%.4f", j["eval_rewards/margins"].get<double>()) + " (" +
        std::to_string(j["eval_pairs"].get<int64_t>()) + " pairs, " +
        fmt("%.1f", seconds_since(t0)) + " s)");
    return j;
  }
  const double loss = s.num_targets > 0 ? s.loss_sum / static_cast<double>(s.num_targets) : 0.0;
  j["eval_loss"] = loss;
  j["eval_perplexity"] = std::exp(loss);
  j["eval_tokens"] = s.num_targets;
  log("eval step " + std::to_string(step) + ": eval_loss " + fmt("%.4f", loss) + " perplexity " +
      fmt("%.3f", std::exp(loss)) + " (" + std::to_string(s.num_targets) + " tokens, " +
      fmt("%.1f", seconds_since(t0)) + " s)");
  return j;
}

int64_t Job::resume(const dist::DistributedSampler& sampler) {
  const fs::path& dir = in_.plan.resume;
  if (dir.empty()) return 0;
  const TrainerState st = trainer_state_read(dir);
  if (st.global_batch != sampler.global_batch())
    throw std::invalid_argument(
        "resume from " + dir.string() + ": it trained with a global batch of " +
        std::to_string(st.global_batch) + " rows, this run has " +
        std::to_string(sampler.global_batch()) + " (per_device_train_batch_size " +
        std::to_string(o_.loop.per_device_batch) + " x gradient_accumulation_steps " +
        std::to_string(o_.loop.accumulation) + " x " + std::to_string(comm_.world_size()) +
        " ranks); keep the global batch to resume");
  checkpoint_load(*trainer_, dir, st);
  log("resumed from " + dir.string() + " at step " + std::to_string(st.step) +
      (st.world_size != comm_.world_size()
           ? " (written by " + std::to_string(st.world_size) + " ranks; optimizer state re-sharded)"
           : ""));
  return st.step;
}

void Job::save(int64_t step, bool final, const dist::DistributedSampler& sampler) {
  TrainerState st;
  st.step = step;
  st.total_steps = total_;
  st.epoch = static_cast<double>(step) / static_cast<double>(sampler.steps_per_epoch());
  st.world_size = comm_.world_size();
  st.global_batch = sampler.global_batch();
  st.optimizer_steps = trainer_->steps_done();
  st.next_learning_rate = lr_at(o_.schedule, st.optimizer_steps, total_);
  st.seed = static_cast<int64_t>(o_.trainer.seed);
  checkpoint_save(*trainer_, comm_, o_.output, st, o_.model_path, o_.config_ini, final);
}

// One all-reduce (max over ranks) of memory and wait share: every rank logs at these steps.
nlohmann::ordered_json Job::metrics_line(MetricWindow& w, int64_t done, double lr,
                                         const dist::DistributedSampler& sampler) {
  const bool gpu = device_.device() == dist::Device::cuda;
  double red[3] = {static_cast<double>(max_rss_bytes()), w.wait / std::max(1e-12, w.seconds),
                   static_cast<double>(device_.peak_memory_bytes())};
  comm_.all_reduce_host(red, gpu ? 3 : 2, dist::ReduceOp::max);
  nlohmann::ordered_json j;
  const double steps = static_cast<double>(w.steps);
  const double good = static_cast<double>(w.steps - w.skipped);  // 0: loss and norm are null
  j["step"] = done;
  j["loss"] = good > 0 ? nlohmann::ordered_json(w.loss / good) : nlohmann::ordered_json();
  j["learning_rate"] = lr;
  j["grad_norm"] = good > 0 ? nlohmann::ordered_json(w.grad_norm / good) : nlohmann::ordered_json();
  for (const auto& [name, value] : w.pref) j[name] = value / good;
  j["skipped_steps"] = done - trainer_->steps_done();  // in the whole run (resumes included)
  j["tokens_per_second"] = static_cast<double>(w.tokens) / w.seconds;
  j["comm_bytes"] = static_cast<double>(w.comm_bytes) / steps;
  j["comm_wait_share"] = red[1];
  j["max_rss_bytes"] = static_cast<int64_t>(red[0]);
  if (gpu) j["max_gpu_memory_bytes"] = static_cast<int64_t>(red[2]);  // caching allocator's peak
  j["epoch"] = static_cast<double>(done) / static_cast<double>(sampler.steps_per_epoch());
  w = MetricWindow();
  return j;
}

// Did any rank get a stop signal? Every rank asks at every step boundary (one all-reduce of an
// int), so all of them stop after the same step.
int Job::stop_signal_agreed() {
  double signo = hooks_.stop_signal ? static_cast<double>(hooks_.stop_signal()) : 0.0;
  comm_.all_reduce_host(&signo, 1, dist::ReduceOp::max);
  return static_cast<int>(signo);
}

int Job::run() {
  trainer_build();
  if (!o_.loop.do_train) {  // qlora_dist eval
    MetricSinks sinks(o_.output.dir, o_.output.report_to, main_rank_, "eval_metrics.jsonl", 0);
    const nlohmann::ordered_json j = evaluate(0);
    sinks.write(j);
    if (main_rank_) io::file_write_atomic(o_.output.dir / "eval_results.json", j.dump(2) + "\n");
    comm_.barrier();
    return 0;
  }

  const BatchData& train_data = *in_.train_data;
  const LoopOptions& loop = o_.loop;
  dist::DistributedSampler sampler(train_data.items(), loop.per_device_batch, loop.accumulation,
                                   comm_.rank(), comm_.world_size(), o_.trainer.seed);
  total_ = loop.max_steps > 0
               ? loop.max_steps
               : static_cast<int64_t>(std::ceil(loop.num_train_epochs *
                                                static_cast<double>(sampler.steps_per_epoch())));
  const int64_t start = resume(sampler);
  MetricSinks sinks(o_.output.dir, o_.output.report_to, main_rank_, "metrics.jsonl", start);
  const int64_t tokens_per_step =
      sampler.global_batch() * train_data.seq_len() * (train_data.pairs() ? 2 : 1);
  log("training " + std::to_string(total_) + " steps (" + std::to_string(sampler.steps_per_epoch()) +
      " per epoch), global batch " + std::to_string(sampler.global_batch()) + " x " +
      std::to_string(train_data.seq_len()) + " tokens, warmup " +
      std::to_string(lr_warmup_steps(o_.schedule, total_)) + ", " +
      lr_scheduler_name(o_.schedule.type) + " schedule");

  const auto t_train = Clock::now();
  const bool evaluating = loop.do_eval && in_.eval_data;
  MetricWindow window;
  const FaultNan fault = fault_nan_from_env();
  const bool fault_rank = comm_.rank() == comm_.world_size() - 1;
  int64_t skipped_in_row = 0, last_good = start;
  for (int64_t step = start; step < total_; ++step) {
    comm_.context_set("step " + std::to_string(step + 1));  // named by the watchdog
    // The schedule follows the updates made: a skipped step does not advance it.
    const double lr = lr_at(o_.schedule, trainer_->steps_done(), total_);
    if (fault_rank && fault.first > 0) trainer_->fault_nan_loss_set(fault.covers(step + 1));
    std::vector<Batch> batches(static_cast<size_t>(loop.accumulation));
    for (int64_t k = 0; k < loop.accumulation; ++k) batches[k] = train_data.read(sampler.rows(step, k));
    const StepResult res = trainer_->step(batches, lr);
    window.add(res, tokens_per_step, o_.trainer.preference);

    const int64_t done = step + 1;
    const double eta = seconds_since(t_train) / static_cast<double>(done - start) *
                       static_cast<double>(total_ - done);
    if (tty_) {
      std::fprintf(stderr, "\rstep %lld/%lld | loss %.4f | lr %.2e | %.0f tok/s | ETA %s | peak %.0f MiB   ",
                   static_cast<long long>(done), static_cast<long long>(total_), res.loss, lr,
                   static_cast<double>(tokens_per_step) / res.seconds, hms(eta).c_str(),
                   max_rss_bytes() / 1048576.0);
      std::fflush(stderr);
    }
    const bool give_up = res.skipped && ++skipped_in_row >= loop.max_skipped_steps;
    if (res.skipped) {
      log("step " + std::to_string(done) + ": non-finite loss or gradient norm (loss " +
          fmt("%g", res.loss) + ", grad_norm " + fmt("%g", res.grad_norm) +
          "): step skipped, no update (" + std::to_string(skipped_in_row) + " in a row)");
    } else {
      skipped_in_row = 0;
      last_good = done;
    }
    if (done % o_.output.logging_steps == 0 || done == total_ || give_up) {
      const nlohmann::ordered_json j = metrics_line(window, done, lr, sampler);
      sinks.write(j);
      if (tty_) std::fprintf(stderr, "\n");
      log("step " + std::to_string(done) + "/" + std::to_string(total_) + " loss " +
          fmt("%.4f", number_or_nan(j["loss"])) + " lr " + fmt("%.3e", lr) + " grad_norm " +
          fmt("%.3f", number_or_nan(j["grad_norm"])) + " tok/s " +
          fmt("%.0f", j["tokens_per_second"].get<double>()) + " comm_wait " +
          fmt("%.1f%%", 100 * j["comm_wait_share"].get<double>()) + " ETA " + hms(eta) +
          " max_rss " + fmt("%.0f MiB", j["max_rss_bytes"].get<int64_t>() / 1048576.0));
    }
    if (give_up) {
      // The weights and moments have not changed since step last_good: its checkpoint is them.
      comm_.context_set("step " + std::to_string(done) + ", checkpoint of the last good state");
      save(last_good, /*final=*/false, sampler);
      const std::string line =
          std::to_string(skipped_in_row) + " steps in a row had a non-finite loss or gradient " +
          "norm (last at step " + std::to_string(done) + "); stopped; checkpoint-" +
          std::to_string(last_good) + " holds the last good state (train.max_skipped_steps = " +
          std::to_string(loop.max_skipped_steps) + ")";
      if (main_rank_) (hooks_.error ? hooks_.error : hooks_.log)(line);
      return 1;
    }
    if (evaluating && loop.eval_steps > 0 && done % loop.eval_steps == 0 && done != total_)
      sinks.write(evaluate(done));
    comm_.context_set("step " + std::to_string(done) + ", stop-signal agreement");
    const int signo = stop_signal_agreed();
    if (signo != 0 && done != total_) {
      log(std::string("received ") + signal_name(signo) + ": saving checkpoint-" +
          std::to_string(done) + " and exiting with status " + std::to_string(kExitPreempted) +
          " (resume with resume_from_checkpoint = auto)");
      save(done, /*final=*/false, sampler);
      return kExitPreempted;
    }
    if (o_.output.save_steps > 0 && done % o_.output.save_steps == 0 && done != total_)
      save(done, /*final=*/false, sampler);
  }
  if (evaluating) {
    const nlohmann::ordered_json j = evaluate(total_);
    sinks.write(j);
    if (main_rank_) io::file_write_atomic(o_.output.dir / "eval_results.json", j.dump(2) + "\n");
  }
  save(total_, /*final=*/true, sampler);
  log("done: adapter in " + o_.output.dir.string() + " (PEFT: adapter_config.json, "
      "adapter_model.safetensors), checkpoints checkpoint-<step>, metrics.jsonl");
  return 0;
}

}  // namespace

FaultNan fault_nan_from_env() {
  FaultNan f;
  const char* v = std::getenv("QLORA_FAULT_NAN_AT_STEP");
  if (!v || !*v) return f;
  const std::string s = v;
  const bool open_end = s.back() == '-';
  const std::string num = open_end ? s.substr(0, s.size() - 1) : s;
  size_t used = 0;
  long long k = 0;
  try {
    k = std::stoll(num, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (num.empty() || used != num.size() || k < 1)
    throw std::invalid_argument("QLORA_FAULT_NAN_AT_STEP='" + s +
                                "' (test-only) must be a step k >= 1, or k- for k and later");
  f.first = k;
  f.last = open_end ? std::numeric_limits<int64_t>::max() : k;
  return f;
}

int job_run(const JobOptions& options, JobInputs& inputs, dist::DeviceContext& device,
            const JobHooks& hooks) {
  try {
    return Job(options, inputs, device, hooks).run();
  } catch (const CheckpointWriteError& e) {
    // Every rank is here (the failure was agreed): one line, exit status 1 on every rank.
    if (e.report) (hooks.error ? hooks.error : hooks.log)(e.what());
    return 1;
  }
}

}  // namespace qlora::train
