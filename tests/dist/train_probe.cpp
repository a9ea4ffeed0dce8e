// An MPI program that trains the LoRA of a model with the sharded trainer on a synthetic copy
// task for the mpi tests: every rank writes rank<R>.json (per-step losses, gradient norms,
// communication counted by a wrapper around the real communicator, load and memory accounting)
// and rank 0 writes the gathered adapter in PEFT format. Options: --key value, see below.
// --fail-rank R with --fail-at-step S throws on rank R in step S (mid-run failure); with
// --fail-model PATH rank R loads PATH instead (a bad file on one rank only).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <sys/resource.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>

#include "dist/communicator.h"
#include "dist/rank_env.h"
#include "dist/sampler.h"
#include "lora/peft_adapter.h"
#include "train/trainer.h"

namespace {

using qlora::dist::Communicator;
using qlora::dist::ReduceOp;
using qlora::dist::Work;

// Counts the payload each collective brings into this rank (independently of the trainer's own
// accounting): all_gather receives out - shard, reduce_scatter in - out, all_reduce
// 2 (N-1)/N of the tensor.
class CountingCommunicator final : public Communicator {
 public:
  explicit CountingCommunicator(Communicator& inner) : inner_(inner) {}
  int rank() const override { return inner_.rank(); }
  int world_size() const override { return inner_.world_size(); }
  std::string backend_name() const override { return inner_.backend_name(); }
  Work all_gather_start(const at::Tensor& shard, const at::Tensor& out) override {
    gathered += out.nbytes() - shard.nbytes();
    return inner_.all_gather_start(shard, out);
  }
  Work reduce_scatter_start(const at::Tensor& in, const at::Tensor& out) override {
    reduced += in.nbytes() - out.nbytes();
    return inner_.reduce_scatter_start(in, out);
  }
  Work all_reduce_start(const at::Tensor& t, ReduceOp op) override {
    const size_t n = static_cast<size_t>(world_size());
    (t.nbytes() > 64 ? reduced : small) += 2 * (t.nbytes() / n) * (n - 1);
    return inner_.all_reduce_start(t, op);
  }
  Work broadcast_start(const at::Tensor& t, int root) override {
    return inner_.broadcast_start(t, root);
  }
  Work barrier_start() override { return inner_.barrier_start(); }
  double wait_seconds() const override { return inner_.wait_seconds(); }
  void wait_seconds_reset() override { inner_.wait_seconds_reset(); }

  size_t gathered = 0, reduced = 0, small = 0;

 private:
  Communicator& inner_;
};

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Row r of the copy task: [prompt (T/2 - 1 random tokens), separator 1, the prompt again];
// loss on the answer only.
void make_rows(const std::vector<int64_t>& rows, int64_t seq, int64_t vocab, uint64_t seed,
               at::Tensor& ids, at::Tensor& labels) {
  const int64_t m = static_cast<int64_t>(rows.size()), half = seq / 2;
  ids = at::zeros({m, seq}, at::kLong);
  labels = at::full({m, seq}, -100, at::kLong);
  auto id = ids.accessor<int64_t, 2>();
  auto lab = labels.accessor<int64_t, 2>();
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t t = 0; t < half - 1; ++t)
      id[i][t] = 2 + static_cast<int64_t>(mix(seed * 1000003 + static_cast<uint64_t>(rows[i]) * 4099 +
                                              static_cast<uint64_t>(t)) %
                                          static_cast<uint64_t>(vocab - 2));
    id[i][half - 1] = 1;
    for (int64_t t = half; t < seq; ++t) {
      id[i][t] = id[i][t - half];
      lab[i][t] = id[i][t];
    }
  }
}

