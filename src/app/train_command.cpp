// The training application: see train_command.h.
#include "app/train_command.h"

#include <ATen/Parallel.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <stdexcept>
#include <thread>

#include "app/config.h"
#include "app/job_options.h"
#include "app/node_checks.h"
#include "app/usage_error.h"
#include "data/prepare.h"
#include "dist/communicator.h"
#include "dist/device_context.h"
#include "dist/rank_env.h"
#include "io/atomic_write.h"
#include "io/shape_str.h"
#include "lora/peft_adapter.h"
#include "model/model_config.h"
#include "train/activation_memory.h"
#include "train/job.h"
#include "train/sharded_model.h"

namespace fs = std::filesystem;

namespace qlora::app {

namespace {

// SIGTERM / SIGUSR1 (SLURM's time limit and preemption) and SIGINT only set this flag; the job
// acts on it at the next step boundary, after every rank has agreed (one all-reduce).
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

// Intra-op threads: this node's cores shared among its ranks, but never more than the CPUs the
// launcher bound this rank to (Open MPI binds each rank to one core when np <= 2). Returns a
// warning when the binding holds the rank back ("" otherwise).
std::string threads_set(const dist::RankEnv& env) {
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int want = std::max(1, cores / std::max(1, env.local_world_size));
  cpu_set_t allowed_set;
  CPU_ZERO(&allowed_set);
  const int allowed = sched_getaffinity(0, sizeof allowed_set, &allowed_set) == 0
                          ? std::max(1, CPU_COUNT(&allowed_set))
                          : want;
  const int threads = std::min(want, allowed);
  at::set_num_threads(threads);
  if (allowed >= want) return "";
  return "the launcher bound each rank to " + std::to_string(allowed) + " CPU(s) while " +
         std::to_string(want) + " per rank are free; using " + std::to_string(threads) +
         " thread(s) (mpirun --bind-to none, or --map-by slot:PE=" + std::to_string(want) +
         ", gives each rank its share)";
}

struct Checked {
  TrainConfig config;
  std::string train_file, eval_file;  // HDF5 token files (data.train_file or tokenized)
  std::vector<std::string> warnings;
  train::JobOptions options;
  train::JobInputs inputs;
};

// Opens the token files (those given, or those rank 0 tokenized: then after phase 1 agreed).
void phase1_open_data(Checked& r) {
  const TrainConfig& c = r.config;
  const int64_t vocab = r.inputs.source->spec().config.vocab_size;
  const auto open = [&](const std::string& path) {
    return c.stage == "dpo" ? train::BatchData(data::PairDataset(path, c.cutoff_len, vocab))
                            : train::BatchData(data::TokenDataset(path, c.cutoff_len, vocab));
  };
  if (c.do_train && !r.inputs.train_data) r.inputs.train_data.emplace(open(r.train_file));
  if (!r.eval_file.empty() && !r.inputs.eval_data) r.inputs.eval_data.emplace(open(r.eval_file));
}

// Phase 1a on this rank, no file but the INI read: the configuration, its guards, the typed
// options. Throws what the user must fix.
void phase1_config(Checked& r, const std::string& command, const std::string& ini,
                   std::vector<std::pair<std::string, std::string>> overrides,
                   const dist::RankEnv& env) {
  if (ini.empty() && overrides.empty())
    throw UsageError("no configuration (usage: qlora_dist " + command +
                     " config.ini [--section.key=value ...]; see --help)");
  if (!ini.empty() && !fs::is_regular_file(ini))
    throw std::invalid_argument(ini + ": configuration file does not exist");
  if (command == "eval") {
    overrides.emplace_back("train.do_train", "false");
    overrides.emplace_back("train.do_eval", "true");
  }
  r.config = config_read(ini, overrides);
  const dist::GpuVisibility gpus = dist::gpus_visible();
  r.config.gpus_visible = gpus.count;
  r.config.gpus_reason = gpus.reason;
  r.warnings = config_guards(r.config, env.world_size);
  // One GPU per rank: the local rank's (the same numbering Open MPI's OMPI_COMM_WORLD_LOCAL_RANK,
  // SLURM_LOCALID and torchrun's LOCAL_RANK give; RankEnv cross-checks them).
  if (config_device(r.config) == "cuda" && env.local_world_size > gpus.count)
    throw std::invalid_argument(
        "model.device = cuda: " + std::to_string(env.local_world_size) +
        " ranks on this node but only " + std::to_string(gpus.count) +
        " GPU(s) visible; start at most one rank per GPU (mpirun --npernode " +
        std::to_string(gpus.count) + ", srun --ntasks-per-node=" + std::to_string(gpus.count) +
        ") or set model.device = cpu");
  r.options = job_options(r.config);
}

// The paths every node must see as rank 0 does (node_paths_check), from the configuration.
KeyedPaths node_paths(const TrainConfig& c) {
  KeyedPaths paths = {{"model.model_name_or_path", c.model_name_or_path}};
  auto add = [&](const std::string& key, const std::string& list) {
    for (const std::string& p : config_split_list(list)) paths.emplace_back(key, p);
  };
  add("model.adapter_name_or_path", c.adapter_name_or_path);
  add("model.tokenizer_name_or_path", c.tokenizer_name_or_path);
  add("data.train_file", c.train_file);
  add("data.eval_file", c.eval_file);
  add("data.dataset", c.dataset);
  add("data.eval_dataset", c.eval_dataset);
  return paths;
}

// Phase 1b on this rank, after every rank passed phase 1a and the node checks: the model, the
// data, the output directory (rank 0 creates it), tokenization (rank 0). Throws what the user
// must fix.
// The adapter to start from, read and checked against the model's linears here, where every
// rank agrees on the outcome (one line), rather than when the trainer loads it (every rank fails
// there on its own).
void adapter_check(const std::string& dir, const model::ModelConfig& config) {
  const lora::PeftAdapter adapter = lora::peft_adapter_read(dir);
  const std::string file = (fs::path(dir) / "adapter_model.safetensors").string();
  const auto shapes = model::expected_weight_shapes(config);
  const int64_t rank = adapter.config.rank;
  for (const auto& [layer, ab] : adapter.weights) {
    const auto it = shapes.find(layer + ".weight");
    if (it == shapes.end() || it->second.size() != 2)
      throw std::invalid_argument(file + ": layer '" + layer + "' is not a linear of the model " +
                                  config.architecture + " (" +
                                  std::to_string(config.num_hidden_layers) + " layers)");
    const std::vector<int64_t> want_a = {rank, it->second[1]}, want_b = {it->second[0], rank};
    if (ab.first.sizes().vec() != want_a || ab.second.sizes().vec() != want_b)
      throw std::invalid_argument(
          file + ": layer '" + layer + "': lora_A " + io::shape_str(ab.first.sizes().vec()) +
          " and lora_B " + io::shape_str(ab.second.sizes().vec()) +
          " do not fit the model (an adapter for another model?); rank " + std::to_string(rank) +
          " on this layer needs lora_A " + io::shape_str(want_a) + " and lora_B " +
          io::shape_str(want_b));
  }
}

// Refuses a training configuration whose estimated activations (train/activation_memory.h) of
// one micro-batch exceed half of this node's memory per local rank; before any heavy work.
void activations_check(const Checked& r, const dist::RankEnv& env) {
  const TrainConfig& c = r.config;
  const train::TrainerOptions& t = r.options.trainer;
  // On cuda the activations live on the rank's GPU (one rank per GPU), else in host memory
  // shared by the node's ranks.
  const bool gpu = config_device(c) == "cuda";
  const int64_t memory = gpu ? dist::gpu_memory_bytes(env.local_rank) : node_memory_bytes();
  if (!c.do_train || memory <= 0) return;
  train::ActivationShape shape;
  shape.compute_dtype = compute_dtype_of(c);
  shape.lora_rank = t.lora.rank;
  shape.lora_targets = t.targets;
  shape.lora_dropout = t.lora.dropout > 0.0;
  const model::ModelConfig& mc = r.inputs.source->spec().config;
  const int64_t rows = c.per_device_train_batch_size * (t.preference ? 2 : 1);
  const int64_t tokens = rows * c.cutoff_len;
  const int64_t need =
      train::step_activation_bytes(mc, shape, tokens, t.gradient_checkpointing, t.chunk_tokens);
  const int64_t local = gpu ? 1 : std::max(1, env.local_world_size);
  const int64_t budget = memory / 2 / local;
  if (need <= budget) return;
  const auto gib = [](int64_t b) {
    char s[32];
    std::snprintf(s, sizeof s, "%.1f GiB", static_cast<double>(b) / (1024.0 * 1024.0 * 1024.0));
    return std::string(s);
  };
  std::string advice;
  if (!t.gradient_checkpointing) {
    advice = "set train.gradient_checkpointing = true (estimated " +
             gib(train::step_activation_bytes(mc, shape, tokens, true, t.chunk_tokens)) +
             ") or lower train.per_device_train_batch_size or data.cutoff_len";
  } else {
    advice = "lower train.per_device_train_batch_size or data.cutoff_len";
  }
  throw std::invalid_argument(
      std::string("train.gradient_checkpointing = ") +
      (t.gradient_checkpointing ? "true" : "false") + ": the activations of one micro-batch (" +
      std::to_string(rows) + " rows x " + std::to_string(c.cutoff_len) +
      " tokens) are estimated at " + gib(need) + " per rank, more than half of " +
      (gpu ? "this rank's GPU's " + gib(memory) + " memory"
           : "this node's " + gib(memory) + " memory shared by " + std::to_string(local) +
                 " rank(s)") +
      " (" + gib(budget) + "); " + advice);
}

void phase1(Checked& r, const std::string& command, const dist::RankEnv& env) {
  const TrainConfig& c = r.config;
  r.inputs.source = train::UnitSource::open(c.model_name_or_path, r.options.trainer.quant);
  activations_check(r, env);
  if (!c.adapter_name_or_path.empty())
    adapter_check(c.adapter_name_or_path, r.inputs.source->spec().config);
  if (command == "eval" && c.eval_file.empty() && c.eval_dataset.empty() && c.val_size == 0)
    throw std::invalid_argument(
        "data.eval_file (or data.eval_dataset / data.val_size) is required for qlora_dist eval");
  // Ready token files are opened (and checked) before anything is written.
  r.train_file = c.train_file;
  r.eval_file = c.eval_file;
  const bool json_data = !c.dataset.empty() || !c.eval_dataset.empty();
  if (!json_data) phase1_open_data(r);
  // What killed saves left goes first (rank 0 only; the others take rank 0's choice of checkpoint).
  if (env.rank == 0 && fs::is_directory(r.options.output.dir))
    train::output_dir_tidy(r.options.output.dir);
  r.inputs.plan = train::output_plan(r.options.output, r.inputs.source->spec().config);
  const bool output_dir_existed = fs::exists(r.inputs.plan.dir);
  if (env.rank == 0) train::output_dir_prepare(r.inputs.plan);
  if (env.rank == 0 && !r.inputs.plan.fallback_note.empty()) {
    std::fprintf(stderr, "qlora_dist %s: warning: %s\n", command.c_str(),
                 r.inputs.plan.fallback_note.c_str());
    std::fflush(stderr);
  }
  // JSON datasets: rank 0 tokenizes them into the cache (unless it holds them already); the
  // other ranks learn the file names after the agreement that ends phase 1 and open them then.
  if (json_data) {
    const data::PrepareOptions prep = prepare_options(c);
    const fs::path dir = !c.tokenized_path.empty()
                             ? fs::path(c.tokenized_path)
                             : r.inputs.plan.dir / "data" / data::prepare_key(prep);
    const bool has_eval = !prep.eval_dataset.empty() || prep.val_size > 0;
    const fs::path train_h5 = dir / "train.h5", eval_h5 = dir / "eval.h5";
    if (!c.dataset.empty()) r.train_file = train_h5.string();
    if (has_eval) r.eval_file = eval_h5.string();
    if (env.rank == 0) {
      if (fs::exists(train_h5) && (!has_eval || fs::exists(eval_h5))) {
        std::printf("data: re-using the tokenized dataset in %s\n", dir.c_str());
      } else {
        std::error_code ec;
        fs::create_directories(dir, ec);
        if (ec)
          throw std::invalid_argument("data.tokenized_path " + dir.string() +
                                      " cannot be created (" + ec.message() + ")");
        // A half-written pair (a crash between the two files) is made again.
        fs::remove(train_h5);
        fs::remove(eval_h5);
        data::PrepareReport report;
        try {
          report = data::prepare_write(prep, train_h5.string(), has_eval ? eval_h5.string() : "");
        } catch (...) {
          // Nothing of a failed tokenization stays: a train file without its eval file is no
          // cache entry, and directories we made are removed when empty (fs::remove leaves a
          // non-empty one, e.g. a tokenized_path holding other files).
          fs::remove(train_h5, ec);
          fs::remove(dir, ec);
          fs::remove(r.inputs.plan.dir / "data", ec);
          if (!output_dir_existed) fs::remove(r.inputs.plan.dir, ec);
          throw;
        }
        std::printf("data: tokenized into %s\n%s", dir.c_str(), report.summary().c_str());
      }
      std::fflush(stdout);
    }
  }
}

// The phase-1 agreements on MPI_COMM_WORLD (before the communicator and its watchdog exist) wait
// like the watchdog does: a request tested every 20 ms without spinning (rank 0 may tokenize for
// minutes while the others wait, and a busy-polling MPI_Barrier would take their cores from it),
// with the deadline dist.timeout_s (the default when this rank's configuration did not parse).
// Which ranks had not arrived cannot be told here; the line names the agreement instead.
// timeout_s <= 0: no deadline (the wait on rank 0's tokenization of JSON datasets).
void request_wait(MPI_Request& req, const char* what, double timeout_s) {
  const auto start = std::chrono::steady_clock::now();
  int done = 0;
  while (true) {
    QLORA_MPI_CHECK(MPI_Test(&req, &done, MPI_STATUS_IGNORE));
    if (done) return;
    const double waited =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (timeout_s > 0 && waited > timeout_s) {
      char line[256];
      std::snprintf(line, sizeof line,
                    "watchdog: %s did not complete within dist.timeout_s = %.1f s (waited %.1f "
                    "s): another rank has not arrived; ending the job",
                    what, timeout_s, waited);
      dist::job_abort(line, 1);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

// Every rank learns the worst status (2 usage > 1 input error > 0); the lowest failing rank
// prints its message. Returns the worst status. `barrier_timeout_s` bounds the first wait (the
// one that may cover rank 0's tokenization), `timeout_s` the rest.
int agree(int status, const std::string& error, const dist::RankEnv& env,
          const std::string& prefix, double barrier_timeout_s, double timeout_s) {
  MPI_Request req;
  QLORA_MPI_CHECK(MPI_Ibarrier(MPI_COMM_WORLD, &req));
  request_wait(req, "the agreement after the configuration checks (barrier)", barrier_timeout_s);
  int mine[2] = {status, status != 0 ? env.rank : env.world_size};
  int worst = 0, first_failing = 0;
  QLORA_MPI_CHECK(MPI_Iallreduce(&mine[0], &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD, &req));
  request_wait(req, "the agreement after the configuration checks (worst status)", timeout_s);
  QLORA_MPI_CHECK(
      MPI_Iallreduce(&mine[1], &first_failing, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD, &req));
  request_wait(req, "the agreement after the configuration checks (failing rank)", timeout_s);
  if (worst != 0 && status != 0 && env.rank == first_failing) {
    const std::string where =
        env.world_size > 1 && env.rank != 0 ? "[rank " + std::to_string(env.rank) + "] " : "";
    std::fprintf(stderr, "%s%s%s\n", where.c_str(), prefix.c_str(), error_line(error).c_str());
    std::fflush(stderr);
  }
  return worst;
}

// The file names rank 0 decided, on every rank (they depend on its view of the files only).
std::string broadcast_string(const std::string& s, const dist::RankEnv& env, double timeout_s) {
  int n = env.rank == 0 ? static_cast<int>(s.size()) : 0;
  MPI_Request req;
  QLORA_MPI_CHECK(MPI_Ibcast(&n, 1, MPI_INT, 0, MPI_COMM_WORLD, &req));
  request_wait(req, "the broadcast of the token file names", timeout_s);
  std::string out = env.rank == 0 ? s : std::string(static_cast<size_t>(n), '\0');
  QLORA_MPI_CHECK(MPI_Ibcast(out.data(), n, MPI_CHAR, 0, MPI_COMM_WORLD, &req));
  request_wait(req, "the broadcast of the token file names", timeout_s);
  return out;
}

// Phase 2: the run. Reads top to bottom: threads, communicator and device, the resolved
// configuration on rank 0, the job.
int phase2(Checked& r, const std::string& command, const dist::RankEnv& env) {
  const std::string thread_warning = threads_set(env);
  const std::string placement = placement_describe(env, at::get_num_threads());
  stop_signals_install();
  const dist::Device where = device_of(r.config);
  // The device first (the NCCL communicator is made on the current GPU), then the communicator.
  dist::DeviceContext device(where, compute_dtype_of(r.config), env.local_rank);
  const bool nccl = where == dist::Device::cuda && r.config.backend != "mpi";
  std::unique_ptr<dist::Communicator> comm =
      nccl ? dist::communicator_nccl(env, env.local_rank) : dist::communicator_mpi(env);
  device.comm_set(*comm);
  comm->timeout_set(r.options.comm_timeout_s);
  comm->context_set("start of the run");
  if (env.rank == 0) {
    if (r.inputs.plan.wipe) train::output_dir_wipe(r.inputs.plan.dir);
    io::file_write_atomic(r.inputs.plan.dir / "config.ini", r.options.config_ini);
    std::printf("qlora_dist %s: %d rank(s), resolved configuration:\n%s", command.c_str(),
                env.world_size, r.options.config_ini.c_str());
    std::printf("%s\n", placement.c_str());
    std::printf("%s\n", config_compute_dtype_reason(r.config).c_str());
    std::printf("device: %s (model.device = %s; %d GPU(s) visible), collectives: %s\n",
                where == dist::Device::cuda ? "cuda, the GPU of each rank's local rank" : "cpu",
                r.config.device.c_str(), r.config.gpus_visible, comm->backend_name().c_str());
    for (const std::string& w : r.warnings) std::printf("warning: %s\n", w.c_str());
    if (!thread_warning.empty()) std::printf("warning: %s\n", thread_warning.c_str());
    std::fflush(stdout);
  }
  comm->barrier();
  train::JobHooks hooks;
  hooks.log = [](const std::string& line) {
    std::printf("%s\n", line.c_str());
    std::fflush(stdout);
  };
  const std::string prefix = "qlora_dist " + command + ": error: ";
  hooks.error = [prefix](const std::string& line) {
    std::fprintf(stderr, "%s%s\n", prefix.c_str(), error_line(line).c_str());
    std::fflush(stderr);
  };
  hooks.stop_signal = [] { return static_cast<int>(g_stop_signal); };
  return train::job_run(r.options, r.inputs, device, hooks);
}

}  // namespace

std::vector<std::pair<std::string, std::string>> parse_overrides(
    const std::vector<std::string>& args, std::string& ini, bool& help,
    std::vector<std::pair<std::string, std::string>>* own_options) {
  std::vector<std::pair<std::string, std::string>> out;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      help = true;
    } else if (a.rfind("--", 0) == 0) {
      const size_t eq = a.find('=');
      std::string key = a.substr(2, eq == std::string::npos ? std::string::npos : eq - 2);
      std::string value;
      if (eq != std::string::npos) {
        value = a.substr(eq + 1);
      } else {
        if (i + 1 >= args.size())
          throw UsageError("option " + a + " needs a value (--section.key=value)");
        value = args[++i];
      }
      // A command's own options have no section ("--out"); configuration keys always do.
      if (own_options && key.find('.') == std::string::npos)
        own_options->emplace_back(key, value);
      else
        out.emplace_back(key, value);
    } else if (ini.empty()) {
      ini = a;
    } else {
      throw UsageError("unexpected argument '" + a + "' (one config file, then --section.key=value)");
    }
  }
  return out;
}

int train_command_main(const std::string& command, const std::vector<std::string>& args, int* argc,
                       char*** argv) {
  const std::string prefix = "qlora_dist " + command + ": error: ";
  // Usage first, without MPI: --help and a command line that does not parse.
  std::string ini;
  bool help = false;
  std::vector<std::pair<std::string, std::string>> overrides;
  try {
    overrides = parse_overrides(args, ini, help, nullptr);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "%s%s\n", prefix.c_str(), error_line(e.what()).c_str());
    return 2;
  }
  if (help) {
    std::cout << "usage: qlora_dist " << command
              << " config.ini [--section.key=value ...]\n\nkeys (INI [section] key = value):\n"
              << config_help();
    return 0;
  }

