// Output directory and checkpoints: see checkpoint.h.
#include "train/checkpoint.h"

#include <algorithm>
#include <fstream>
#include <map>
#include <regex>
#include <stdexcept>

#include "dist/device_context.h"
#include "io/atomic_write.h"
#include "io/h5_file.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "io/shape_str.h"
#include "train/sharded_model.h"
#include "lora/peft_adapter.h"
#include "lora/peft_config.h"

namespace fs = std::filesystem;

namespace qlora::train {

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


OutputPlan output_plan(const OutputOptions& o, const model::ModelConfig& model) {
  OutputPlan plan;
  plan.dir = o.dir;
  const std::string dir = o.dir.string();
  const fs::path state = plan.dir / "trainer_state.json";
  if (fs::exists(plan.dir) && !fs::is_directory(plan.dir))
    throw std::invalid_argument("output.output_dir " + dir + " exists and is not a directory");
  if (o.overwrite) {
    plan.wipe = fs::exists(plan.dir);
    if (o.resume == ResumeMode::path)
      throw std::invalid_argument("output.overwrite_output_dir = true with resume_from_checkpoint = " +
                                  o.resume_path.string() + ": choose one");
    return plan;
  }
  if (fs::exists(state) && io::json_file_read(state).value("finished", false))
    throw std::invalid_argument("output.output_dir " + dir +
                                " holds a finished run (trainer_state.json); set "
                                "output.overwrite_output_dir = true or choose another output_dir");
  const auto ckpts = checkpoints_in(plan.dir);
  switch (o.resume) {
    case ResumeMode::auto_latest: {
      // Newest first; a damaged one is passed over (and named), never taken.
      std::string passed;
      for (auto it = ckpts.rbegin(); it != ckpts.rend() && plan.resume.empty(); ++it) {
        try {
          checkpoint_check(it->second, model);
          plan.resume = it->second;
        } catch (const std::exception& e) {
          passed += (passed.empty() ? "" : "; ") + it->second.filename().string() +
                    " is not usable (" + e.what() + ")";
        }
      }
      if (!ckpts.empty() && plan.resume.empty())
        throw std::invalid_argument("output.output_dir " + dir + " holds no usable checkpoint: " +
                                    passed + "; remove the damaged checkpoints or set "
                                    "output.overwrite_output_dir = true to start over");
      if (!passed.empty())
        plan.fallback_note = passed + "; resuming from the previous complete checkpoint, " +
                             plan.resume.filename().string();
      break;
    }
    case ResumeMode::none:
      if (!ckpts.empty())
        throw std::invalid_argument("output.output_dir " + dir + " holds checkpoints (" +
                                    ckpts.back().second.filename().string() +
                                    "); set output.resume_from_checkpoint = auto to continue or "
                                    "output.overwrite_output_dir = true to start over");
      break;
    case ResumeMode::path:
      plan.resume = o.resume_path;
      if (!fs::exists(plan.resume / "trainer_state.json"))
        throw std::invalid_argument("output.resume_from_checkpoint " + o.resume_path.string() +
                                    " is not a complete checkpoint (no trainer_state.json)");
      try {
        checkpoint_check(plan.resume, model);
      } catch (const std::exception& e) {
        throw std::invalid_argument("output.resume_from_checkpoint " + o.resume_path.string() +
                                    " is damaged: " + e.what());
      }
      break;
    default:
      throw std::invalid_argument("output.resume_from_checkpoint: unknown mode " +
                                  std::to_string(static_cast<int>(o.resume)));
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
  for (const auto& [step, path] : checkpoints_in(dir)) fs::remove_all(path);
  fs::remove_all(dir / "runs");
  for (const char* f : {"trainer_state.json", "metrics.jsonl", "eval_metrics.jsonl",
                        "adapter_config.json", "adapter_model.safetensors", "config.ini",
                        "eval_results.json"})
    fs::remove(dir / f);
}

void output_dir_tidy(const fs::path& dir) {
  static const std::regex re(R"(\.checkpoint-(\d+)\.(tmp|removing|replaced))");
  std::vector<std::pair<fs::path, std::string>> found;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    std::smatch m;
    const std::string name = e.path().filename().string();
    if (std::regex_match(name, m, re)) found.emplace_back(e.path(), m[1].str());
  }
  for (const auto& [path, step] : found) {
    const fs::path complete = dir / ("checkpoint-" + step);
    if (path.extension() == ".replaced" && !fs::exists(complete)) {
      fs::rename(path, complete);  // cut between the two renames of a replacement: put it back
    } else {
      fs::remove_all(path);
    }
  }
  io::path_sync(dir);
}

nlohmann::ordered_json TrainerState::to_json() const {
  nlohmann::ordered_json st;
  st["step"] = step;
  st["optimizer_steps"] = optimizer_steps < 0 ? step : optimizer_steps;
  st["total_steps"] = total_steps;
  st["epoch"] = epoch;
  st["world_size"] = world_size;
  st["global_batch"] = global_batch;
  st["samples_seen"] = step * global_batch;
  st["next_learning_rate"] = next_learning_rate;
  st["seed"] = seed;
  st["rng"] = "stateless: data order and dropout masks are functions of (seed, step, "
              "micro-step, rank, block)";
  st["finished"] = finished;
  if (!files.empty()) {
    nlohmann::ordered_json f = nlohmann::ordered_json::object();
    for (const auto& [name, nbytes] : files) f[name] = nbytes;
    st["files"] = f;
  }
  return st;
}

TrainerState trainer_state_read(const fs::path& checkpoint_dir) {
  const fs::path file = checkpoint_dir / "trainer_state.json";
  const nlohmann::json j = io::json_file_read(file);
  TrainerState s;
  try {
    s.step = j.at("step").get<int64_t>();
    s.optimizer_steps = j.value("optimizer_steps", s.step);  // older checkpoints: no skips
    s.total_steps = j.value("total_steps", int64_t{0});
    s.epoch = j.value("epoch", 0.0);
    s.world_size = j.at("world_size").get<int64_t>();
    s.global_batch = j.at("global_batch").get<int64_t>();
    s.next_learning_rate = j.value("next_learning_rate", 0.0);
    s.seed = j.value("seed", int64_t{0});
    s.finished = j.value("finished", false);
    if (j.contains("files"))
      for (const auto& [name, nbytes] : j.at("files").items())
        s.files.emplace_back(name, nbytes.get<int64_t>());
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument(file.string() + ": " + e.what());
  }
  return s;
}

void checkpoint_check(const fs::path& dir, const model::ModelConfig& model) {
  const fs::path state_file = dir / "trainer_state.json";
  const TrainerState st = trainer_state_read(dir);
  const auto bad = [](const fs::path& file, const std::string& what) {
    return std::invalid_argument(file.string() + ": " + what);
  };
  static const std::regex re(R"(checkpoint-(\d+))");
  std::smatch m;
  const std::string name = dir.filename().string();
  if (std::regex_match(name, m, re) && std::to_string(st.step) != m[1].str())
    throw bad(state_file, "step " + std::to_string(st.step) + " does not match the directory " +
                              name + " (edited or copied over)");
  if (st.step < 1 || st.world_size < 1 || st.world_size > (1 << 20) || st.global_batch < 1 ||
      st.optimizer_steps < 0 || st.optimizer_steps > st.step)
    throw bad(state_file, "step " + std::to_string(st.step) + ", optimizer_steps " +
                              std::to_string(st.optimizer_steps) + ", world_size " +
                              std::to_string(st.world_size) + ", global_batch " +
                              std::to_string(st.global_batch) +
                              " (expected step >= 1, 0 <= optimizer_steps <= step, world_size >= "
                              "1, global_batch >= 1)");
  // Every size the writer recorded (a truncated or swapped file).
  for (const auto& [rel, nbytes] : st.files) {
    const fs::path f = dir / rel;
    std::error_code ec;
    const auto size = fs::file_size(f, ec);
    if (ec) throw bad(f, "missing (trainer_state.json lists it)");
    if (static_cast<int64_t>(size) != nbytes)
      throw bad(f, std::to_string(size) + " bytes, trainer_state.json records " +
                       std::to_string(nbytes) + " (truncated or replaced)");
  }

  // The adapter: the tensors the model and the adapter's own r and target_modules give.
  const fs::path config_file = dir / "adapter_config.json";
  // The same reader (and its checks) as any adapter a user hands us.
  const lora::PeftConfigFile cfg = lora::peft_config_read(config_file.string());
  if (!cfg.target_modules)
    throw bad(config_file, "target_modules is not a list (a checkpoint's adapter names its modules)");
  const int64_t rank = cfg.rank;
  if (rank < 1 || rank > (1 << 16)) throw bad(config_file, "r = " + std::to_string(rank));
  const std::vector<std::string> targets(cfg.target_modules->begin(), cfg.target_modules->end());
  const std::vector<dist::UnitLayout> units = lora_units(model, rank, targets);
  const fs::path weights_file = dir / "adapter_model.safetensors";
  const auto weights = io::SafetensorsFile::open(weights_file.string());
  size_t expected = 0;
  for (const dist::UnitLayout& u : units)
    for (const dist::Segment& seg : u.segments) {
      ++expected;
      const std::string key = "base_model.model." + seg.name;
      const io::TensorInfo* info = weights->find(key);
      if (info == nullptr)
        throw bad(weights_file, "no tensor " + key + " (adapter_config.json: r " +
                                    std::to_string(rank) + ")");
      if (info->shape != seg.shape)
        throw bad(weights_file, "tensor " + key + " has shape " + io::shape_str(info->shape) +
                                    " (expected " + io::shape_str(seg.shape) +
                                    " for this model with r " + std::to_string(rank) + ")");
    }
  if (weights->tensors().size() != expected)
    throw bad(weights_file, std::to_string(weights->tensors().size()) + " tensors (expected " +
                                std::to_string(expected) + " for this model's target_modules)");

  // Optimizer shards: each opens (HDF5 checks its end of file), names its rank, and the byte
  // ranges of all shards tile each unit's payload.
  std::map<std::string, std::vector<std::pair<int64_t, int64_t>>> ranges;
  for (int64_t q = 0; q < st.world_size; ++q) {
    const fs::path p = dir / "optimizer" / ("rank" + std::to_string(q) + ".h5");
    if (!fs::exists(p))
      throw bad(p, "missing (the checkpoint was written by " + std::to_string(st.world_size) +
                       " ranks)");
    const io::H5File f = io::H5File::open_read(p.string());
    if (f.attr_int64("/", "rank") != q || f.attr_int64("/", "world_size") != st.world_size)
      throw bad(p, "written by rank " + std::to_string(f.attr_int64("/", "rank")) + " of " +
                       std::to_string(f.attr_int64("/", "world_size")) + " (expected rank " +
                       std::to_string(q) + " of " + std::to_string(st.world_size) + ")");
    for (const dist::UnitLayout& u : units)
      for (const char* which : {"exp_avg", "exp_avg_sq"}) {
        const std::string ds = u.name + "/" + which;
        const int64_t b = f.attr_int64(ds, "begin"), e = f.attr_int64(ds, "end");
        if (b < 0 || e < b || static_cast<int64_t>(f.nbytes(ds)) != e - b)
          throw bad(p, "'" + ds + "' holds " + std::to_string(f.nbytes(ds)) + " bytes for [" +
                           std::to_string(b) + ", " + std::to_string(e) + ")");
        if (e > b) ranges[ds].emplace_back(b, e);
      }
  }
  for (const dist::UnitLayout& u : units)
    for (const char* which : {"exp_avg", "exp_avg_sq"}) {
      auto& r = ranges[u.name + "/" + which];
      std::sort(r.begin(), r.end());
      int64_t next = 0;
      for (const auto& [b, e] : r) next = b == next ? e : -1;
      if (next != static_cast<int64_t>(u.nbytes))
        throw bad(dir / "optimizer", "the shards do not cover the " + std::to_string(u.nbytes) +
                                         " bytes of " + u.name + "/" + which + " exactly once");
    }
}

namespace {

void optimizer_write(Trainer& trainer, const fs::path& file, int rank, int world_size) {
  io::H5File f = io::H5File::create(file.string());
  f.set_attr_int64("/", "rank", rank);
  f.set_attr_int64("/", "world_size", world_size);
  for (const Trainer::OptimizerShard& s : trainer.optimizer_shards()) {
    for (const auto& [which, t] : {std::pair<const char*, at::Tensor>{"exp_avg", s.exp_avg},
                                   std::pair<const char*, at::Tensor>{"exp_avg_sq", s.exp_avg_sq}}) {
      const std::string name = s.unit + "/" + which;
      const at::Tensor host = dist::DeviceContext::to_host(t.contiguous());
      f.write_bytes(name, host.data_ptr<uint8_t>(), static_cast<size_t>(host.numel()));
      f.set_attr_int64(name, "begin", static_cast<int64_t>(s.begin));
      f.set_attr_int64(name, "end", static_cast<int64_t>(s.end));
    }
  }
  f.close();
}

// Each old rank's file holds bytes [begin, end) of each unit's payload.
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

}  // namespace

namespace {

// The end of one stage of a save: every rank learns whether any failed. When one did, rank 0
// removes the temporary directory and every rank throws CheckpointWriteError, reported by the
// lowest failing rank only. `nbytes`: this rank's file size, gathered into `sizes`.
void save_agree(dist::Communicator& comm, const std::string& error, const fs::path& tmp,
                int64_t nbytes = 0, std::vector<int64_t>* sizes = nullptr) {
  const int world = comm.world_size(), rank = comm.rank();
  std::vector<double> v(2 + static_cast<size_t>(world), 0.0);
  v[0] = error.empty() ? 0.0 : 1.0;
  v[1] = -static_cast<double>(error.empty() ? world : rank);  // max: minus the lowest failing rank
  v[2 + rank] = static_cast<double>(nbytes);
  comm.all_reduce_host(v.data(), static_cast<int64_t>(v.size()), dist::ReduceOp::max);
  if (sizes)
    for (int q = 0; q < world; ++q) sizes->push_back(static_cast<int64_t>(v[2 + q]));
  if (v[0] == 0.0) return;
  if (rank == 0) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
  }
  comm.barrier();  // the temporary directory is gone before anyone reports
  const int reporter = static_cast<int>(-v[1]);
  throw CheckpointWriteError(rank == reporter ? error
                                              : "checkpoint not written (rank " +
                                                    std::to_string(reporter) + " failed)",
                             rank == reporter);
}

std::string error_of(const std::exception& e, const fs::path& where) {
  const std::string what = e.what();
  // A message that names no file (std::filesystem and HDF5 name theirs) gets the directory.
  return what.find(where.string()) != std::string::npos || what.find('/') != std::string::npos
             ? what
             : where.string() + ": " + what;
}

}  // namespace

