// The step loop: gathers, forward with saved block inputs, chunked loss, backward with
// recompute per block, gradient reduce-scatter as each block finishes, clip, sharded AdamW.
#include "train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>
#include <limits>
#include <stdexcept>
#include <tuple>

#include "lora/adapter_slots.h"

namespace qlora::train {

namespace {

using Clock = std::chrono::steady_clock;

// The dropout generator of one block in one micro-step: the forward and the backward recompute
// draw the same masks from it.
at::Generator dropout_generator(const dist::DeviceContext& device, uint64_t seed, int64_t step,
                                int64_t micro, int64_t block) {
  return device.generator(dist::DeviceContext::seed_mix(
      seed, {static_cast<uint64_t>(step), static_cast<uint64_t>(micro),
             static_cast<uint64_t>(device.rank()), static_cast<uint64_t>(block)}));
}

// What a block's gradients are taken for: its input x, then A and B of each adapted linear in
// block order.
std::vector<at::Tensor> adapted_inputs(model::DecoderBlock& block, const at::Tensor& x) {
  std::vector<at::Tensor> inputs = {x};
  for (lora::QLoraLinear& l : block.linears)
    if (l.has_adapter()) {
      inputs.push_back(l.lora_A());
      inputs.push_back(l.lora_B());
    }
  return inputs;
}

// Target tokens of each row (labels shifted by one), counted on the host.
std::vector<int64_t> row_targets(const at::Tensor& labels) {
  const at::Tensor l = labels.contiguous().to(at::kLong);
  const int64_t rows = l.size(0), cols = l.size(1);
  const int64_t* p = l.data_ptr<int64_t>();
  std::vector<int64_t> n(static_cast<size_t>(rows), 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 1; c < cols; ++c) n[static_cast<size_t>(r)] += p[r * cols + c] != -100;
  return n;
}

// Target tokens of a micro-batch, from its rows' counts.
int64_t targets_of(const std::vector<int64_t>& row_counts) {
  return std::accumulate(row_counts.begin(), row_counts.end(), int64_t{0});
}

// Pairs of a preference micro-batch [2b, T] that count (both answers have targets), and the
// chosen answers' target tokens of those pairs, from its rows' counts `n`.
std::pair<int64_t, int64_t> pair_counts(const std::vector<int64_t>& n) {
  const size_t half = n.size() / 2;
  int64_t pairs = 0, chosen = 0;
  for (size_t i = 0; i < half; ++i)
    if (n[i] > 0 && n[half + i] > 0) {
      ++pairs;
      chosen += n[i];
    }
  return {pairs, chosen};
}

// log(1 - e^x) for x < 0, accurate on both sides of -log 2, with finite values (and gradients)
// on the branch where() does not take.
at::Tensor log1mexp(const at::Tensor& x) {
  const double ln2 = std::log(2.0);
  const at::Tensor near = at::log(-at::expm1(x.clamp_min(-ln2)));
  const at::Tensor far = at::log1p(-at::exp(x.clamp_max(-ln2)));
  return at::where(x > -ln2, near, far);
}

// The preference objective of one micro-batch (see PrefOptions): `policy` [2b] fp32 summed
// log-probabilities (with a graph), `reference` [2b] (no graph; undefined for orpo / simpo),
// `counts` [2b] target tokens per row. Returns this rank's share of the loss (divided by the
// global normalizers) and the micro-batch's sums [PrefSums::kCount - 2] in PrefSums order from
// pair_loss on.
std::pair<at::Tensor, at::Tensor> pref_objective(const PrefOptions& o, const at::Tensor& policy,
                                                 const at::Tensor& reference,
                                                 const at::Tensor& counts, double pairs_norm,
                                                 double chosen_norm) {
  const int64_t b = policy.size(0) / 2;
  const at::Tensor p = policy.to(at::kDouble);
  const at::Tensor pc = p.narrow(0, 0, b), pr = p.narrow(0, b, b);
  const at::Tensor nc = counts.narrow(0, 0, b), nr = counts.narrow(0, b, b);
  const at::Tensor valid = at::logical_and(nc > 0, nr > 0).to(at::kDouble);
  const at::Tensor ac = pc / nc.clamp_min(1.0), ar = pr / nr.clamp_min(1.0);
  const double beta = o.beta, eps = o.label_smoothing;
  const auto smoothed = [eps](const at::Tensor& z) {  // -(1 - eps) log sig(z) - eps log sig(-z)
    at::Tensor l = -(1.0 - eps) * at::log_sigmoid(z);
    return eps > 0.0 ? l - eps * at::log_sigmoid(-z) : l;
  };
  at::Tensor l, rew_c, rew_r, lp_c, lp_r;
  switch (o.loss) {
    case PrefLoss::sigmoid:
    case PrefLoss::ipo: {
      const at::Tensor r = reference.to(at::kDouble);
      const at::Tensor rc = r.narrow(0, 0, b), rr = r.narrow(0, b, b);
      if (o.loss == PrefLoss::sigmoid) {
        l = smoothed(beta * ((pc - rc) - (pr - rr)));
      } else {
        const at::Tensor d = (pc - rc) / nc.clamp_min(1.0) - (pr - rr) / nr.clamp_min(1.0);
        l = (d - 1.0 / (2.0 * beta)).pow(2);
      }
      rew_c = beta * (pc - rc).detach();
      rew_r = beta * (pr - rr).detach();
      lp_c = pc.detach();
      lp_r = pr.detach();
      break;
    }
    case PrefLoss::orpo: {
      const at::Tensor odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar));
      l = -ac - beta * at::log_sigmoid(odds);
      rew_c = beta * ac.detach();
      rew_r = beta * ar.detach();
      lp_c = ac.detach();
      lp_r = ar.detach();
      break;
    }
    case PrefLoss::simpo:
      l = smoothed(beta * ((ac - ar) - o.simpo_gamma / beta));
      rew_c = beta * ac.detach();
      rew_r = beta * ar.detach();
      lp_c = ac.detach();
      lp_r = ar.detach();
      break;
  }
  // Invalid pairs (padding) are masked out; where() keeps their possibly non-finite values out
  // of the sums and the gradients.
  const at::Tensor keep = valid > 0;
  const auto masked = [&](const at::Tensor& t) { return at::where(keep, t, at::zeros_like(t)); };
  const at::Tensor pair_loss = masked(l).sum();
  const at::Tensor nll = masked(-pc).sum();
  at::Tensor loss = pair_loss / std::max(1.0, pairs_norm);
  if (o.ftx > 0.0) loss = loss + o.ftx * nll / std::max(1.0, chosen_norm);
  const at::Tensor sums = at::stack(
      {pair_loss.detach(), nll.detach(), masked(rew_c).sum(), masked(rew_r).sum(),
       masked((rew_c > rew_r).to(at::kDouble)).sum(), masked(rew_c - rew_r).sum(),
       masked(lp_c).sum(), masked(lp_r).sum()});
  return {loss, sums};
}