  dist::RankEnv env;
  try {
    env = dist::rank_env_init(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s%s\n", prefix.c_str(), error_line(e.what()).c_str());
    return 1;
  }
  // Phase 1 on every rank; the message is printed once (by rank 0, or by the lowest failing rank
  // when rank 0 passed). Then the token files, which rank 0 may have just written.
  Checked r;
  auto attempt = [&](auto&& f) {
    std::string error;
    int status = 0;
    try {
      f();
    } catch (const UsageError& e) {
      error = e.what();
      status = 2;
    } catch (const std::exception& e) {
      error = e.what();
      status = 1;
    }
    // This rank's dist.timeout_s once its configuration parsed (the default before); the wait
    // that may cover rank 0's tokenization of JSON datasets has no deadline.
    const double timeout_s = r.options.comm_timeout_s;
    const bool tokenizing = !r.config.dataset.empty() || !r.config.eval_dataset.empty();
    return agree(status, error, env, prefix, tokenizing ? 0.0 : timeout_s, timeout_s);
  };
  int worst = attempt([&] { phase1_config(r, command, ini, overrides, env); });
  // Every node sees output_dir, the model and the data as rank 0 does (else one line, exit 1).
  if (worst == 0) {
    const std::string blind = node_paths_check(r.options.output.dir, node_paths(r.config), env);
    if (!blind.empty()) {
      if (env.rank == 0) std::fprintf(stderr, "%s%s\n", prefix.c_str(), error_line(blind).c_str());
      worst = 1;
    }
  }
  if (worst == 0) worst = attempt([&] { phase1(r, command, env); });
  if (worst == 0) {
    r.train_file = broadcast_string(r.train_file, env, r.options.comm_timeout_s);
    r.eval_file = broadcast_string(r.eval_file, env, r.options.comm_timeout_s);
    // Every rank resumes from the checkpoint rank 0 chose (each checked them; a rank that saw
    // them differently must not pick another one).
    r.inputs.plan.resume =
        broadcast_string(r.inputs.plan.resume.string(), env, r.options.comm_timeout_s);
    worst = attempt([&] { phase1_open_data(r); });
  }
  if (worst != 0) {
    r.inputs.close();
    dist::rank_env_finalize();
    return worst;
  }

  // Phase 2: from here an error on any rank ends the job (MPI_Abort).
  try {
    const int rc = phase2(r, command, env);
    r.inputs.close();
    dist::rank_env_finalize();
    return rc;
  } catch (const std::exception& e) {
    dist::job_abort(prefix + error_line(e.what()), 1);
  }
}

}  // namespace qlora::app
