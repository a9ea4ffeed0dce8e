// Test driver for the optimizer reference tests: runs our AdamW, learning-rate schedules and
// data-parallel sampler on inputs from pytest, for comparison with torch.optim.AdamW,
// transformers.get_scheduler and a transformers + peft training loop.
//   optim_probe adamw IN OUT   IN:  "param/<id>" fp32 [n], "grad/<id>/<t>" fp32 [n] for t = 1..T,
//                                   metadata "options" = {"lr": [T rates], "beta1", "beta2",
//                                   "eps", "weight_decay", "threads", "shard_numel"}; with
//                                   shard_numel > 0 each tensor is updated as consecutive
//                                   shards of that many elements, as the trainer's shards are
//                              OUT: "param/<id>/<t>" after step t, "exp_avg/<id>" and
//                                   "exp_avg_sq/<id>" after step T
//   optim_probe lr CASES       CASES: JSON list of {"type", "learning_rate", "warmup_steps",
//                              "warmup_ratio", "total"}; prints a JSON list of
//                              {"warmup": lr_warmup_steps, "lr": [lr_at(k) for k in 0..total)}
//   optim_probe sampler ROWS MICRO ACCUM SEED STEPS
//                              prints the rows of one rank's micro-batches, [step][micro][row]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "dist/adamw.h"
#include "dist/sampler.h"
#include "io/safetensors.h"
#include "quant/tensor_io.h"
#include "train/lr_schedule.h"

using namespace qlora;

namespace {

int run_adamw(const std::string& in_path, const std::string& out_path) {
  auto in = io::SafetensorsFile::open(in_path);
  const auto o = nlohmann::json::parse(in->metadata().at("options"));
  at::set_num_threads(o.at("threads").get<int>());
  dist::AdamWOptions options;
  options.beta1 = o.at("beta1");
  options.beta2 = o.at("beta2");
  options.eps = o.at("eps");
  options.weight_decay = o.at("weight_decay");
  const std::vector<double> lrs = o.at("lr");
  const int64_t shard_numel = o.at("shard_numel");
  auto get = [&](const std::string& name) {
    return quant::tensor_from_safetensors(in->at(name), in->data(in->at(name))).clone();
  };
  io::SafetensorsWriter w;
  for (const io::TensorInfo& info : in->tensors()) {
    const std::string& name = info.name;
    if (name.rfind("param/", 0) != 0) continue;
    const std::string id = name.substr(6);
    const at::Tensor param = get(name);  // [n] fp32
    // As the trainer's shards: consecutive pieces of shard_numel elements, each updated on its
    // own (shard_numel 0: the whole tensor).
    const int64_t piece = shard_numel > 0 ? shard_numel : std::max<int64_t>(1, param.numel());
    std::vector<at::Tensor> shards = param.split(piece);  // views into param
    std::vector<dist::AdamWState> states;
    for (const at::Tensor& s : shards) states.push_back(dist::adamw_state_init(s));
    for (size_t t = 1; t <= lrs.size(); ++t) {
      const at::Tensor grad = get("grad/" + id + "/" + std::to_string(t));  // [n] fp32
      const std::vector<at::Tensor> grads = grad.split(piece);
      for (size_t i = 0; i < shards.size(); ++i)
        dist::adamw_step(shards[i], grads[i], states[i], static_cast<int64_t>(t), lrs[t - 1],
                         options);
      quant::writer_add(w, name + "/" + std::to_string(t), param);
    }
    std::vector<at::Tensor> m, v;
    for (const dist::AdamWState& st : states) {
      m.push_back(st.exp_avg);
      v.push_back(st.exp_avg_sq);
    }
    quant::writer_add(w, "exp_avg/" + id, at::cat(m));
    quant::writer_add(w, "exp_avg_sq/" + id, at::cat(v));
  }
  w.write(out_path);
  return 0;
}

int run_lr(const std::string& cases_json) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& c : nlohmann::json::parse(cases_json)) {
    train::LrSchedule s;
    s.learning_rate = c.at("learning_rate");
    s.type = train::lr_scheduler_from_name(c.at("type"));
    s.warmup_steps = c.at("warmup_steps");
    s.warmup_ratio = c.at("warmup_ratio");
    const int64_t total = c.at("total");
    nlohmann::json lrs = nlohmann::json::array();
    for (int64_t k = 0; k < total; ++k) lrs.push_back(train::lr_at(s, k, total));
    out.push_back({{"warmup", train::lr_warmup_steps(s, total)}, {"lr", lrs}});
  }
  std::cout << out.dump() << "\n";  // doubles printed so that they read back exactly
  return 0;
}

int run_sampler(char** a) {
  const dist::DistributedSampler sampler(std::stoll(a[0]), std::stoll(a[1]), std::stoll(a[2]),
                                         /*rank=*/0, /*world_size=*/1, std::stoull(a[3]));
  nlohmann::json out = nlohmann::json::array();
  for (int64_t step = 0; step < std::stoll(a[4]); ++step) {
    nlohmann::json micro = nlohmann::json::array();
    for (int64_t k = 0; k < std::stoll(a[2]); ++k) micro.push_back(sampler.rows(step, k));
    out.push_back(micro);
  }
  std::cout << out.dump() << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string mode = argc > 1 ? argv[1] : "";
    if (mode == "adamw" && argc == 4) return run_adamw(argv[2], argv[3]);
    if (mode == "lr" && argc == 3) return run_lr(argv[2]);
    if (mode == "sampler" && argc == 7) return run_sampler(argv + 2);
    std::fprintf(stderr, "usage: optim_probe adamw IN OUT | lr CASES_JSON | "
                         "sampler ROWS MICRO ACCUM SEED STEPS\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "optim_probe: error: %s\n", e.what());
    return 1;
  }
}
