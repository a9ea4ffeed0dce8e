// The sharded trainer: the explicit step loop of DESIGN.md section 2 over the units of
// sharded_model.h. Per optimizer step with g micro-batches on each of N ranks:
//   normalizer = all_reduce(sum of target tokens of every micro-batch of every rank)
//   for each micro-batch:
//     forward (no grad): embed, block 0..L-1 (keep each block's input), head: loss and dL/dx_L
//     backward: block L-1..0 recomputed with grad -> dL/dx_i and the block's LoRA gradients,
//               whose reduce-scatter starts at once (an all-reduce when not sharded)
//   every unit gathered just before use (prefetch: the next 0-2 gathers in flight) and dropped
//   after; then one all-reduce (squared gradient norm, loss), clip, AdamW on the local shard.
// Communication per optimizer step and rank (sharded, N > 1; P_u = padded bytes of unit u):
//   gathered  = g * (N-1)/N * (P_embed + P_head + 2 * sum_i (P_block_i + P_lora_i))
//   reduced   = g * (N-1)/N * sum_i P_lora_i       (reduce-scatter; all-reduce when not sharded:
//               2 (N-1)/N * ... and nothing gathered)
// plus two small all-reduces (token count; norm and loss).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dist/adamw.h"
#include "dist/communicator.h"
#include "dist/device_context.h"
#include "dist/sharded_unit.h"
#include "lora/peft_adapter.h"
#include "model/decoder.h"
#include "train/sharded_model.h"

namespace qlora::train {

// [dist] sharding: full (ZeRO-3 / FSDP FULL_SHARD: base, LoRA weights, gradients and moments
// sharded) or none (every rank holds everything; gradients all-reduced).
enum class Sharding { full, none };

struct TrainerOptions {
  Sharding sharding = Sharding::full;
  int prefetch = 1;      // [dist] prefetch = 0 | 1 | 2
  int64_t chunk_tokens = 1024;
  double max_grad_norm = 1.0;  // <= 0: no clipping
  dist::AdamWOptions adam;
  uint64_t seed = 42;
  lora::LoraConfig lora;
  std::vector<std::string> targets;  // block linear short names
  bool upcast_layernorm = false;     // norms in fp32 (the compute dtype is the device context's)
  quant::QuantizeOptions quant;      // for an unquantized model: how block linears are quantized
};

struct Batch {
  at::Tensor input_ids;     // [m, T] integer
  at::Tensor labels;        // [m, T] integer, -100 where no loss
  at::Tensor position_ids;  // [m, T] integer (packed rows: a sample starts at 0), or undefined:
                            // positions 0..T-1, one causal sequence per row
};

struct StepResult {
  double loss = 0.0;       // global mean over target tokens
  double grad_norm = 0.0;  // before clipping
  int64_t num_targets = 0;
  size_t bytes_gathered = 0;          // this rank, this step
  size_t bytes_reduce_scattered = 0;  // this rank, this step
  double comm_wait_seconds = 0.0;     // main thread blocked on collectives
  double seconds = 0.0;
};

class Trainer {
 public:
  // Opens the model (HF directory or HDF5 unit file), loads this rank's shard of every unit onto
  // the context's device (quant storage = its compute dtype) and initializes the LoRA weights
  // (peft's init from `seed`, the same whatever the world size).
  Trainer(dist::DeviceContext& device, const std::string& model_path, const TrainerOptions& options);
  // The same from a source already opened (and checked) by the caller.
  Trainer(dist::DeviceContext& device, std::unique_ptr<UnitSource> source,
          const TrainerOptions& options);

  StepResult step(const std::vector<Batch>& micro_batches, double lr);
  int64_t steps_done() const { return step_; }
  void set_steps_done(int64_t steps) { step_ = steps; }  // resuming: AdamW's bias correction

  // Forward only (no graph, no dropout): the sum of token losses and the number of target tokens
  // over every rank's micro-batches (all-reduced). Every rank must pass the same number of
  // micro-batches (pad with rows whose labels are all -100).
  struct EvalSums {
    double loss_sum = 0.0;
    int64_t num_targets = 0;
  };
  EvalSums eval(const std::vector<Batch>& micro_batches);

  // Sets the LoRA weights from a complete adapter (every rank passes the same one and keeps its
  // part). Throws std::invalid_argument naming the layer when the adapter's layers, rank or
  // targets do not fit the units.
  void adapter_load(const lora::PeftAdapter& adapter);

  // AdamW moments of this rank's shards, for checkpoints: per LoRA unit (name, payload byte range
  // [begin, end) of the unit that the shard holds, exp_avg bytes, exp_avg_sq bytes).
  struct OptimizerShard {
    std::string unit;
    size_t begin = 0, end = 0;
    at::Tensor exp_avg, exp_avg_sq;  // uint8 views of the first end - begin bytes of the shard
  };
  std::vector<OptimizerShard> optimizer_shards();
  // Fills this rank's moments from a reader of any unit's payload bytes [begin, end) (written by
  // any world size: the layout does not depend on it).
  using MomentReader = std::function<void(const std::string& unit, const char* which, size_t begin,
                                          size_t end, uint8_t* out)>;
  void optimizer_load(const MomentReader& read);

  // Gathers the adapter (a collective: every rank calls it; every rank gets it).
  lora::PeftAdapter adapter_gather();

  const UnitsSpec& spec() const { return spec_; }
  const dist::ShardStats& stats() const { return stats_; }
  size_t load_bytes_read() const { return load_bytes_read_; }
  // The formula of the header: bytes gathered / reduced per optimizer step of g micro-batches.
  size_t expected_gathered_per_step(int64_t micro_batches) const;
  size_t expected_reduced_per_step(int64_t micro_batches) const;
  size_t base_total_bytes() const;        // all base units' payload
  size_t base_max_unit_bytes() const;     // the largest gathered base unit (padded)
  const std::vector<std::unique_ptr<dist::ShardedUnit>>& base() const { return base_; }
  const std::vector<std::unique_ptr<dist::ShardedUnit>>& lora() const { return lora_; }

 private:
  void lora_init();
  // The units each position of a step uses: per micro-batch embed, blocks up, head and, with
  // `backward`, blocks down again.
  std::vector<std::vector<dist::ShardedUnit*>> schedule(int64_t micro_batches, bool backward);
  // Embed and blocks 0..L-1 without a graph, using pipeline positions k, k+1, ...; each block's
  // input (and last x_L) is appended to `inputs` when given. Returns x_L [m, T, H].
  at::Tensor forward_no_grad(dist::UnitPipeline& pipe, size_t& k, const at::Tensor& tokens,
                             const at::Tensor& positions, bool training, int64_t micro,
                             std::vector<at::Tensor>* inputs);

  bool sharded() const { return options_.sharding == Sharding::full; }

  dist::DeviceContext& device_;
  dist::Communicator& comm_;
  TrainerOptions options_;
  std::string model_path_;
  UnitsSpec spec_;
  model::DecoderModel model_;
  dist::ShardStats stats_;
  dist::BufferPool pool_{3};  // gather buffers of base units, reused (1 + prefetch live)
  std::vector<std::unique_ptr<dist::ShardedUnit>> base_;  // embed, block.0.., head
  std::vector<std::unique_ptr<dist::ShardedUnit>> lora_;  // lora.0..
  std::vector<std::vector<float>> nested_offsets_;        // per block, from the owning ranks
  std::vector<at::Tensor> grad_;                          // [S] fp32 per LoRA unit
  std::vector<dist::AdamWState> adam_;
  int64_t step_ = 0;
  size_t load_bytes_read_ = 0;
};

}  // namespace qlora::train
