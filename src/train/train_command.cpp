// The training application: see train_command.h.
#include "train/train_command.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <sched.h>
#include <sys/resource.h>
#include <csignal>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "dist/communicator.h"
#include "dist/rank_env.h"
#include "dist/sampler.h"
#include "io/h5_file.h"
#include "lora/peft_adapter.h"
#include "train/dataset.h"
#include "train/sharded_model.h"
#include "train/lr_schedule.h"
#include "train/tensorboard.h"
#include "train/trainer.h"

namespace fs = std::filesystem;

namespace qlora::train {

namespace {

using Clock = std::chrono::steady_clock;

// SIGTERM / SIGUSR1 (SLURM's time limit and preemption) and SIGINT only set this flag; the step
// loop acts on it at the next step boundary, after every rank has agreed (one all-reduce).
volatile sig_atomic_t g_stop_signal = 0;
extern "C" void on_stop_signal(int signo) {
  if (g_stop_signal == 0) g_stop_signal = signo;  // a second signal (e.g. during the save) is ignored
}

void stop_signals_install() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  for (int s : {SIGTERM, SIGUSR1, SIGINT}) sigaction(s, &sa, nullptr);
}

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

int64_t max_rss_bytes() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<int64_t>(ru.ru_maxrss) * 1024;
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

// ------------------------------------------------------------------------------------------
// Output directory and checkpoints

std::vector<std::pair<int64_t, fs::path>> checkpoints_in(const fs::path& dir) {
  std::vector<std::pair<int64_t, fs::path>> out;
  if (!fs::is_directory(dir)) return out;
  static const std::regex re(R"(checkpoint-(\d+))");
  for (const auto& e : fs::directory_iterator(dir)) {
    std::smatch m;
    const std::string name = e.path().filename().string();
    if (e.is_directory() && std::regex_match(name, m, re) &&
        fs::exists(e.path() / "trainer_state.json"))
      out.emplace_back(std::stoll(m[1]), e.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

nlohmann::json json_read(const fs::path& p) {
  std::ifstream f(p);
  if (!f) throw std::invalid_argument(p.string() + ": cannot be read");
  try {
    return nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument(p.string() + ": not valid JSON (" + e.what() + ")");
  }
}

void text_write(const fs::path& p, const std::string& text) {
  const fs::path tmp = p.parent_path() / ("." + p.filename().string() + ".tmp");
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << text;
    if (!f) throw std::runtime_error(tmp.string() + ": cannot be written");
  }
  fs::rename(tmp, p);
}

// What the run will do with output_dir, decided identically on every rank.
struct OutputPlan {
  fs::path dir;
  fs::path resume;     // checkpoint to resume from ("" = fresh start)
  bool wipe = false;   // overwrite_output_dir: remove our earlier files first
};

OutputPlan output_plan(const TrainConfig& c) {
  OutputPlan plan;
  plan.dir = c.output_dir;
  const fs::path state = plan.dir / "trainer_state.json";
  const auto ckpts = checkpoints_in(plan.dir);
  if (fs::exists(plan.dir) && !fs::is_directory(plan.dir))
    throw std::invalid_argument("output.output_dir " + c.output_dir + " exists and is not a directory");
  if (c.overwrite_output_dir) {
    plan.wipe = fs::exists(plan.dir);
    if (c.resume_from_checkpoint != "auto" && c.resume_from_checkpoint != "none")
      throw std::invalid_argument("output.overwrite_output_dir = true with resume_from_checkpoint = " +
                                  c.resume_from_checkpoint + ": choose one");
    return plan;
  }
  if (fs::exists(state) && json_read(state).value("finished", false))
    throw std::invalid_argument("output.output_dir " + c.output_dir +
                                " holds a finished run (trainer_state.json); set "
                                "output.overwrite_output_dir = true or choose another output_dir");
  if (c.resume_from_checkpoint == "auto") {
    if (!ckpts.empty()) plan.resume = ckpts.back().second;
  } else if (c.resume_from_checkpoint == "none") {
    if (!ckpts.empty())
      throw std::invalid_argument("output.output_dir " + c.output_dir + " holds checkpoints (" +
                                  ckpts.back().second.filename().string() +
                                  "); set output.resume_from_checkpoint = auto to continue or "
                                  "output.overwrite_output_dir = true to start over");
  } else {
    plan.resume = c.resume_from_checkpoint;
    if (!fs::exists(plan.resume / "trainer_state.json"))
      throw std::invalid_argument("output.resume_from_checkpoint " + c.resume_from_checkpoint +
                                  " is not a complete checkpoint (no trainer_state.json)");
  }
  return plan;
}

void output_dir_prepare(const OutputPlan& plan) {
  std::error_code ec;
  fs::create_directories(plan.dir, ec);
  if (ec)
    throw std::invalid_argument("output.output_dir " + plan.dir.string() + " cannot be created (" +
                                ec.message() + ")");
  const fs::path probe = plan.dir / ".write_test";
  {
    std::ofstream f(probe);
    if (!f)
      throw std::invalid_argument("output.output_dir " + plan.dir.string() + " is not writable");
  }
  fs::remove(probe);
}

void output_dir_wipe(const fs::path& dir) {
  // Only what a run of ours writes.
  for (const auto& [step, path] : checkpoints_in(dir)) fs::remove_all(path);
  fs::remove_all(dir / "runs");
  for (const char* f : {"trainer_state.json", "metrics.jsonl", "eval_metrics.jsonl", "adapter_config.json",
                        "adapter_model.safetensors", "config.ini", "eval_results.json"})
    fs::remove(dir / f);
}

void optimizer_write(Trainer& trainer, const fs::path& file, int rank, int world_size) {
  io::H5File f = io::H5File::create(file.string());
  f.set_attr_int64("/", "rank", rank);
  f.set_attr_int64("/", "world_size", world_size);
  for (const Trainer::OptimizerShard& s : trainer.optimizer_shards()) {
    for (const auto& [which, t] : {std::pair<const char*, at::Tensor>{"exp_avg", s.exp_avg},
                                   std::pair<const char*, at::Tensor>{"exp_avg_sq", s.exp_avg_sq}}) {
      const std::string name = s.unit + "/" + which;
      f.write_bytes(name, t.data_ptr<uint8_t>(), static_cast<size_t>(t.numel()));
      f.set_attr_int64(name, "begin", static_cast<int64_t>(s.begin));
      f.set_attr_int64(name, "end", static_cast<int64_t>(s.end));
    }
  }
  f.close();
}

// Reads moments written by any world size: each old rank's file holds bytes [begin, end) of each
// unit's payload.
void optimizer_read(Trainer& trainer, const fs::path& dir, int64_t old_world) {
  std::vector<io::H5File> files;
  for (int64_t q = 0; q < old_world; ++q) {
    const fs::path p = dir / ("rank" + std::to_string(q) + ".h5");
    if (!fs::exists(p))
      throw std::invalid_argument(p.string() + " is missing (the checkpoint was written by " +
                                  std::to_string(old_world) + " ranks)");
    files.push_back(io::H5File::open_read(p.string()));
  }
  trainer.optimizer_load([&](const std::string& unit, const char* which, size_t begin, size_t end,
                             uint8_t* out) {
    size_t covered = 0;
    for (io::H5File& f : files) {
      const std::string name = unit + "/" + which;
      const size_t b = static_cast<size_t>(f.attr_int64(name, "begin"));
      const size_t e = static_cast<size_t>(f.attr_int64(name, "end"));
      const size_t lo = std::max(b, begin), hi = std::min(e, end);
      if (lo >= hi) continue;
      f.read_bytes(name, lo - b, hi - lo, out + (lo - begin));
      covered += hi - lo;
    }
    if (covered != end - begin)
      throw std::invalid_argument(dir.string() + ": optimizer shards cover " +
                                  std::to_string(covered) + " of the " +
                                  std::to_string(end - begin) + " bytes of " + unit + "/" + which);
  });
}

// ------------------------------------------------------------------------------------------
// The run

struct Run {
  TrainConfig cfg;
  std::vector<std::string> warnings;
  OutputPlan plan;
  dist::RankEnv env;
  // Opened and checked in phase 1, used by the run.
  std::unique_ptr<UnitSource> source;
  std::optional<TokenDataset> train_data, eval_data;
  // Before MPI_Finalize: parallel HDF5 shuts itself down there, and a file closed after that
  // fails with HDF5's diagnostics on stderr.
  void close_files() {
    source.reset();
    train_data.reset();
    eval_data.reset();
  }
};

std::vector<std::pair<std::string, std::string>> parse_overrides(
    const std::vector<std::string>& args, std::string& ini, bool& help) {
  std::vector<std::pair<std::string, std::string>> out;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      help = true;
    } else if (a.rfind("--", 0) == 0) {
      const size_t eq = a.find('=');
      std::string key = a.substr(2, eq == std::string::npos ? std::string::npos : eq - 2);
      if (eq != std::string::npos) {
        out.emplace_back(key, a.substr(eq + 1));
      } else {
        if (i + 1 >= args.size())
          throw UsageError("option " + a + " needs a value (--section.key=value)");
        out.emplace_back(key, args[++i]);
      }
    } else if (ini.empty()) {
      ini = a;
    } else {
      throw UsageError("unexpected argument '" + a + "' (one config file, then --section.key=value)");
    }
  }
  return out;
}

at::ScalarType compute_dtype_of(const TrainConfig& c) {
  if (c.compute_dtype == "bf16") return at::kBFloat16;
  if (c.compute_dtype == "fp16") return at::kHalf;
  return at::kFloat;  // fp32, and auto on the CPU
}

TrainerOptions trainer_options(const TrainConfig& c) {
  TrainerOptions o;
  o.sharded = c.sharding == "full";
  o.prefetch = static_cast<int>(c.prefetch);
  o.max_grad_norm = c.max_grad_norm;
  o.adam.beta1 = c.adam_beta1;
  o.adam.beta2 = c.adam_beta2;
  o.adam.eps = c.adam_epsilon;
  o.adam.weight_decay = c.weight_decay;
  o.seed = static_cast<uint64_t>(c.seed);
  o.lora.rank = c.lora_rank;
  o.lora.alpha = c.lora_alpha;
  o.lora.dropout = c.lora_dropout;
  o.lora.use_rslora = c.use_rslora;
  o.targets = lora::lora_target_parse(c.lora_target);
  o.load.compute_dtype = compute_dtype_of(c);
  o.load.upcast_layernorm = c.upcast_layernorm;
  o.quant.quant_type = quant::quant_type_from_name(c.quantization_type);
  o.quant.blocksize = static_cast<int32_t>(c.quantization_blocksize);
  o.quant.double_quant = c.double_quantization;
  return o;
}

// Eval micro-batches of this rank: rows split evenly, every rank the same number of
// micro-batches (rows past the end repeat row 0 with no targets).
std::vector<Batch> eval_batches(const TokenDataset& data, int64_t micro, int rank, int world) {
  const int64_t per_rank = (data.rows() + world - 1) / world;
  const int64_t n_micro = (per_rank + micro - 1) / micro;
  std::vector<Batch> out;
  for (int64_t k = 0; k < n_micro; ++k) {
    std::vector<int64_t> rows;
    std::vector<bool> real;
    for (int64_t j = 0; j < micro; ++j) {
      const int64_t local = k * micro + j;
      const int64_t row = rank * per_rank + local;
      const bool ok = local < per_rank && row < data.rows();
      rows.push_back(ok ? row : 0);
      real.push_back(ok);
    }
    Batch b;
    data.read(rows, b.input_ids, b.labels);
    for (int64_t j = 0; j < micro; ++j)
      if (!real[static_cast<size_t>(j)]) b.labels[j].fill_(-100);
    out.push_back(std::move(b));
  }
  return out;
}

class MetricsLog {
 public:
  MetricsLog(const fs::path& file, bool enabled, int64_t resume_step) : enabled_(enabled) {
    if (!enabled_) return;
    // A resumed run drops what the interrupted one logged after its checkpoint.
    std::vector<std::string> keep;
    if (fs::exists(file)) {
      std::ifstream in(file);
      for (std::string line; std::getline(in, line);) {
        if (line.empty()) continue;
        try {
          if (nlohmann::json::parse(line).value("step", int64_t{0}) <= resume_step) keep.push_back(line);
        } catch (const nlohmann::json::exception&) {
        }
      }
    }
    out_.open(file, std::ios::trunc);
    for (const std::string& l : keep) out_ << l << "\n";
    out_.flush();
  }
  void write(const nlohmann::ordered_json& j) {
    if (!enabled_) return;
    out_ << j.dump() << "\n";
    out_.flush();
  }

