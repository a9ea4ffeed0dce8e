// The decoder block's small ops, forward + backward, fused (model/fused_ops.h) beside the ATen
// op sequence transformers runs (decoder.cpp's unfused path), on the CPU with 2 intra-op threads
// (QLORA_BENCH_THREADS=n overrides), fp32 and bf16, 4 x 256 tokens at two model shapes:
//   smollm2: SmolLM2-135M (hidden 576, 9 / 3 heads of 64, FFN 1536)
//   1b:      TinyLlama-1.1B (hidden 2048, 32 / 4 heads of 64, FFN 5632)
// Ops: rmsnorm [tokens, hidden]; add_rmsnorm (hidden = x + a, norm(hidden), both outputs used);
// rope on q and k [B, T, heads, 64]; swiglu [tokens, FFN]. Then one whole SmolLM2-shaped block
// (LoRA r 8 on its seven 4-bit linears, causal GQA attention): block_forward + backward of x and
// the LoRA weights, fused vs unfused.
// Bytes moved per fused forward + backward (e = element size, N = elements of one activation):
//   rmsnorm 5 N e (fwd: x, y; bwd: x, dy, dx), add_rmsnorm 8 N e, rope 4 N e (q and k together),
//   swiglu 8 N e (fwd: gate, up, out; bwd: gate, up, dout, dgate, dup); printed as GB/s beside
// the copy bandwidth of the same threads (at::Tensor::copy_ of 64 MiB, read + write counted).
// Every fused op is checked against the ATen sequence before it is timed.
#include <benchmark/benchmark.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <unistd.h>
#include <vector>

#include "model/decoder.h"
#include "model/fused_ops.h"
#include "model/init_model.h"

