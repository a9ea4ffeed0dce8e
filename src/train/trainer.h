// The sharded trainer: the explicit step loop of DESIGN.md section 2 over the units of
// sharded_model.h. Per optimizer step with g micro-batches on each of N ranks:
//   normalizer = all_reduce(sum of target tokens of every micro-batch of every rank)
//   for each micro-batch:
//     forward (no grad): embed, block 0..L-1 (keep each block's input), head: loss and dL/dx_L
//     backward: block L-1..0 recomputed with grad -> dL/dx_i and the block's LoRA gradients,
//               whose reduce-scatter starts at once (an all-reduce when not sharded)
//   every unit gathered just before use (prefetch: the next 0-2 gathers in flight) and dropped
//   after; then one all-reduce (squared gradient norm, loss, a non-finite flag), clip, AdamW on
//   the local shard. A NaN or Inf loss or gradient norm on any rank (the flag counts them, so
//   every rank decides alike) skips the update: gradients zeroed, AdamW's step not advanced.
// Communication per optimizer step and rank (sharded, N > 1; P_u = padded bytes of unit u):
//   gathered  = g * (N-1)/N * (P_embed + P_head + 2 * sum_i (P_block_i + P_lora_i))
//   reduced   = g * (N-1)/N * sum_i P_lora_i       (reduce-scatter; all-reduce when not sharded:
//               2 (N-1)/N * ... and nothing gathered)
// plus two small all-reduces (token count; norm and loss). Preference training with a reference
// (sigmoid, ipo) gathers once more per micro-batch: P_embed + P_head + sum_i (P_block_i, and
// P_lora_i of the frozen starting adapter when there is one).
// Preference micro-batches hold 2b rows: b chosen, then the b rejected of the same pairs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
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

// Preference training (stage = dpo): each micro-batch holds b pairs as 2b rows, the chosen
// sequences first, then the rejected ones of the same pairs in the same order. Per pair, with
// pc, pr the policy's and rc, rr the reference's summed log-probabilities of the answer tokens
// (nc, nr of them), ac = pc / nc, ar = pr / nr, beta, gamma, eps the options:
//   sigmoid (DPO, cDPO with eps): d = (pc - rc) - (pr - rr),
//            l = -(1 - eps) log sig(beta d) - eps log sig(-beta d); rewards beta (pc - rc), ...
//   ipo:     d = (pc - rc) / nc - (pr - rr) / nr, l = (d - 1 / (2 beta))^2; rewards as sigmoid
//   orpo:    o = (ac - ar) - (log(1 - e^ac) - log(1 - e^ar)), l = -ac - beta log sig(o);
//            rewards beta ac, beta ar
//   simpo:   z = ac - ar - gamma / beta, l = -(1 - eps) log sig(beta z) - eps log sig(-beta z);
//            rewards beta ac, beta ar
// loss = sum of l over the pairs of every rank / number of pairs (global)
//      + ftx * sum of -log p over the chosen answers' tokens / their number (global).
// The reference (sigmoid, ipo) is the model the training started from: the base with no
// adapter, or the frozen starting adapter (set_reference_adapter). orpo and simpo need none.
// TRL's logs: logps/* are the sums (sigmoid, ipo) or the means per token (orpo, simpo).
enum class PrefLoss { sigmoid, ipo, orpo, simpo };
PrefLoss pref_loss_from_name(const std::string& name);  // throws naming the valid ones

struct PrefOptions {
  PrefLoss loss = PrefLoss::sigmoid;
  double beta = 0.1;
  double simpo_gamma = 0.5;
  double ftx = 0.0;
  double label_smoothing = 0.0;
  bool needs_reference() const { return loss == PrefLoss::sigmoid || loss == PrefLoss::ipo; }
};