std::map<std::string, std::string> parse_args(int argc, char** argv) {
  std::map<std::string, std::string> a = {
      {"steps", "20"}, {"global-batch", "12"}, {"grad-accum", "1"}, {"seq", "32"},
      {"rows", "240"}, {"sharding", "full"},   {"prefetch", "1"},   {"lr", "0.002"},
      {"seed", "7"},   {"lora-rank", "8"},     {"lora-alpha", "16"}, {"targets", "all"},
      {"fail-rank", "-1"}, {"fail-at-step", "-1"}, {"fail-model", ""}, {"max-grad-norm", "1.0"}};
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i];
    if (k.rfind("--", 0) != 0) throw std::invalid_argument("bad option " + k);
    a[k.substr(2)] = argv[i + 1];
  }
  for (const char* req : {"model", "out"})
    if (!a.count(req)) throw std::invalid_argument(std::string("--") + req + " is required");
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  qlora::dist::RankEnv env;
  try {
    env = qlora::dist::rank_env_init(&argc, &argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_probe: error: %s\n", e.what());
    return 1;
  }
  // Outside the try: a failing rank must reach job_abort with its communicator alive (its
  // destructor would wait for collectives the other ranks may never join).
  std::unique_ptr<Communicator> mpi;
  try {
    at::set_num_threads(1);
    const auto a = parse_args(argc, argv);
    const int64_t steps = std::stoll(a.at("steps")), global_batch = std::stoll(a.at("global-batch"));
    const int64_t grad_accum = std::stoll(a.at("grad-accum")), seq = std::stoll(a.at("seq"));
    const int64_t rows = std::stoll(a.at("rows"));
    const int fail_rank = std::stoi(a.at("fail-rank"));
    const int64_t fail_step = std::stoll(a.at("fail-at-step"));
    if (global_batch % (grad_accum * env.world_size) != 0)
      throw std::invalid_argument("--global-batch must be a multiple of grad-accum x world size");
    const int64_t micro = global_batch / (grad_accum * env.world_size);

    mpi = qlora::dist::communicator_mpi(env);
    CountingCommunicator comm(*mpi);
    qlora::train::TrainerOptions o;
    o.sharding = a.at("sharding") == "full" ? qlora::train::Sharding::full : qlora::train::Sharding::none;
    if (a.at("sharding") != "full" && a.at("sharding") != "none")
      throw std::invalid_argument("--sharding must be full or none");
    o.prefetch = std::stoi(a.at("prefetch"));
    o.seed = std::stoull(a.at("seed"));
    o.max_grad_norm = std::stod(a.at("max-grad-norm"));
    o.lora.rank = std::stoll(a.at("lora-rank"));
    o.lora.alpha = std::stod(a.at("lora-alpha"));
    o.targets = qlora::lora::lora_target_parse(a.at("targets"));
    o.quant.double_quant = true;
    std::string model_path = a.at("model");
    if (env.rank == fail_rank && !a.at("fail-model").empty()) model_path = a.at("fail-model");
    qlora::dist::DeviceContext device(qlora::dist::Device::cpu, at::kFloat, comm);
    qlora::train::Trainer trainer(device, model_path, o);
    const int64_t vocab = trainer.spec().config.vocab_size;
    const size_t load_gathered = comm.gathered;

    qlora::dist::DistributedSampler sampler(rows, micro, grad_accum, env.rank, env.world_size,
                                            o.seed);
    nlohmann::json out;
    out["rank"] = env.rank;
    out["world_size"] = env.world_size;
    out["local_rank"] = env.local_rank;
    const double lr = std::stod(a.at("lr"));
    for (int64_t s = 0; s < steps; ++s) {
      if (env.rank == fail_rank && s == fail_step)
        throw std::runtime_error("injected failure in step " + std::to_string(s));
      std::vector<qlora::train::Batch> batches;
      for (int64_t k = 0; k < grad_accum; ++k) {
        qlora::train::Batch b;
        make_rows(sampler.rows(s, k), seq, vocab, o.seed, b.input_ids, b.labels);
        batches.push_back(b);
      }
      const size_t g0 = comm.gathered, r0 = comm.reduced;
      const auto r = trainer.step(batches, lr);
      out["loss"].push_back(r.loss);
      out["grad_norm"].push_back(r.grad_norm);
      out["num_targets"].push_back(r.num_targets);
      out["trainer_bytes_gathered"].push_back(r.bytes_gathered);
      out["trainer_bytes_reduced"].push_back(r.bytes_reduce_scattered);
      out["comm_bytes_gathered"].push_back(comm.gathered - g0);
      out["comm_bytes_reduced"].push_back(comm.reduced - r0);
      out["comm_wait_seconds"].push_back(r.comm_wait_seconds);
      out["seconds"].push_back(r.seconds);
    }
    (void)load_gathered;
    out["expected_bytes_gathered"] = trainer.expected_gathered_per_step(grad_accum);
    out["expected_bytes_reduced"] = trainer.expected_reduced_per_step(grad_accum);
    std::vector<qlora::dist::UnitLayout> layouts;
    for (const auto& u : trainer.base()) layouts.push_back(u->layout());
    const size_t item = c10::elementSize(device.compute_dtype());
    out["load_bytes_read"] = trainer.load_bytes_read();
    out["expected_load_bytes"] =
        o.sharding == qlora::train::Sharding::full ? qlora::dist::units_owned_bytes(layouts, item, env.rank, env.world_size)
                  : qlora::dist::units_total_bytes(layouts);
    out["base_total_bytes"] = trainer.base_total_bytes();
    out["base_max_unit_bytes"] = trainer.base_max_unit_bytes();
    out["resident_bytes"] = trainer.stats().resident_bytes;
    out["peak_gathered_bytes"] = trainer.stats().peak_gathered_bytes;
    struct rusage ru {};
    getrusage(RUSAGE_SELF, &ru);
    out["max_rss_bytes"] = static_cast<int64_t>(ru.ru_maxrss) * 1024;

    const qlora::lora::PeftAdapter adapter = trainer.adapter_gather();
    const std::string dir = a.at("out");
    if (env.rank == 0) qlora::lora::peft_adapter_write(dir + "/adapter", adapter);
    std::ofstream(dir + "/rank" + std::to_string(env.rank) + ".json") << out.dump(1) << "\n";
    mpi->barrier();
    mpi.reset();
  } catch (const std::exception& e) {
    qlora::dist::job_abort(std::string("train_probe: error: ") + e.what(), 1);
  }
  qlora::dist::rank_env_finalize();
  return 0;
}