// The micro-batch without its trailing columns in which no row has a target: they change
// nothing (column c only feeds the outputs of columns >= c, which predict labels after c, all
// -100 there), and a file's rows are padded to its longest row, so most micro-batches have some.
// At least one column stays.
std::vector<Batch> without_trailing_padding(const std::vector<Batch>& batches) {
  std::vector<Batch> out = batches;
  for (Batch& b : out) {
    if (b.labels.dim() != 2 || b.labels.size(1) == 0) continue;
    const at::Tensor used = (b.labels != -100).any(0).nonzero();
    const int64_t keep = used.numel() > 0 ? used.max().item<int64_t>() + 1 : 1;
    if (keep == b.labels.size(1)) continue;
    b.input_ids = b.input_ids.narrow(1, 0, keep);
    b.labels = b.labels.narrow(1, 0, keep);
    if (b.position_ids.defined()) b.position_ids = b.position_ids.narrow(1, 0, keep);
  }
  return out;
}

void batch_check(const Batch& b, const char* who, bool pairs) {
  if (b.input_ids.dim() != 2 || b.labels.sizes() != b.input_ids.sizes() ||
      (b.position_ids.defined() && b.position_ids.sizes() != b.input_ids.sizes()))
    throw std::invalid_argument(std::string(who) +
                                ": input_ids, labels (and position_ids when given) must all be "
                                "[batch, seq]");
  if (pairs && b.input_ids.size(0) % 2 != 0)
    throw std::invalid_argument(std::string(who) + ": a preference micro-batch holds 2b rows "
                                "(b chosen, then b rejected), not " +
                                std::to_string(b.input_ids.size(0)));
}

// The batch's position ids on the device as int64, or undefined when it has none.
at::Tensor positions_on_device(const dist::DeviceContext& device, const Batch& b) {
  return b.position_ids.defined() ? device.to_device(b.position_ids).to(at::kLong) : at::Tensor();
}

// Keeps this rank's part of a whole LoRA unit [padded_numel] fp32 as its shard.
void shard_from_full(dist::ShardedUnit& unit, const at::Tensor& full) {
  const auto [begin, end] = unit.owned_bytes();
  const int64_t n = static_cast<int64_t>(end - begin);
  unit.shard_bytes().narrow(0, 0, n).copy_(
      full.view(at::kByte).narrow(0, static_cast<int64_t>(begin), n));
}

size_t received(size_t padded_bytes, int world_size) {
  return padded_bytes / static_cast<size_t>(world_size) * static_cast<size_t>(world_size - 1);
}

}  // namespace

PrefLoss pref_loss_from_name(const std::string& name) {
  if (name == "sigmoid") return PrefLoss::sigmoid;
  if (name == "ipo") return PrefLoss::ipo;
  if (name == "orpo") return PrefLoss::orpo;
  if (name == "simpo") return PrefLoss::simpo;
  throw std::invalid_argument("pref_loss '" + name + "' is not one of sigmoid, ipo, orpo, simpo");
}

