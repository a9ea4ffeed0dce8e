// Output directory and checkpoints: see checkpoint.h.
#include "train/checkpoint.h"

#include <algorithm>
#include <fstream>
#include <regex>
#include <stdexcept>

#include "dist/device_context.h"
#include "io/atomic_write.h"
#include "io/h5_file.h"
#include "io/json_file.h"
#include "lora/peft_adapter.h"

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


OutputPlan output_plan(const OutputOptions& o) {
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
    case ResumeMode::auto_latest:
      if (!ckpts.empty()) plan.resume = ckpts.back().second;
      break;
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
      break;
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
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument(file.string() + ": " + e.what());
  }
  return s;
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

void checkpoint_save(Trainer& trainer, dist::Communicator& comm, const OutputOptions& output,
                     const TrainerState& state, const std::string& base_model,
                     const std::string& config_ini, bool final) {
  const bool main_rank = comm.rank() == 0;
  const std::string step = std::to_string(state.step);
  const fs::path tmp = output.dir / (".checkpoint-" + step + ".tmp");
  const fs::path dst = output.dir / ("checkpoint-" + step);
  if (main_rank) {
    fs::remove_all(tmp);
    fs::create_directories(tmp / "optimizer");
  }
  comm.barrier();
  optimizer_write(trainer, tmp / "optimizer" / ("rank" + std::to_string(comm.rank()) + ".h5"),
                  comm.rank(), comm.world_size());
  lora::PeftAdapter adapter = trainer.adapter_gather();
  adapter.base_model_name_or_path = base_model;
  comm.barrier();  // every rank's shard is on disk
  if (main_rank) {
    lora::peft_adapter_write(tmp.string(), adapter);
    io::file_write_atomic(tmp / "trainer_state.json", state.to_json().dump(2) + "\n");
    io::file_write_atomic(tmp / "config.ini", config_ini);
    fs::remove_all(dst);
    fs::rename(tmp, dst);
    if (output.save_total_limit > 0) {
      auto all = checkpoints_in(output.dir);
      while (static_cast<int64_t>(all.size()) > output.save_total_limit) {
        fs::remove_all(all.front().second);
        all.erase(all.begin());
      }
    }
    if (final) {
      lora::peft_adapter_write(output.dir.string(), adapter);
      TrainerState done = state;
      done.finished = true;
      io::file_write_atomic(output.dir / "trainer_state.json", done.to_json().dump(2) + "\n");
    }
  }
  comm.barrier();
}

void checkpoint_load(Trainer& trainer, const fs::path& dir, const TrainerState& state) {
  trainer.adapter_load(lora::peft_adapter_read(dir.string()));
  optimizer_read(trainer, dir / "optimizer", state.world_size);
  trainer.set_steps_done(state.optimizer_steps < 0 ? state.step : state.optimizer_steps);
}

}  // namespace qlora::train