namespace qlora::model {
namespace {

constexpr int64_t kBatch = 4, kSeq = 256, kHeadDim = 64;
constexpr int kThreads = 2;

struct Shape {
  std::string name;
  int64_t hidden, heads, kv_heads, ffn;
};
const std::vector<Shape> kShapes = {{"smollm2", 576, 9, 3, 1536}, {"1b", 2048, 32, 4, 5632}};
const std::vector<at::ScalarType> kDtypes = {at::kFloat, at::kBFloat16};
std::string dname(at::ScalarType t) { return t == at::kFloat ? "fp32" : "bf16"; }

at::Tensor randn(at::IntArrayRef shape, uint64_t seed, at::ScalarType dtype) {
  return at::randn(shape, at::detail::createCPUGenerator(seed), at::TensorOptions().dtype(at::kFloat))
      .to(dtype);
}

// ---- the unfused sequences (transformers' ops) ----
at::Tensor ref_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::ScalarType input_dtype = x.scalar_type();
  at::Tensor h = x.to(at::kFloat);
  const at::Tensor variance = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(variance + eps);
  return weight * h.to(input_dtype);
}
at::Tensor ref_rope(const at::Tensor& x4, const at::Tensor& cos, const at::Tensor& sin) {
  const at::Tensor q = x4.transpose(1, 2);
  const int64_t half = q.size(-1) / 2;
  const at::Tensor rot = at::cat({-q.narrow(-1, half, half), q.narrow(-1, 0, half)}, -1);
  return q * cos.unsqueeze(1) + rot * sin.unsqueeze(1);
}

enum class Op { rmsnorm, add_rmsnorm, rope, swiglu };
const char* op_name(Op op) {
  switch (op) {
    case Op::rmsnorm: return "rmsnorm";
    case Op::add_rmsnorm: return "add_rmsnorm";
    case Op::rope: return "rope";
    case Op::swiglu: return "swiglu";
  }
  throw std::invalid_argument("unknown op");
}

// Inputs of one op at one shape and dtype, built once.
struct Case {
  std::vector<at::Tensor> inputs;    // requiring grad
  std::vector<at::Tensor> upstream;  // one per output
  at::Tensor w, cos, sin;
  double nbytes = 0;                 // fused forward + backward
};

Case& case_of(Op op, const Shape& s, at::ScalarType dtype) {
  static std::map<std::string, Case> cache;
  const std::string key = std::string(op_name(op)) + s.name + dname(dtype);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  Case c;
  const double e = dtype == at::kFloat ? 4 : 2;
  const int64_t tokens = kBatch * kSeq;
  if (op == Op::rmsnorm || op == Op::add_rmsnorm) {
    c.w = randn({s.hidden}, 1, dtype);
    c.inputs.push_back(randn({kBatch, kSeq, s.hidden}, 2, dtype).requires_grad_(true));
    c.upstream.push_back(randn({kBatch, kSeq, s.hidden}, 3, dtype));
    if (op == Op::add_rmsnorm) {
      c.inputs.push_back(randn({kBatch, kSeq, s.hidden}, 4, dtype).requires_grad_(true));
      c.upstream.push_back(randn({kBatch, kSeq, s.hidden}, 5, dtype));
    }
    c.nbytes = (op == Op::rmsnorm ? 5 : 8) * tokens * s.hidden * e;
  } else if (op == Op::rope) {
    for (int64_t n : {s.heads, s.kv_heads}) {
      c.inputs.push_back(randn({kBatch, kSeq, n, kHeadDim}, 6 + n, dtype).requires_grad_(true));
      // As attention hands it back: [B, n, T, D] strides over [B, T, n, D] memory.
      c.upstream.push_back(randn({kBatch, kSeq, n, kHeadDim}, 7 + n, dtype).transpose(1, 2));
    }
    const at::Tensor inv_freq = at::pow(1e5, -at::arange(0, kHeadDim, 2).to(at::kFloat) / kHeadDim);
    std::tie(c.cos, c.sin) = rope_cos_sin(inv_freq, kSeq, dtype);
    c.nbytes = 4 * tokens * (s.heads + s.kv_heads) * kHeadDim * e;
  } else {
    c.inputs.push_back(randn({kBatch, kSeq, s.ffn}, 8, dtype).requires_grad_(true));
    c.inputs.push_back(randn({kBatch, kSeq, s.ffn}, 9, dtype).requires_grad_(true));
    c.upstream.push_back(randn({kBatch, kSeq, s.ffn}, 10, dtype));
    c.nbytes = 8 * tokens * s.ffn * e;
  }
  return cache.emplace(key, std::move(c)).first->second;
}

std::vector<at::Tensor> run_forward(Op op, const Case& c, bool fused) {
  const auto& in = c.inputs;
  switch (op) {
    case Op::rmsnorm:
      return {fused ? fused_rms_norm(in[0], c.w, 1e-5, false) : ref_rms_norm(in[0], c.w, 1e-5)};
    case Op::add_rmsnorm: {
      if (fused) {
        auto [h, y] = fused_add_rms_norm(in[0], in[1], c.w, 1e-5, false);
        return {h, y};
      }
      const at::Tensor h = in[0] + in[1];
      return {h, ref_rms_norm(h, c.w, 1e-5)};
    }
    case Op::rope:
      if (fused)
        return {fused_rope(in[0], c.cos, c.sin).transpose(1, 2),
                fused_rope(in[1], c.cos, c.sin).transpose(1, 2)};
      return {ref_rope(in[0], c.cos, c.sin), ref_rope(in[1], c.cos, c.sin)};
    case Op::swiglu:
      return {fused ? fused_glu(in[0], in[1], fused::GluAct::silu) : at::silu(in[0]) * in[1]};
  }
  throw std::invalid_argument("unknown op");
}

std::vector<at::Tensor> run_step(Op op, const Case& c, bool fused) {
  const std::vector<at::Tensor> out = run_forward(op, c, fused);
  return torch::autograd::grad(out, c.inputs, c.upstream);
}

void validate(Op op, const Shape& s, at::ScalarType dtype) {
  const Case& c = case_of(op, s, dtype);
  const auto want_y = run_forward(op, c, false), got_y = run_forward(op, c, true);
  const auto want_g = run_step(op, c, false), got_g = run_step(op, c, true);
  // fp32: a few ulp; bf16: one bf16 ulp of an element (tests/model/test_fused_ops.cpp has the
  // exact tolerances); here only a sanity check with room for both.
  const double rtol = dtype == at::kFloat ? 1e-5 : 1.6e-2;
  auto check = [&](const at::Tensor& got, const at::Tensor& want, const char* what) {
    const double atol = rtol * want.abs().max().to(at::kDouble).item<double>();
    if (!at::allclose(got.to(at::kDouble), want.to(at::kDouble), rtol, atol))
      throw std::runtime_error(std::string("bench_fused_ops ") + op_name(op) + " " + s.name + " " +
                               dname(dtype) + ": fused " + what + " differs from the ATen sequence");
  };
  for (size_t i = 0; i < want_y.size(); ++i) check(got_y[i], want_y[i], "output");
  for (size_t i = 0; i < want_g.size(); ++i) check(got_g[i], want_g[i], "gradient");
}

void bm_op(benchmark::State& state, Op op, Shape s, at::ScalarType dtype, bool fused) {
  const Case& c = case_of(op, s, dtype);
  for (auto _ : state) benchmark::DoNotOptimize(run_step(op, c, fused));
  if (fused)
    state.counters["GB/s"] =
        benchmark::Counter(c.nbytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// ---- one SmolLM2-135M-shaped block with LoRA ----
struct BlockCase {
  std::unique_ptr<DecoderModel> model;
  at::Tensor x, g;
  std::vector<at::Tensor> inputs;  // x, then the LoRA A / B
};

BlockCase& block_case(at::ScalarType dtype) {
  static std::map<at::ScalarType, BlockCase> cache;
  auto it = cache.find(dtype);
  if (it != cache.end()) return it->second;
  ModelConfig cfg = preset_config("tiny");
  cfg.vocab_size = 256;
  cfg.hidden_size = 576;
  cfg.intermediate_size = 1536;
  cfg.num_hidden_layers = 1;
  cfg.num_attention_heads = 9;
  cfg.num_key_value_heads = 3;
  cfg.head_dim = 64;
  cfg.rope_theta = 1e5;
  cfg.max_position_embeddings = 2048;
  const std::string dir = (std::filesystem::temp_directory_path() /
                           ("bench_fused_ops_" + std::to_string(getpid()) + "_" + dname(dtype)))
                              .string();
  init_model_write(cfg, 1, dir);
  LoadOptions o;
  o.compute_dtype = dtype;
  BlockCase b;
  b.model = std::make_unique<DecoderModel>(DecoderModel::load(dir, o));
  std::filesystem::remove_all(dir);
  lora::LoraConfig lc;
  lc.rank = 8;
  lc.alpha = 16;
  b.model->adapters_init(lc, lora::block_linear_names(), 3);
  for (at::Tensor& p : b.model->adapter_parameters())  // B non-zero: gradients reach A too
    if (p.size(1) == lc.rank) p.detach().copy_(randn(p.sizes().vec(), 4, at::kFloat) * 0.01);
  b.x = randn({kBatch, kSeq, cfg.hidden_size}, 5, dtype).requires_grad_(true);
  b.g = randn({kBatch, kSeq, cfg.hidden_size}, 6, dtype);
  b.inputs = {b.x};
  for (const at::Tensor& p : b.model->adapter_parameters()) b.inputs.push_back(p);
  return cache.emplace(dtype, std::move(b)).first->second;
}

std::vector<at::Tensor> block_step(BlockCase& b, bool fused) {
  b.model->set_fused_ops(fused);
  const at::Tensor y = b.model->block_forward(0, b.x, /*training=*/true);
  return torch::autograd::grad({y}, b.inputs, {b.g});
}

void block_validate(at::ScalarType dtype) {
  BlockCase& b = block_case(dtype);
  const auto want = block_step(b, false), got = block_step(b, true);
  const double rtol = dtype == at::kFloat ? 1e-5 : 3e-2;  // see test_fused_ops' block test
  for (size_t i = 0; i < want.size(); ++i) {
    const double diff = (got[i].to(at::kDouble) - want[i].to(at::kDouble)).abs().max().item<double>();
    if (diff > rtol * want[i].abs().max().to(at::kDouble).item<double>())
      throw std::runtime_error("bench_fused_ops block " + dname(dtype) + ": gradient #" +
                               std::to_string(i) + " of the fused block differs");
  }
}

void bm_block(benchmark::State& state, at::ScalarType dtype, bool fused) {
  BlockCase& b = block_case(dtype);
  for (auto _ : state) benchmark::DoNotOptimize(block_step(b, fused));
  state.counters["tokens/s"] =
      benchmark::Counter(kBatch * kSeq, benchmark::Counter::kIsIterationInvariantRate);
}

void bm_copy(benchmark::State& state) {
  const at::Tensor src = at::rand({16 << 20}), dst = at::empty({16 << 20});
  for (auto _ : state) dst.copy_(src);
  state.counters["GB/s"] = benchmark::Counter(2.0 * src.nbytes() * 1e-9,
                                              benchmark::Counter::kIsIterationInvariantRate);
}

class Collector : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& r : runs)
      if (r.run_type == Run::RT_Iteration && r.iterations > 0)
        times[r.benchmark_name()].push_back(r.real_accumulated_time /
                                            static_cast<double>(r.iterations));
    ConsoleReporter::ReportRuns(runs);
  }
  double median(const std::string& prefix) const {  // of the first name starting with prefix
    for (auto [name, v] : times)
      if (name.rfind(prefix, 0) == 0) {
        std::sort(v.begin(), v.end());
        return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
      }
    return -1;
  }
  std::map<std::string, std::vector<double>> times;
};