double PrefSums::loss(double ftx) const {
  double l = pairs > 0 ? pair_loss / pairs : 0.0;
  if (ftx > 0 && chosen_tokens > 0) l += ftx * chosen_nll / chosen_tokens;
  return l;
}

std::vector<std::pair<std::string, double>> PrefSums::metrics(const std::string& prefix) const {
  const double n = std::max(1.0, pairs);
  return {{prefix + "rewards/chosen", rewards_chosen / n},
          {prefix + "rewards/rejected", rewards_rejected / n},
          {prefix + "rewards/accuracies", accuracies / n},
          {prefix + "rewards/margins", margins / n},
          {prefix + "logps/chosen", logps_chosen / n},
          {prefix + "logps/rejected", logps_rejected / n}};
}

namespace {

// PrefSums from the all-reduced [pairs, chosen_tokens] and the 8 sums of pref_objective.
PrefSums pref_sums(double pairs, double chosen, const double* s) {
  PrefSums p;
  p.pairs = pairs;
  p.chosen_tokens = chosen;
  p.pair_loss = s[0];
  p.chosen_nll = s[1];
  p.rewards_chosen = s[2];
  p.rewards_rejected = s[3];
  p.accuracies = s[4];
  p.margins = s[5];
  p.logps_chosen = s[6];
  p.logps_rejected = s[7];
  return p;
}

}  // namespace

Trainer::Trainer(dist::DeviceContext& device, const std::string& model_path,
                 const TrainerOptions& options)
    : Trainer(device, UnitSource::open(model_path, options.quant), options) {}

Trainer::Trainer(dist::DeviceContext& device, std::unique_ptr<UnitSource> source,
                 const TrainerOptions& options)
    : device_(device), comm_(device.comm()), options_(options), model_path_(source->path()) {
  options_.lora.validate("lora");
  if (options_.targets.empty()) throw std::invalid_argument("lora_target is empty");
  spec_ = source->spec();
  model::LoadOptions load;
  load.compute_dtype = device_.compute_dtype();
  load.upcast_layernorm = options_.upcast_layernorm;
  model_ = model::DecoderModel::skeleton(spec_.config, load);
  const at::ScalarType storage = device_.compute_dtype();  // quant storage = compute dtype

  std::vector<double> offset_bytes;  // [blocks * linears * 4], byte values
  for (dist::UnitLayout& layout : base_units(spec_)) {
    auto unit = std::make_unique<dist::ShardedUnit>(std::move(layout), storage, device_,
                                                    sharded(), &stats_, /*is_base=*/true, &pool_);
    const auto [begin, end] = unit->owned_bytes();
    // Staged through host memory when the device is not the host (a no-op copy on the CPU).
    at::Tensor host = dist::DeviceContext::to_host(unit->shard_bytes());
    source->read(unit->layout(), begin, end, host.data_ptr<uint8_t>());
    unit->shard_bytes().copy_(host);
    // The bytes of each nested offset this rank holds (0 where another rank holds them).
    if (unit->layout().name.rfind("block.", 0) == 0)
      for (const dist::Segment* seg : nested_offset_segments(spec_, unit->layout()))
        for (size_t pos = seg->offset; pos < seg->offset + seg->nbytes; ++pos)
          offset_bytes.push_back(pos >= begin && pos < end
                                     ? static_cast<double>(host.data_ptr<uint8_t>()[pos - begin])
                                     : 0.0);
    base_.push_back(std::move(unit));
  }
  load_bytes_read_ = source->bytes_read();
  // Every rank gets every block's nested offsets from the ranks that hold them (one all-reduce
  // of their bytes at load): binding a block then never reads device memory on the host, and no
  // rank reads or quantizes anything outside its own byte ranges.
  if (!offset_bytes.empty()) comm_.all_reduce_host(offset_bytes.data(),
                                                   static_cast<int64_t>(offset_bytes.size()),
                                                   dist::ReduceOp::max);
  size_t next = 0;
  for (size_t u = 1; u + 1 < base_.size(); ++u) {  // the block units
    std::vector<float> offsets(nested_offset_segments(spec_, base_[u]->layout()).size());
    for (float& value : offsets) {
      uint8_t bytes[sizeof value];
      for (uint8_t& b : bytes) b = static_cast<uint8_t>(offset_bytes[next++]);
      std::memcpy(&value, bytes, sizeof value);
    }
    nested_offsets_.push_back(std::move(offsets));
  }
  for (dist::UnitLayout& layout : lora_units(spec_.config, options_.lora.rank, options_.targets)) {
    lora_.push_back(std::make_unique<dist::ShardedUnit>(std::move(layout), at::kFloat, device_,
                                                        sharded(), &stats_, /*is_base=*/false));
    grad_.push_back(device_.zeros({lora_.back()->shard_numel()}, at::kFloat));
    adam_.push_back(dist::adamw_state_init(lora_.back()->shard()));
  }
  lora_init();
}