 private:
  bool enabled_;
  std::ofstream out_;
};

int run(Run& r, const std::string& command) {
  const TrainConfig& c = r.cfg;
  const LrSchedule schedule = lr_schedule_of(c);
  const int rank = r.env.rank, world = r.env.world_size;
  const bool main_rank = rank == 0;
  const bool tty = main_rank && isatty(STDERR_FILENO);
  auto log = [&](const std::string& line) {
    if (!main_rank) return;
    std::printf("%s\n", line.c_str());
    std::fflush(stdout);
  };
  // Intra-op threads: this node's cores shared among its ranks, but never more than the CPUs the
  // launcher bound this rank to (Open MPI binds each rank to one core when np <= 2).
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int want = std::max(1, cores / std::max(1, r.env.local_world_size));
  cpu_set_t allowed_set;
  CPU_ZERO(&allowed_set);
  const int allowed = sched_getaffinity(0, sizeof allowed_set, &allowed_set) == 0
                          ? std::max(1, CPU_COUNT(&allowed_set))
                          : want;
  const int threads = std::min(want, allowed);
  at::set_num_threads(threads);

  stop_signals_install();
  std::unique_ptr<dist::Communicator> comm = dist::communicator_mpi(r.env);
  if (main_rank) {
    if (r.plan.wipe) output_dir_wipe(r.plan.dir);
    text_write(r.plan.dir / "config.ini", config_to_ini(c));
    std::printf("qlora_dist %s: %d rank(s), resolved configuration:\n%s", command.c_str(), world,
                config_to_ini(c).c_str());
    for (const std::string& w : r.warnings) std::printf("warning: %s\n", w.c_str());
    if (allowed < want)
      std::printf("warning: the launcher bound each rank to %d CPU(s) while %d per rank are free; "
                  "using %d thread(s) (mpirun --bind-to none, or --map-by slot:PE=%d, gives each "
                  "rank its share)\n", allowed, want, threads, want);
    std::fflush(stdout);
  }
  comm->barrier();

  TrainerOptions opts = trainer_options(c);
  lora::PeftAdapter start_adapter;
  const bool have_adapter = !c.adapter_name_or_path.empty();
  if (have_adapter) {
    start_adapter = lora::peft_adapter_read(c.adapter_name_or_path);
    opts.lora = start_adapter.config;
    opts.targets = start_adapter.target_modules;
    log("adapter " + c.adapter_name_or_path + ": rank " + std::to_string(opts.lora.rank) +
        ", alpha " + fmt("%g", opts.lora.alpha) + " (its own settings replace finetuning.lora_*)");
  }
  const auto t_load = Clock::now();
  Trainer trainer(*comm, std::move(r.source), opts);
  if (have_adapter) trainer.adapter_load(start_adapter);
  log("loaded " + c.model_name_or_path + " in " +
      fmt("%.2f", std::chrono::duration<double>(Clock::now() - t_load).count()) + " s: this rank holds " +
      fmt("%.2f", trainer.stats().resident_bytes / 1048576.0) + " MiB of " +
      fmt("%.2f", trainer.base_total_bytes() / 1048576.0) + " MiB of 4-bit base units (read " +
      fmt("%.2f", trainer.load_bytes_read() / 1048576.0) + " MiB)");

  std::optional<TokenDataset>& eval_data = r.eval_data;
  const bool jsonl = main_rank && c.report_to.find("jsonl") != std::string::npos;
  std::optional<TensorBoardWriter> tb;
  if (main_rank && c.report_to.find("tensorboard") != std::string::npos)
    tb.emplace((r.plan.dir / "runs").string());
  auto tb_write = [&](const nlohmann::ordered_json& j) {
    if (!tb) return;
    std::vector<std::pair<std::string, double>> values;
    for (const auto& [key, value] : j.items()) {
      if (key == "step" || !value.is_number()) continue;
      const bool is_eval = key.rfind("eval_", 0) == 0;
      values.emplace_back(is_eval ? "eval/" + key.substr(5) : "train/" + key, value.get<double>());
    }
    tb->scalars(j.at("step").get<int64_t>(), values);
  };
  auto evaluate = [&](int64_t step) {
    const auto t0 = Clock::now();
    const Trainer::EvalSums s =
        trainer.eval(eval_batches(*eval_data, c.per_device_train_batch_size, rank, world));
    const double loss = s.num_targets > 0 ? s.loss_sum / static_cast<double>(s.num_targets) : 0.0;
    nlohmann::ordered_json j;
    j["step"] = step;
    j["eval_loss"] = loss;
    j["eval_perplexity"] = std::exp(loss);
    j["eval_tokens"] = s.num_targets;
    log("eval step " + std::to_string(step) + ": eval_loss " + fmt("%.4f", loss) + " perplexity " +
        fmt("%.3f", std::exp(loss)) + " (" + std::to_string(s.num_targets) + " tokens, " +
        fmt("%.1f", std::chrono::duration<double>(Clock::now() - t0).count()) + " s)");
    return j;
  };

  if (!c.do_train) {  // qlora_dist eval
    nlohmann::ordered_json j = evaluate(0);
    MetricsLog(r.plan.dir / "eval_metrics.jsonl", jsonl, 0).write(j);
    tb_write(j);
    if (main_rank) text_write(r.plan.dir / "eval_results.json", j.dump(2) + "\n");
    comm->barrier();
    return 0;
  }

  const TokenDataset& train_data = *r.train_data;
  const int64_t micro = c.per_device_train_batch_size, accum = c.gradient_accumulation_steps;
  dist::DistributedSampler sampler(train_data.rows(), micro, accum, rank, world,
                                   static_cast<uint64_t>(c.seed));
  const int64_t total = c.max_steps > 0
                            ? c.max_steps
                            : static_cast<int64_t>(std::ceil(c.num_train_epochs *
                                                             static_cast<double>(sampler.steps_per_epoch())));
  int64_t start = 0;
  if (!r.plan.resume.empty()) {
    const nlohmann::json st = json_read(r.plan.resume / "trainer_state.json");
    const int64_t old_world = st.at("world_size").get<int64_t>();
    const int64_t old_global = st.at("global_batch").get<int64_t>();
    if (old_global != sampler.global_batch())
      throw std::invalid_argument(
          "resume from " + r.plan.resume.string() + ": it trained with a global batch of " +
          std::to_string(old_global) + " rows, this run has " + std::to_string(sampler.global_batch()) +
          " (per_device_train_batch_size " + std::to_string(micro) + " x gradient_accumulation_steps " +
          std::to_string(accum) + " x " + std::to_string(world) + " ranks); keep the global batch to resume");
    trainer.adapter_load(lora::peft_adapter_read(r.plan.resume.string()));
    optimizer_read(trainer, r.plan.resume / "optimizer", old_world);
    start = st.at("step").get<int64_t>();
    trainer.set_steps_done(start);
    log("resumed from " + r.plan.resume.string() + " at step " + std::to_string(start) +
        (old_world != world ? " (written by " + std::to_string(old_world) + " ranks; optimizer state re-sharded)" : ""));
  }
  MetricsLog train_metrics(r.plan.dir / "metrics.jsonl", jsonl, start);
  log("training " + std::to_string(total) + " steps (" + std::to_string(sampler.steps_per_epoch()) +
      " per epoch), global batch " + std::to_string(sampler.global_batch()) + " x " +
      std::to_string(train_data.seq_len()) + " tokens, warmup " +
      std::to_string(lr_warmup_steps(schedule, total)) + ", " + c.lr_scheduler_type + " schedule");

  auto save = [&](int64_t step, bool final_save) {
    const fs::path tmp = r.plan.dir / (".checkpoint-" + std::to_string(step) + ".tmp");
    const fs::path dst = r.plan.dir / ("checkpoint-" + std::to_string(step));
    if (main_rank) {
      fs::remove_all(tmp);
      fs::create_directories(tmp / "optimizer");
    }
    comm->barrier();
    optimizer_write(trainer, tmp / "optimizer" / ("rank" + std::to_string(rank) + ".h5"), rank, world);
    lora::PeftAdapter adapter = trainer.adapter_gather();
    adapter.base_model_name_or_path = c.model_name_or_path;
    comm->barrier();  // every rank's shard is on disk
    if (main_rank) {
      lora::peft_adapter_write(tmp.string(), adapter);
      nlohmann::ordered_json st;
      st["step"] = step;
      st["total_steps"] = total;
      st["epoch"] = static_cast<double>(step) / static_cast<double>(sampler.steps_per_epoch());
      st["world_size"] = world;
      st["global_batch"] = sampler.global_batch();
      st["samples_seen"] = step * sampler.global_batch();
      st["next_learning_rate"] = lr_at(schedule, step, total);
      st["seed"] = c.seed;
      st["rng"] = "stateless: data order and dropout masks are functions of (seed, step, "
                  "micro-step, rank, block)";
      st["finished"] = false;
      text_write(tmp / "trainer_state.json", st.dump(2) + "\n");
      text_write(tmp / "config.ini", config_to_ini(c));
      fs::remove_all(dst);
      fs::rename(tmp, dst);
      if (c.save_total_limit > 0) {
        auto all = checkpoints_in(r.plan.dir);
        while (static_cast<int64_t>(all.size()) > c.save_total_limit) {
          fs::remove_all(all.front().second);
          all.erase(all.begin());
        }
      }
      if (final_save) {
        lora::peft_adapter_write(r.plan.dir.string(), adapter);
        st["finished"] = true;
        text_write(r.plan.dir / "trainer_state.json", st.dump(2) + "\n");
      }
    }
    comm->barrier();
  };

  const auto t_train = Clock::now();
  double window_loss = 0.0, window_norm = 0.0, window_seconds = 0.0, window_wait = 0.0;
  size_t window_bytes = 0;
  int64_t window_steps = 0, window_tokens = 0;
  for (int64_t step = start; step < total; ++step) {
    const double lr = lr_at(schedule, step, total);
    std::vector<Batch> batches;
    for (int64_t k = 0; k < accum; ++k) {
      Batch b;
      train_data.read(sampler.rows(step, k), b.input_ids, b.labels);
      batches.push_back(std::move(b));
    }
    const StepResult res = trainer.step(batches, lr);
    window_loss += res.loss;
    window_norm += res.grad_norm;
    window_seconds += res.seconds;
    window_wait += res.comm_wait_seconds;
    window_bytes += res.bytes_gathered + res.bytes_reduce_scattered;
    window_tokens += sampler.global_batch() * train_data.seq_len();
    ++window_steps;
    const int64_t done = step + 1;
    const double elapsed = std::chrono::duration<double>(Clock::now() - t_train).count();
    const double eta = elapsed / static_cast<double>(done - start) * static_cast<double>(total - done);
    if (tty) {
      std::fprintf(stderr, "\rstep %lld/%lld | loss %.4f | lr %.2e | %.0f tok/s | ETA %s | peak %.0f MiB   ",
                   static_cast<long long>(done), static_cast<long long>(total), res.loss, lr,
                   static_cast<double>(sampler.global_batch() * train_data.seq_len()) / res.seconds,
                   hms(eta).c_str(), max_rss_bytes() / 1048576.0);
      std::fflush(stderr);
    }
    if (done % c.logging_steps == 0 || done == total) {
      // One all-reduce (max over ranks) of memory and wait share: every rank logs at these steps.
      at::Tensor red = at::zeros({2}, at::kDouble);
      red[0] = static_cast<double>(max_rss_bytes());
      red[1] = window_wait / std::max(1e-12, window_seconds);
      comm->all_reduce(red, dist::ReduceOp::max);
      nlohmann::ordered_json j;
      j["step"] = done;
      j["loss"] = window_loss / static_cast<double>(window_steps);
      j["learning_rate"] = lr;
      j["grad_norm"] = window_norm / static_cast<double>(window_steps);
      j["tokens_per_second"] = static_cast<double>(window_tokens) / window_seconds;
      j["comm_bytes"] = static_cast<double>(window_bytes) / static_cast<double>(window_steps);
      j["comm_wait_share"] = red[1].item<double>();
      j["max_rss_bytes"] = static_cast<int64_t>(red[0].item<double>());
      j["epoch"] = static_cast<double>(done) / static_cast<double>(sampler.steps_per_epoch());
      train_metrics.write(j);
      tb_write(j);
      if (tty) std::fprintf(stderr, "\n");
      log("step " + std::to_string(done) + "/" + std::to_string(total) + " loss " +
          fmt("%.4f", j["loss"].get<double>()) + " lr " + fmt("%.3e", lr) + " grad_norm " +
          fmt("%.3f", j["grad_norm"].get<double>()) + " tok/s " +
          fmt("%.0f", j["tokens_per_second"].get<double>()) + " comm_wait " +
          fmt("%.1f%%", 100 * j["comm_wait_share"].get<double>()) + " ETA " + hms(eta) +
          " max_rss " + fmt("%.0f MiB", j["max_rss_bytes"].get<int64_t>() / 1048576.0));
      window_loss = window_norm = window_seconds = window_wait = 0.0;
      window_bytes = 0;
      window_steps = window_tokens = 0;
    }
    if (c.do_eval && eval_data && c.eval_steps > 0 && done % c.eval_steps == 0 && done != total) {
      const nlohmann::ordered_json j = evaluate(done);
      train_metrics.write(j);
      tb_write(j);
    }
    // Did any rank get a stop signal? Every rank asks at every step boundary (one all-reduce of
    // an int), so all of them stop after the same step.
    at::Tensor stop = at::full({1}, static_cast<int64_t>(g_stop_signal), at::kLong);
    comm->all_reduce(stop, dist::ReduceOp::max);
    if (stop.item<int64_t>() != 0 && done != total) {
      const int signo = static_cast<int>(stop.item<int64_t>());
      log(std::string("received ") + (signo == SIGTERM ? "SIGTERM" : signo == SIGUSR1 ? "SIGUSR1" : "SIGINT") +
          ": saving checkpoint-" + std::to_string(done) + " and exiting with status " +
          std::to_string(kExitPreempted) + " (resume with resume_from_checkpoint = auto)");
      save(done, false);
      return kExitPreempted;
    }
    if (c.save_steps > 0 && done % c.save_steps == 0 && done != total) save(done, false);
  }
  if (c.do_eval && eval_data) {
    nlohmann::ordered_json j = evaluate(total);
    train_metrics.write(j);
    tb_write(j);
    if (main_rank) text_write(r.plan.dir / "eval_results.json", j.dump(2) + "\n");
  }
  save(total, true);
  log("done: adapter in " + r.plan.dir.string() + " (PEFT: adapter_config.json, "
      "adapter_model.safetensors), checkpoints checkpoint-<step>, metrics.jsonl");
  return 0;
}

}  // namespace