void checkpoint_save(Trainer& trainer, dist::Communicator& comm, const OutputOptions& output,
                     const TrainerState& state, const std::string& base_model,
                     const std::string& config_ini, bool final) {
  const bool main_rank = comm.rank() == 0;
  const std::string step = std::to_string(state.step);
  const fs::path tmp = output.dir / (".checkpoint-" + step + ".tmp");
  const fs::path dst = output.dir / ("checkpoint-" + step);
  const std::string shard = "optimizer/rank" + std::to_string(comm.rank()) + ".h5";
  std::string error;
  // 1. Rank 0 makes the temporary directory.
  if (main_rank) {
    try {
      fs::remove_all(tmp);
      fs::create_directories(tmp / "optimizer");
    } catch (const std::exception& e) {
      error = error_of(e, tmp);
    }
  }
  save_agree(comm, error, tmp);
  // 2. Every rank writes and syncs its optimizer shard; the adapter gather is a collective.
  int64_t nbytes = 0;
  try {
    optimizer_write(trainer, tmp / shard, comm.rank(), comm.world_size());
    io::path_sync(tmp / shard);
    nbytes = static_cast<int64_t>(fs::file_size(tmp / shard));
  } catch (const std::exception& e) {
    error = error_of(e, tmp / shard);
  }
  lora::PeftAdapter adapter = trainer.adapter_gather();
  adapter.base_model_name_or_path = base_model;
  std::vector<int64_t> shard_bytes;
  save_agree(comm, error, tmp, nbytes, &shard_bytes);  // every rank's shard is on disk
  // 3. Rank 0: the adapter, config.ini, then trainer_state.json with every size, sync, rename.
  if (main_rank) {
    try {
      lora::peft_adapter_write(tmp.string(), adapter);
      io::file_write_atomic(tmp / "config.ini", config_ini);
      TrainerState complete = state;
      complete.files.clear();
      for (const char* f : {"adapter_config.json", "adapter_model.safetensors", "config.ini"})
        complete.files.emplace_back(f, static_cast<int64_t>(fs::file_size(tmp / f)));
      for (int q = 0; q < comm.world_size(); ++q)
        complete.files.emplace_back("optimizer/rank" + std::to_string(q) + ".h5", shard_bytes[q]);
      io::file_write_atomic(tmp / "trainer_state.json", complete.to_json().dump(2) + "\n");
      io::path_sync(tmp / "optimizer");
      io::path_sync(tmp);
      // A checkpoint of this step already there (a damaged one passed over by resume = auto, or
      // the last good state saved again) is replaced by two renames; output_dir_tidy puts it back
      // when a crash comes between them.
      const fs::path replaced = output.dir / (".checkpoint-" + step + ".replaced");
      if (fs::exists(dst)) {
        fs::remove_all(replaced);
        fs::rename(dst, replaced);
      }
      fs::rename(tmp, dst);
      io::path_sync(output.dir);
      fs::remove_all(replaced);
      if (output.save_total_limit > 0) {
        auto all = checkpoints_in(output.dir);
        while (static_cast<int64_t>(all.size()) > output.save_total_limit) {
          // Out of sight first: a half-removed checkpoint must never look complete.
          const fs::path removing =
              output.dir / ("." + all.front().second.filename().string() + ".removing");
          fs::rename(all.front().second, removing);
          io::path_sync(output.dir);
          fs::remove_all(removing);
          all.erase(all.begin());
        }
      }
      if (final) {
        lora::peft_adapter_write(output.dir.string(), adapter);
        TrainerState done = state;
        done.finished = true;
        io::file_write_atomic(output.dir / "trainer_state.json", done.to_json().dump(2) + "\n");
      }
    } catch (const std::exception& e) {
      error = error_of(e, output.dir);
    }
  }
  save_agree(comm, error, tmp);
}

void checkpoint_load(Trainer& trainer, const fs::path& dir, const TrainerState& state) {
  trainer.adapter_load(lora::peft_adapter_read(dir.string()));
  optimizer_read(trainer, dir / "optimizer", state.world_size);
  trainer.set_steps_done(state.optimizer_steps < 0 ? state.step : state.optimizer_steps);
}

}  // namespace qlora::train