void Trainer::lora_init() {
  // peft's init (lora::adapter_init) block by block from one generator: the numbers
  // DecoderModel::adapters_init draws for the same seed. Every rank draws everything and keeps
  // its own part. Drawn on the host, so that a GPU run starts from the adapter a CPU run (and
  // peft, which initialises on the CPU) starts from.
  at::Generator gen = dist::DeviceContext::host_generator(options_.seed);
  for (auto& unit : lora_) {
    at::Tensor full = at::zeros({unit->padded_numel()}, dist::DeviceContext::host_options(at::kFloat));
    lora::adapter_init(lora_slots(unit->layout(), full), gen);
    shard_from_full(*unit, full);
  }
}

size_t Trainer::base_total_bytes() const {
  size_t total = 0;
  for (const auto& u : base_) total += u->layout().nbytes;
  return total;
}

size_t Trainer::base_max_unit_bytes() const {
  size_t m = 0;
  for (const auto& u : base_)
    m = std::max(m, static_cast<size_t>(u->padded_numel()) * u->itemsize());
  return m;
}

size_t Trainer::expected_gathered_per_step(int64_t g) const {
  const int n = comm_.world_size();
  if (!sharded() || n == 1) return 0;
  const auto padded = [](const dist::ShardedUnit& u) {
    return static_cast<size_t>(u.padded_numel()) * u.itemsize();
  };
  size_t per_micro = received(padded(*base_.front()), n) + received(padded(*base_.back()), n);
  for (size_t i = 0; i < lora_.size(); ++i)
    per_micro += 2 * (received(padded(*base_[i + 1]), n) + received(padded(*lora_[i]), n));
  if (options_.preference && options_.pref.needs_reference()) {  // the reference forward
    per_micro += received(padded(*base_.front()), n) + received(padded(*base_.back()), n);
    for (size_t i = 0; i < lora_.size(); ++i)
      per_micro += received(padded(*base_[i + 1]), n) +
                   (ref_lora_.empty() ? 0 : received(padded(*ref_lora_[i]), n));
  }
  return static_cast<size_t>(g) * per_micro;
}

size_t Trainer::expected_reduced_per_step(int64_t g) const {
  const int n = comm_.world_size();
  if (n == 1) return 0;
  size_t per_micro = 0;
  for (const auto& u : lora_) {
    const size_t padded = static_cast<size_t>(u->padded_numel()) * 4;
    per_micro += sharded() ? received(padded, n) : 2 * received(padded, n);
  }
  return static_cast<size_t>(g) * per_micro;
}