// Sums over the pairs of a step or an evaluation, every rank's (all-reduced).
struct PrefSums {
  static constexpr int kCount = 10;
  double pairs = 0, chosen_tokens = 0;  // the normalizers
  double pair_loss = 0, chosen_nll = 0;
  double rewards_chosen = 0, rewards_rejected = 0, accuracies = 0, margins = 0;
  double logps_chosen = 0, logps_rejected = 0;
  // loss = pair_loss / pairs + ftx * chosen_nll / chosen_tokens (0 where a count is 0)
  double loss(double ftx) const;
  // TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
  // logps/chosen, logps/rejected (means over pairs), with `prefix` ("" or "eval_").
  std::vector<std::pair<std::string, double>> metrics(const std::string& prefix) const;
};

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
  // true: the forward keeps only each block's input and the backward recomputes the block (one
  // block's activations live at a time). false: the forward keeps every block's autograd graph
  // (activations, and copies of norms and LoRA weights, never the gathered or dequantized base
  // weights: those are gathered and dequantized again in the backward) and nothing is recomputed.
  bool gradient_checkpointing = true;
  bool preference = false;           // stage = dpo: micro-batches are pairs (see PrefOptions)
  PrefOptions pref;
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
  PrefSums pref;  // preference training: this step's sums (num_targets counts both sides)
  bool skipped = false;  // a non-finite loss or gradient norm on some rank: no update was made
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

  // Each micro-batch runs without its trailing columns in which no row has a target (rows are
  // padded to the file's longest; the result is the same).
  StepResult step(const std::vector<Batch>& micro_batches, double lr);
  // Optimizer updates made (skipped steps do not count): AdamW's bias-correction step.
  int64_t steps_done() const { return step_; }
  void set_steps_done(int64_t steps) { step_ = steps; }  // resuming: AdamW's bias correction
  // Test-only fault injection (QLORA_FAULT_NAN_AT_STEP, read by the job): while set, this rank
  // multiplies its loss by NaN before backward, so its loss and gradients are NaN.
  void fault_nan_loss_set(bool on) { fault_nan_loss_ = on; }

  // Forward only (no graph, no dropout): the sum of token losses and the number of target tokens
  // over every rank's micro-batches (all-reduced). Every rank must pass the same number of
  // micro-batches (pad with rows whose labels are all -100).
  struct EvalSums {
    double loss_sum = 0.0;
    int64_t num_targets = 0;
    PrefSums pref;  // preference training: the sums over pairs (loss_sum, num_targets unused)
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

  // Preference training: the current LoRA weights (after adapter_load) become the frozen
  // reference of sigmoid / ipo, as TRL does for a model that starts from an adapter. Without
  // this call the reference is the base model with no adapter. Call once, after the starting
  // adapter's adapter_load and before a resume loads a checkpoint's weights.
  void set_reference_adapter();

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
  // With `reference`, each micro-batch starts with the reference forward: embed, blocks with
  // the reference adapter (or none), head.
  std::vector<std::vector<dist::ShardedUnit*>> schedule(int64_t micro_batches, bool backward,
                                                        bool reference = false);
  // Embed and blocks 0..L-1 without a graph, using pipeline positions k, k+1, ...; each block's
  // input (and last x_L) is appended to `inputs` when given. Returns x_L [m, T, H]. `loras`:
  // the adapter units bound to the blocks (nullptr: none).
  at::Tensor forward_no_grad(dist::UnitPipeline& pipe, size_t& k, const at::Tensor& tokens,
                             const at::Tensor& positions, bool training, int64_t micro,
                             std::vector<at::Tensor>* inputs,
                             const std::vector<std::unique_ptr<dist::ShardedUnit>>* loras);
  // The training forward without recompute (gradient_checkpointing = false): embed without a
  // graph, then each block with its graph kept (bound late_bound, so the graph holds no view of
  // a gathered buffer). Appends per block: its output to `ys`, [input, A, B of each adapted
  // linear] to `graph_inputs`, an undefined tensor to `xs`; then x_L (no graph) to `xs`.
  void forward_keep_graph(dist::UnitPipeline& pipe, size_t& k, const at::Tensor& tokens,
                          const at::Tensor& positions, int64_t micro, std::vector<at::Tensor>& xs,
                          std::vector<at::Tensor>& ys,
                          std::vector<std::vector<at::Tensor>>& graph_inputs);
  // The reference's summed answer log-probabilities of each row [2b] (no graph), at pipeline
  // positions k, k+1, ... (embed, blocks, head).
  at::Tensor reference_logps(dist::UnitPipeline& pipe, size_t& k, const at::Tensor& tokens,
                             const at::Tensor& labels, const at::Tensor& positions);
  const std::vector<std::unique_ptr<dist::ShardedUnit>>* reference_loras() const {
    return ref_lora_.empty() ? nullptr : &ref_lora_;
  }

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
  std::vector<std::unique_ptr<dist::ShardedUnit>> ref_lora_;  // frozen copy (preference), or none
  std::vector<std::vector<float>> nested_offsets_;        // per block, from the owning ranks
  std::vector<at::Tensor> grad_;                          // [S] fp32 per LoRA unit
  std::vector<dist::AdamWState> adam_;
  int64_t step_ = 0;
  bool fault_nan_loss_ = false;
  size_t load_bytes_read_ = 0;
};

}  // namespace qlora::train