LrSchedule lr_schedule_of(const TrainConfig& c) {
  LrSchedule s;
  s.learning_rate = c.learning_rate;
  s.type = lr_scheduler_from_name(c.lr_scheduler_type);
  s.warmup_steps = c.warmup_steps;
  s.warmup_ratio = c.warmup_ratio;
  return s;
}

int train_command_main(const std::string& command, const std::vector<std::string>& args, int* argc,
                       char*** argv) {
  const std::string prefix = "qlora_dist " + command + ": error: ";
  // Usage first, without MPI: --help and a command line that does not parse.
  std::string ini;
  bool help = false;
  std::vector<std::pair<std::string, std::string>> overrides;
  try {
    overrides = parse_overrides(args, ini, help);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "%s%s\n", prefix.c_str(), e.what());
    return 2;
  }
  if (help) {
    std::cout << "usage: qlora_dist " << command
              << " config.ini [--section.key=value ...]\n\nkeys (INI [section] key = value):\n"
              << config_help();
    return 0;
  }

  Run r;
  try {
    r.env = dist::rank_env_init(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s%s\n", prefix.c_str(), e.what());
    return 1;
  }
  // Phase 1, on every rank before any heavy work: configuration, guards, output directory, the
  // model's quantization method and the data files. Every rank learns whether any failed (one
  // all-reduce), so a failure never leaves another rank waiting; the message is printed once
  // (by rank 0, or by the lowest failing rank when rank 0 passed).
  std::string error;
  int status = 0;
  try {
    if (ini.empty() && overrides.empty())
      throw UsageError("no configuration (usage: qlora_dist " + command +
                       " config.ini [--section.key=value ...]; see --help)");
    if (!ini.empty() && !fs::is_regular_file(ini))
      throw std::invalid_argument(ini + ": configuration file does not exist");
    if (command == "eval") {
      overrides.emplace_back("train.do_train", "false");
      overrides.emplace_back("train.do_eval", "true");
    }
    r.cfg = config_read(ini, overrides);
    r.warnings = config_guards(r.cfg, r.env.world_size);
    if (r.cfg.device == "cuda")
      throw std::invalid_argument("model.device = cuda: this release trains on the CPU path only "
                                  "(the CUDA kernels and NCCL are built but not wired in yet)");
    if (r.cfg.backend == "nccl")
      throw std::invalid_argument("dist.backend = nccl needs model.device = cuda; use mpi or auto");
    r.source = UnitSource::open(r.cfg.model_name_or_path, trainer_options(r.cfg).quant);
    const int64_t vocab = r.source->spec().config.vocab_size;
    if (r.cfg.do_train) r.train_data.emplace(r.cfg.train_file, r.cfg.cutoff_len, vocab);
    if (!r.cfg.eval_file.empty()) r.eval_data.emplace(r.cfg.eval_file, r.cfg.cutoff_len, vocab);
    if (command == "eval" && r.cfg.eval_file.empty())
      throw std::invalid_argument("data.eval_file is required for qlora_dist eval");
    r.plan = output_plan(r.cfg);
    if (r.env.rank == 0) output_dir_prepare(r.plan);
  } catch (const UsageError& e) {
    error = e.what();
    status = 2;
  } catch (const std::exception& e) {
    error = e.what();
    status = 1;
  }
  int mine[2] = {status, status != 0 ? r.env.rank : r.env.world_size};
  int worst[2] = {0, 0};
  int first_failing = 0;
  QLORA_MPI_CHECK(MPI_Allreduce(&mine[0], &worst[0], 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD));
  QLORA_MPI_CHECK(MPI_Allreduce(&mine[1], &first_failing, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
  if (worst[0] != 0) {
    if (status != 0 && r.env.rank == first_failing) {
      const std::string where =
          r.env.world_size > 1 && r.env.rank != 0 ? "[rank " + std::to_string(r.env.rank) + "] " : "";
      std::fprintf(stderr, "%s%s%s\n", where.c_str(), prefix.c_str(), error.c_str());
      std::fflush(stderr);
    }
    r.close_files();
    dist::rank_env_finalize();
    return worst[0];
  }

  // Phase 2: the run. From here an error on any rank ends the job (MPI_Abort).
  try {
    const int rc = run(r, command);
    r.close_files();
    dist::rank_env_finalize();
    return rc;
  } catch (const std::exception& e) {
    dist::job_abort(prefix + e.what(), 1);
  }
}

}  // namespace qlora::train