StepResult Trainer::step(const std::vector<Batch>& padded_batches, double lr) {
  const auto t0 = Clock::now();
  for (const Batch& b : padded_batches) batch_check(b, "step", options_.preference);
  const std::vector<Batch> micro_batches = without_trailing_padding(padded_batches);
  StepResult result;
  const size_t gathered0 = stats_.bytes_gathered, reduced0 = stats_.bytes_reduce_scattered;
  comm_.wait_seconds_reset();
  const int n = comm_.world_size();
  const int64_t layers = model_.num_blocks();
  const int64_t g = static_cast<int64_t>(micro_batches.size());
  if (g < 1) throw std::invalid_argument("step: no micro-batches");

  // The global number of target tokens: every rank's loss is divided by it, so the summed
  // gradients are those of the mean over the whole global batch. Counted on the host rows.
  // Preference training: the global numbers of pairs and of chosen answer tokens instead.
  const bool pref = options_.preference;
  double counts[3] = {0.0, 0.0, 0.0};  // targets, pairs, chosen answer tokens
  std::vector<std::vector<int64_t>> row_counts;  // per micro-batch: target tokens of each row
  for (const Batch& b : micro_batches) {
    row_counts.push_back(row_targets(b.labels));
    counts[0] += static_cast<double>(targets_of(row_counts.back()));
    if (pref) {
      const auto [pairs, chosen] = pair_counts(row_counts.back());
      counts[1] += static_cast<double>(pairs);
      counts[2] += static_cast<double>(chosen);
    }
  }
  comm_.detail_set("token count");
  comm_.all_reduce_host(counts, pref ? 3 : 1, dist::ReduceOp::sum);
  result.num_targets = static_cast<int64_t>(std::llround(counts[0]));
  const double normalizer = std::max(1.0, counts[0]);
  const bool reference = pref && options_.pref.needs_reference();

  dist::UnitPipeline pipe(schedule(g, /*backward=*/true, reference), options_.prefetch);

  struct Pending {
    dist::Work work;
    at::Tensor flat;    // [P] fp32: this rank's gradient, all-reduced in place when not sharded
    at::Tensor shard;   // [S] fp32: the reduce-scatter result
    size_t unit = 0;
  };
  std::vector<Pending> pending;
  at::Tensor loss_sum = device_.zeros({}, at::kDouble);  // this rank's share of the loss
  at::Tensor pref_sum = device_.zeros({PrefSums::kCount - 2}, at::kDouble);
  size_t k = 0;
  for (int64_t m = 0; m < g; ++m) {
    const at::Tensor tokens = device_.to_device(micro_batches[m].input_ids).to(at::kLong);
    const at::Tensor labels = device_.to_device(micro_batches[m].labels).to(at::kLong);
    const at::Tensor positions = positions_on_device(device_, micro_batches[m]);  // or undefined
    const at::Tensor ref =
        reference ? reference_logps(pipe, k, tokens, labels, positions) : at::Tensor();
    std::vector<at::Tensor> xs;  // block inputs [m, T, H], and x_L
    // Without recompute: each block's output, whose graph reaches back to its input (xs[i], a
    // leaf) and its LoRA leaves (graph_inputs[i]: x, then A and B of each adapted linear).
    std::vector<at::Tensor> ys;
    std::vector<std::vector<at::Tensor>> graph_inputs;
    if (options_.gradient_checkpointing)
      forward_no_grad(pipe, k, tokens, positions, /*training=*/true, m, &xs, &lora_);
    else
      forward_keep_graph(pipe, k, tokens, positions, m, xs, ys, graph_inputs);

    at::Tensor dy;  // dL/dx of the current block's output
    {
      const auto& e = pipe.acquire(k);
      bind_head(model_, *base_.back(), e[0]);
      const at::Tensor x_last = xs[layers].detach().requires_grad_(true);
      at::Tensor loss;
      if (pref) {
        const std::vector<int64_t>& n = row_counts[static_cast<size_t>(m)];
        const at::Tensor row_counts = device_.to_device(
            at::tensor(std::vector<double>(n.begin(), n.end()), at::kDouble));
        const at::Tensor policy =
            model_.row_logps(model_.final_norm(x_last), labels, options_.chunk_tokens);
        at::Tensor sums;
        std::tie(loss, sums) =
            pref_objective(options_.pref, policy, ref, row_counts, counts[1], counts[2]);
        pref_sum += sums;
      } else {
        loss = model_.loss(model_.final_norm(x_last), labels, options_.chunk_tokens, normalizer)
                   .loss;
      }
      if (fault_nan_loss_) loss = loss * std::numeric_limits<double>::quiet_NaN();
      dy = torch::autograd::grad({loss}, {x_last})[0];
      loss_sum += loss.detach().to(at::kDouble);
      bind_head(model_, *base_.back(), at::Tensor());
      pipe.release(k++);
      xs[layers] = at::Tensor();
    }

    for (int64_t i = layers - 1; i >= 0; --i) {
      const auto& bufs = pipe.acquire(k);
      at::Tensor y;
      std::vector<at::Tensor> inputs;
      if (options_.gradient_checkpointing) {
        bind_block(model_, i, spec_, *base_[i + 1], bufs[0], nested_offsets_[i], lora_[i].get(),
                   bufs[1], options_.lora);
        const at::Tensor x = xs[i].detach().requires_grad_(true);
        y = model_.block_forward(i, x, /*training=*/true,
                                 dropout_generator(device_, options_.seed, step_, m, i), positions);
        inputs = adapted_inputs(model_.block(i), x);
      } else {
        // The graph of the forward; its base products find their weights in this binding.
        bind_block(model_, i, spec_, *base_[i + 1], bufs[0], nested_offsets_[i], nullptr,
                   at::Tensor(), options_.lora, /*late_bound=*/true);
        y = std::move(ys[i]);
        inputs = std::move(graph_inputs[i]);
      }
      std::vector<std::string> names;
      for (const lora::QLoraLinear& l : model_.block(i).linears)
        if (lora_[i]->layout().has(l.name() + ".lora_A.weight")) names.push_back(l.name());
      if (names.size() * 2 + 1 != inputs.size())
        throw std::logic_error("Trainer: block " + std::to_string(i) + " has " +
                               std::to_string(inputs.size()) + " autograd inputs for " +
                               std::to_string(names.size()) + " adapted linears");
      const std::vector<at::Tensor> grads =
          torch::autograd::grad({y}, inputs, {dy}, /*retain_graph=*/false, /*create_graph=*/false,
                                /*allow_unused=*/true);
      y = at::Tensor();
      inputs.clear();
      dy = grads[0];
      dist::ShardedUnit& lu = *lora_[i];
      at::Tensor flat = device_.zeros({lu.padded_numel()}, at::kFloat);  // [P]
      for (size_t j = 0; j < names.size(); ++j) {
        if (grads[1 + 2 * j].defined())
          lora_view(lu.layout(), flat, names[j] + ".lora_A.weight").copy_(grads[1 + 2 * j]);
        if (grads[2 + 2 * j].defined())
          lora_view(lu.layout(), flat, names[j] + ".lora_B.weight").copy_(grads[2 + 2 * j]);
      }
      unbind_block(model_, i);
      pipe.release(k++);
      xs[i] = at::Tensor();

      Pending p;
      p.flat = flat;
      p.unit = static_cast<size_t>(i);
      const size_t padded = static_cast<size_t>(lu.padded_numel()) * 4;
      if (sharded()) {
        p.shard = device_.empty({lu.shard_numel()}, at::kFloat);
        comm_.detail_set("gradients of lora." + std::to_string(i));
        p.work = comm_.reduce_scatter_start(flat, p.shard);
        if (n > 1) stats_.bytes_reduce_scattered += received(padded, n);
      } else {
        comm_.detail_set("gradients of lora." + std::to_string(i));
        p.work = comm_.all_reduce_start(flat, dist::ReduceOp::sum);
        if (n > 1) stats_.bytes_reduce_scattered += 2 * received(padded, n);
      }
      pending.push_back(std::move(p));
    }
  }
  pipe.drain();
  for (Pending& p : pending) {
    p.work.wait();
    grad_[p.unit] += sharded() ? p.shard : p.flat;
  }

  // The one host transfer of the step: the squared gradient norm of this rank's shards, its
  // share of the loss (and the preference sums), all-reduced on the device first (the norm only
  // when sharded: otherwise every rank holds the whole, already reduced gradient). After the
  // sums, a flag: 1 on a rank whose own loss or squared norm is NaN or Inf. Their sum counts such
  // ranks exactly, so every rank takes the same decision (a NaN already poisons the sums, but the
  // flag does not rely on how the collective adds them). Last, this rank's own squared norm.
  at::Tensor sumsq = device_.zeros({}, at::kDouble);
  for (const at::Tensor& gr : grad_) sumsq += gr.to(at::kDouble).pow(2).sum();
  const int nred = pref ? PrefSums::kCount : 2;
  const at::Tensor own = at::stack({sumsq, loss_sum});
  const at::Tensor bad = at::logical_not(at::isfinite(own)).any().to(at::kDouble).unsqueeze(0);
  at::Tensor reduced =
      at::cat({at::stack({sharded() ? sumsq : at::zeros_like(sumsq), loss_sum}), pref_sum})
          .narrow(0, 0, nred);
  reduced = at::cat({reduced, bad}).contiguous();
  comm_.detail_set("gradient norm and loss");
  comm_.all_reduce(reduced, dist::ReduceOp::sum);
  const at::Tensor host = dist::DeviceContext::to_host(at::cat({reduced, sumsq.unsqueeze(0)}));
  const double* red = host.data_ptr<double>();
  const double local_sumsq = red[nred + 1];
  const double norm = std::sqrt(sharded() ? red[0] : local_sumsq);
  result.loss = red[1];
  if (pref) result.pref = pref_sums(counts[1], counts[2], red + 2);
  result.grad_norm = norm;
  // A finite-only overflow of the summed norm counts too (the reduced values are the same on
  // every rank, and without sharding every rank holds the same reduced gradient).
  result.skipped = red[nred] > 0.0 || !std::isfinite(norm) || !std::isfinite(result.loss);

  if (result.skipped) {
    // Skipped (as torch's GradScaler skips an inf step): no update, AdamW's step unchanged.
    for (at::Tensor& gr : grad_) gr.zero_();
  } else {
    if (options_.max_grad_norm > 0.0) {
      // torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1.
      const double coef = options_.max_grad_norm / (norm + 1e-6);
      if (coef < 1.0)
        for (at::Tensor& gr : grad_) gr.mul_(coef);
    }
    ++step_;
    for (size_t u = 0; u < lora_.size(); ++u) {
      at::Tensor& param = lora_[u]->shard();
      dist::adamw_step(param, grad_[u], adam_[u], step_, lr, options_.adam);
      grad_[u].zero_();
    }
  }

  result.bytes_gathered = stats_.bytes_gathered - gathered0;
  result.bytes_reduce_scattered = stats_.bytes_reduce_scattered - reduced0;
  result.comm_wait_seconds = comm_.wait_seconds();
  result.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return result;
}