const std::vector<Op> kOps = {Op::rmsnorm, Op::add_rmsnorm, Op::rope, Op::swiglu};

void summary_print(const Collector& c, int threads) {
  const double copy = c.median("copy");
  const double copy_gbs = copy > 0 ? 2.0 * (16 << 20) * 4 / copy * 1e-9 : 0;
  std::printf("\n| op | shape | dtype | unfused ms | fused ms | speedup | fused GB/s |\n");
  std::printf("| --- | --- | --- | ---: | ---: | ---: | ---: |\n");
  for (Op op : kOps)
    for (const Shape& s : kShapes)
      for (at::ScalarType dtype : kDtypes) {
        const std::string n = std::string(op_name(op)) + "/" + s.name + "/" + dname(dtype);
        const double u = c.median(n + "/unfused"), f = c.median(n + "/fused");
        if (u <= 0 || f <= 0) continue;
        std::printf("| %s | %s | %s | %.3f | %.3f | %.2fx | %.1f |\n", op_name(op), s.name.c_str(),
                    dname(dtype).c_str(), u * 1e3, f * 1e3, u / f,
                    case_of(op, s, dtype).nbytes / f * 1e-9);
      }
  for (at::ScalarType dtype : kDtypes) {
    const double u = c.median("block/smollm2/" + dname(dtype) + "/unfused");
    const double f = c.median("block/smollm2/" + dname(dtype) + "/fused");
    if (u > 0 && f > 0)
      std::printf("| block fwd+bwd (LoRA r8) | smollm2 | %s | %.2f | %.2f | %.2fx | |\n",
                  dname(dtype).c_str(), u * 1e3, f * 1e3, u / f);
  }
  std::printf("\n%d thread(s), forward + backward, medians of the repetitions; copy_ bandwidth "
              "%.1f GB/s (read + write); kernels: %s\n",
              threads, copy_gbs, fused::row_kernels_best().isa);
}

}  // namespace
}  // namespace qlora::model