std::vector<std::vector<dist::ShardedUnit*>> Trainer::schedule(int64_t micro_batches,
                                                               bool backward, bool reference) {
  const int64_t layers = model_.num_blocks();
  std::vector<std::vector<dist::ShardedUnit*>> out;
  for (int64_t m = 0; m < micro_batches; ++m) {
    if (reference) {
      out.push_back({base_.front().get()});
      for (int64_t i = 0; i < layers; ++i) {
        out.push_back({base_[i + 1].get()});
        if (!ref_lora_.empty()) out.back().push_back(ref_lora_[i].get());
      }
      out.push_back({base_.back().get()});
    }
    out.push_back({base_.front().get()});
    for (int64_t i = 0; i < layers; ++i) out.push_back({base_[i + 1].get(), lora_[i].get()});
    out.push_back({base_.back().get()});
    if (backward)
      for (int64_t i = layers - 1; i >= 0; --i) out.push_back({base_[i + 1].get(), lora_[i].get()});
  }
  return out;
}

at::Tensor Trainer::forward_no_grad(dist::UnitPipeline& pipe, size_t& k, const at::Tensor& tokens,
                                    const at::Tensor& positions, bool training, int64_t micro,
                                    std::vector<at::Tensor>* inputs,
                                    const std::vector<std::unique_ptr<dist::ShardedUnit>>* loras) {
  at::AutoGradMode no_grad(false);
  const auto& e = pipe.acquire(k);
  bind_embed(model_, *base_.front(), e[0]);
  at::Tensor x = model_.embed(tokens);
  bind_embed(model_, *base_.front(), at::Tensor());
  pipe.release(k++);
  for (int64_t i = 0; i < model_.num_blocks(); ++i) {
    if (inputs) inputs->push_back(x);
    const auto& bufs = pipe.acquire(k);
    bind_block(model_, i, spec_, *base_[i + 1], bufs[0], nested_offsets_[i],
               loras ? (*loras)[i].get() : nullptr, loras ? bufs[1] : at::Tensor(),
               options_.lora);
    // Training draws the dropout masks the backward recompute draws again.
    x = training ? model_.block_forward(
                       i, x, true, dropout_generator(device_, options_.seed, step_, micro, i),
                       positions)
                 : model_.block_forward(i, x, false, std::nullopt, positions);
    unbind_block(model_, i);
    pipe.release(k++);
  }
  if (inputs) inputs->push_back(x);
  return x;
}

void Trainer::forward_keep_graph(dist::UnitPipeline& pipe, size_t& k, const at::Tensor& tokens,
                                 const at::Tensor& positions, int64_t micro,
                                 std::vector<at::Tensor>& xs, std::vector<at::Tensor>& ys,
                                 std::vector<std::vector<at::Tensor>>& graph_inputs) {
  at::Tensor x;
  {
    at::AutoGradMode no_grad(false);
    const auto& e = pipe.acquire(k);
    bind_embed(model_, *base_.front(), e[0]);
    x = model_.embed(tokens);
    bind_embed(model_, *base_.front(), at::Tensor());
    pipe.release(k++);
  }
  at::AutoGradMode grad(true);
  for (int64_t i = 0; i < model_.num_blocks(); ++i) {
    const auto& bufs = pipe.acquire(k);
    bind_block(model_, i, spec_, *base_[i + 1], bufs[0], nested_offsets_[i], lora_[i].get(),
               bufs[1], options_.lora, /*late_bound=*/true);
    const at::Tensor xi = x.detach().requires_grad_(true);
    at::Tensor y = model_.block_forward(
        i, xi, /*training=*/true, dropout_generator(device_, options_.seed, step_, micro, i),
        positions);
    graph_inputs.push_back(adapted_inputs(model_.block(i), xi));
    unbind_block(model_, i);
    pipe.release(k++);
    x = y.detach();
    ys.push_back(std::move(y));
    xs.push_back(at::Tensor());  // the input lives in the graph
  }
  xs.push_back(x);
}

at::Tensor Trainer::reference_logps(dist::UnitPipeline& pipe, size_t& k, const at::Tensor& tokens,
                                    const at::Tensor& labels, const at::Tensor& positions) {
  at::AutoGradMode no_grad(false);
  const at::Tensor x = forward_no_grad(pipe, k, tokens, positions, /*training=*/false, 0, nullptr,
                                       reference_loras());
  const auto& h = pipe.acquire(k);
  bind_head(model_, *base_.back(), h[0]);
  const at::Tensor out = model_.row_logps(model_.final_norm(x), labels, options_.chunk_tokens);
  bind_head(model_, *base_.back(), at::Tensor());
  pipe.release(k++);
  return out;
}

void Trainer::set_reference_adapter() {
  ref_lora_.clear();
  for (const auto& unit : lora_) {
    ref_lora_.push_back(std::make_unique<dist::ShardedUnit>(unit->layout(), at::kFloat, device_,
                                                            sharded(), &stats_,
                                                            /*is_base=*/false));
    ref_lora_.back()->shard().copy_(unit->shard());
  }
}