int main(int argc, char** argv) {
  using namespace qlora::model;
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  const char* threads_env = std::getenv("QLORA_BENCH_THREADS");
  const int threads = threads_env != nullptr ? std::atoi(threads_env) : kThreads;
  at::set_num_threads(threads);
  benchmark::RegisterBenchmark("copy", bm_copy)->UseRealTime()->Unit(benchmark::kMillisecond);
  for (Op op : kOps)
    for (const Shape& s : kShapes)
      for (at::ScalarType dtype : kDtypes) {
        validate(op, s, dtype);
        for (bool fused : {false, true}) {
          const std::string n = std::string(op_name(op)) + "/" + s.name + "/" + dname(dtype) +
                                (fused ? "/fused" : "/unfused");
          benchmark::RegisterBenchmark(n.c_str(), bm_op, op, s, dtype, fused)
              ->UseRealTime()
              ->Unit(benchmark::kMillisecond);
        }
      }
  for (at::ScalarType dtype : kDtypes) {
    block_validate(dtype);
    for (bool fused : {false, true})
      benchmark::RegisterBenchmark(
          ("block/smollm2/" + dname(dtype) + (fused ? "/fused" : "/unfused")).c_str(), bm_block,
          dtype, fused)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
  }
  std::printf("validated: every fused op and the fused block agree with the ATen sequence\n");
  Collector collector;
  benchmark::RunSpecifiedBenchmarks(&collector);
  summary_print(collector, threads);
  benchmark::Shutdown();
  return 0;
}