Trainer::EvalSums Trainer::eval(const std::vector<Batch>& padded_batches) {
  for (const Batch& b : padded_batches) batch_check(b, "eval", options_.preference);
  const std::vector<Batch> micro_batches = without_trailing_padding(padded_batches);
  const bool pref = options_.preference;
  const bool reference = pref && options_.pref.needs_reference();
  dist::UnitPipeline pipe(
      schedule(static_cast<int64_t>(micro_batches.size()), /*backward=*/false, reference),
      options_.prefetch);
  at::AutoGradMode no_grad(false);
  at::Tensor loss_sum = device_.zeros({}, at::kDouble);
  at::Tensor pref_sum = device_.zeros({PrefSums::kCount - 2}, at::kDouble);
  double counts[3] = {0.0, 0.0, 0.0};  // targets, pairs, chosen answer tokens
  size_t k = 0;
  for (const Batch& b : micro_batches) {
    const at::Tensor tokens = device_.to_device(b.input_ids).to(at::kLong);
    const at::Tensor labels = device_.to_device(b.labels).to(at::kLong);
    const at::Tensor positions = positions_on_device(device_, b);
    const at::Tensor ref =
        reference ? reference_logps(pipe, k, tokens, labels, positions) : at::Tensor();
    const at::Tensor x =
        forward_no_grad(pipe, k, tokens, positions, /*training=*/false, 0, nullptr, &lora_);
    const auto& h = pipe.acquire(k);
    bind_head(model_, *base_.back(), h[0]);
    if (pref) {
      const std::vector<int64_t> n = row_targets(b.labels);
      const auto [pairs, chosen] = pair_counts(n);
      counts[1] += static_cast<double>(pairs);
      counts[2] += static_cast<double>(chosen);
      const at::Tensor row_counts = device_.to_device(
          at::tensor(std::vector<double>(n.begin(), n.end()), at::kDouble));
      const at::Tensor policy =
          model_.row_logps(model_.final_norm(x), labels, options_.chunk_tokens);
      pref_sum += pref_objective(options_.pref, policy, ref, row_counts, 1.0, 1.0).second;
    } else {
      const model::LossResult r =
          model_.loss(model_.final_norm(x), labels, options_.chunk_tokens, /*normalizer=*/1.0);
      loss_sum += r.loss.detach().to(at::kDouble);
      counts[0] += static_cast<double>(r.num_targets);
    }
    bind_head(model_, *base_.back(), at::Tensor());
    pipe.release(k++);
  }
  pipe.drain();
  const at::Tensor host = dist::DeviceContext::to_host(at::cat({loss_sum.unsqueeze(0), pref_sum}));
  // loss sum, targets, pairs, chosen answer tokens, then pref_objective's sums
  constexpr int kReduced = 4 + PrefSums::kCount - 2;
  double red[kReduced] = {host.data_ptr<double>()[0], counts[0], counts[1], counts[2]};
  for (int i = 0; i < PrefSums::kCount - 2; ++i) red[4 + i] = host.data_ptr<double>()[1 + i];
  comm_.all_reduce_host(red, pref ? kReduced : 2, dist::ReduceOp::sum);
  EvalSums out;
  out.loss_sum = red[0];
  out.num_targets = static_cast<int64_t>(std::llround(red[1]));
  if (pref) out.pref = pref_sums(red[2], red[3], red + 4);
  return out;
}

void Trainer::adapter_load(const lora::PeftAdapter& adapter) {
  // Every unit whole, staged on the host, so that everything is checked before any shard changes.
  std::vector<at::Tensor> fulls;
  std::vector<lora::AdapterSlot> slots;
  for (auto& unit : lora_) {
    fulls.push_back(
        at::zeros({unit->padded_numel()}, dist::DeviceContext::host_options(at::kFloat)));
    for (lora::AdapterSlot& s : lora_slots(unit->layout(), fulls.back()))
      slots.push_back(std::move(s));
  }
  lora::adapter_load(slots, adapter, "set finetuning.lora_target to the adapter's target_modules");
  for (size_t u = 0; u < lora_.size(); ++u) shard_from_full(*lora_[u], fulls[u]);
}

std::vector<Trainer::OptimizerShard> Trainer::optimizer_shards() {
  std::vector<OptimizerShard> out;
  for (size_t u = 0; u < lora_.size(); ++u) {
    OptimizerShard s;
    s.unit = lora_[u]->layout().name;
    std::tie(s.begin, s.end) = lora_[u]->owned_bytes();
    const int64_t n = static_cast<int64_t>(s.end - s.begin);
    s.exp_avg = adam_[u].exp_avg.view(at::kByte).narrow(0, 0, n);
    s.exp_avg_sq = adam_[u].exp_avg_sq.view(at::kByte).narrow(0, 0, n);
    out.push_back(std::move(s));
  }
  return out;
}

void Trainer::optimizer_load(const MomentReader& read) {
  for (size_t u = 0; u < lora_.size(); ++u) {
    const auto [begin, end] = lora_[u]->owned_bytes();
    adam_[u].exp_avg.zero_();
    adam_[u].exp_avg_sq.zero_();
    if (end == begin) continue;
    for (const auto& [which, moment] : {std::pair<const char*, at::Tensor*>{"exp_avg", &adam_[u].exp_avg},
                                        std::pair<const char*, at::Tensor*>{"exp_avg_sq", &adam_[u].exp_avg_sq}}) {
      at::Tensor host = dist::DeviceContext::to_host(moment->view(at::kByte));
      read(lora_[u]->layout().name, which, begin, end, host.data_ptr<uint8_t>());
      moment->view(at::kByte).copy_(host);
    }
  }
}

lora::PeftAdapter Trainer::adapter_gather() {
  lora::PeftAdapter out;
  out.config = options_.lora;
  out.base_model_name_or_path = model_path_;
  out.module_prefix = spec().config.weights_prefix;
  for (auto& unit : lora_) {
    dist::ShardedUnit::Gathered gathered = unit->gather_start();
    gathered.work.wait();
    lora::adapter_export(lora_slots(unit->layout(), gathered.buffer), out);
    unit->release(gathered);
  }
  return out;
}

}  // namespace qlora::train
