// One QLoRA linear, forward + backward, fp32 compute on the CPU with 2 intra-op threads
// (QLORA_BENCH_THREADS=n overrides; THP_MEM_ALLOC_ENABLE=1 is libtorch's switch for 2 MiB pages):
//   y[M, N] = x[M, K] @ W^T + s * (x @ A^T) @ B^T,   M = 512 tokens, rank 16,
// W [N, K] 4-bit NF4 (blocksize 64, double quantization) dequantized for the forward product and
// again for dL/dx (qlora_4bit), against the same computation with a frozen fp32 W kept in memory
// (fp32_linear). The difference is the cost of the 4-bit path: two dequantizes per step.
// FLOPs per step: base forward and dL/dx, 2 * (2 M N K) (W is frozen: no dL/dW product), plus LoRA
// 6 M r (K + N) (forward 2, backward 4 products). Both paths are checked against each other first.
#include <benchmark/benchmark.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "lora/lora_linear.h"
#include "quant/quantize.h"
#include "quant4_cpu.h"

namespace qlora::lora {
namespace {

constexpr int64_t kTokens = 512;
constexpr int64_t kRank = 16;
constexpr double kAlpha = 32.0;
constexpr int kThreads = 2;  // default; QLORA_BENCH_THREADS overrides
// 2.6 GHz (nominal; the core boosts above it) x 32 fp32 FLOP/cycle (two 256-bit FMA pipes): the
// AVX2 peak of one core of this VM, for scale.
constexpr double kPeakGflopsPerCore = 2.6 * 32;

struct Shape {
  int64_t in, out;
};
const std::vector<Shape> kShapes = {{4096, 4096}, {4096, 11008}};

std::string shape_name(const Shape& s) {
  return std::to_string(s.in) + "x" + std::to_string(s.out);
}

double step_flops(const Shape& s) {
  const double m = kTokens, k = s.in, n = s.out, r = kRank;
  return 2 * (2 * m * n * k) + 6 * m * r * (k + n);
}

at::Tensor randn(at::IntArrayRef shape, uint64_t seed, double stddev) {
  return at::randn(shape, at::detail::createCPUGenerator(seed),
                   at::TensorOptions().dtype(at::kFloat)) *
         stddev;
}

// Everything one shape needs, built once.
struct Setup {
  std::unique_ptr<QLoraLinear> layer;  // 4-bit base + adapter
  at::Tensor w;                        // [out, in] fp32, the dequantized base (plain path)
  at::Tensor a, b;                     // [r, in], [out, r] leaves of the plain path
  at::Tensor x;                        // [M, in] requires grad
  at::Tensor g;                        // [M, out] upstream gradient
  double scale = 0;
};

Setup& setup(const Shape& s) {
  static std::map<std::string, Setup> cache;
  auto it = cache.find(shape_name(s));
  if (it != cache.end()) return it->second;
  Setup st;
  quant::QuantizeOptions options;
  options.double_quant = true;  // QLoRA's default (bnb_4bit_use_double_quant)
  const quant::Quantized q = quant::quantize_4bit(randn({s.out, s.in}, 1, 0.02), options);
  st.w = quant::dequantize_4bit(q.packed, q.state, at::kFloat);
  st.layer = std::make_unique<QLoraLinear>("model.layers.0.mlp.up_proj", q, at::Tensor());
  const LoraConfig config{kRank, kAlpha, 0.0, false};
  st.layer->adapter_set(config, randn({kRank, s.in}, 2, 0.01), randn({s.out, kRank}, 3, 0.01));
  st.a = st.layer->lora_A().detach().clone().requires_grad_(true);
  st.b = st.layer->lora_B().detach().clone().requires_grad_(true);
  st.scale = config.scale();
  st.x = randn({kTokens, s.in}, 4, 1.0).requires_grad_(true);
  st.g = randn({kTokens, s.out}, 5, 1.0);
  return cache.emplace(shape_name(s), std::move(st)).first->second;
}

void grads_clear(std::initializer_list<at::Tensor> leaves) {
  for (at::Tensor t : leaves) t.mutable_grad() = at::Tensor();
}

at::Tensor plain_forward(const Setup& st) {
  const at::Tensor lora = at::linear(at::linear(st.x, st.a), st.b) * st.scale;
  return at::linear(st.x, st.w) + lora;
}

// The two paths must agree before either is timed: same W values, same products.
void validate(const Shape& s) {
  Setup& st = setup(s);
  grads_clear({st.x, st.a, st.b, st.layer->lora_A(), st.layer->lora_B()});
  const at::Tensor y4 = st.layer->forward(st.x);
  y4.backward(st.g);
  const at::Tensor dx4 = st.x.grad().clone();
  st.x.mutable_grad() = at::Tensor();
  const at::Tensor yp = plain_forward(st);
  yp.backward(st.g);
  auto check = [&](const char* what, const at::Tensor& got, const at::Tensor& want) {
    // fp32 sums of 512..11008 products of size ~1: 1e-4 of the largest value covers reordering.
    const double atol = 1e-4 * want.abs().max().item<double>();
    if (!at::allclose(got, want, 1e-4, atol))
      throw std::runtime_error("bench_qlora_linear " + shape_name(s) + ": " + what +
                               " differs between the 4-bit and the fp32 path");
  };
  check("y", y4, yp);
  check("dL/dx", dx4, st.x.grad());
  check("dL/dA", st.layer->lora_A().grad(), st.a.grad());
  check("dL/dB", st.layer->lora_B().grad(), st.b.grad());
  std::printf("validated %s: y, dL/dx, dL/dA, dL/dB of both paths agree (rtol 1e-4)\n",
              shape_name(s).c_str());
}

void bm_qlora_4bit(benchmark::State& state, Shape s) {
  Setup& st = setup(s);
  for (auto _ : state) {
    grads_clear({st.x, st.layer->lora_A(), st.layer->lora_B()});
    st.layer->forward(st.x).backward(st.g);
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(step_flops(s) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void bm_fp32_linear(benchmark::State& state, Shape s) {
  Setup& st = setup(s);
  for (auto _ : state) {
    grads_clear({st.x, st.a, st.b});
    plain_forward(st).backward(st.g);
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(step_flops(s) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// Bytes a dequantize to fp32 reads and writes: packed n/2, uint8 absmax n/64, output 4n.
double dequantize_nbytes(const Shape& s) { return s.in * s.out * (0.5 + 1.0 / 64 + 4.0); }

// The pieces: one dequantize as qlora_base_matmul runs it (quant::dequantize_4bit: decode the
// double-quantized absmax, allocate a fresh output, run the kernel) ...
void bm_dequantize(benchmark::State& state, Shape s) {
  const QLoraLinear& layer = *setup(s).layer;
  for (auto _ : state)
    benchmark::DoNotOptimize(
        quant::dequantize_4bit(layer.base().packed, layer.base().state, at::kFloat));
  state.counters["GB/s"] = benchmark::Counter(dequantize_nbytes(s) * 1e-9,
                                              benchmark::Counter::kIsIterationInvariantRate);
}

// ... the same work into an output buffer allocated once: what a dequantize workspace reused
// across products costs (absmax decode + kernel, no page faults) ...
void bm_dequantize_reuse(benchmark::State& state, Shape s) {
  const quant::Quantized& q = setup(s).layer->base();
  const at::Tensor bytes = quant::packed_bytes(q.packed);
  at::Tensor out = at::zeros({s.out, s.in}, at::kFloat);  // touched once, outside the timing
  for (auto _ : state) {
    const at::Tensor absmax = q.state.absmax_fp32().contiguous();
    kernels::dequantize_4bit_cpu(bytes.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                 q.state.numel(), q.state.blocksize, q.state.quant_type,
                                 out.data_ptr<float>());
    benchmark::DoNotOptimize(out.data_ptr<float>());
  }
  if (!at::equal(out, quant::dequantize_4bit(q.packed, q.state, at::kFloat)))
    state.SkipWithError("dequantize into a reused buffer differs from quant::dequantize_4bit");
  state.counters["GB/s"] = benchmark::Counter(dequantize_nbytes(s) * 1e-9,
                                              benchmark::Counter::kIsIterationInvariantRate);
}

// ... and one base GEMM x @ W^T.

void bm_gemm(benchmark::State& state, Shape s) {
  Setup& st = setup(s);
  const at::Tensor x = st.x.detach();
  for (auto _ : state) benchmark::DoNotOptimize(at::linear(x, st.w));
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * kTokens * s.in * s.out * 1e-9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

// The overhead again, robust to other processes on these shared cores: 9 pairs of one plain
// and one 4-bit step, back to back (order alternating), and the median of the per-pair ratios.
struct Paired {
  double median = 0, low = 0, high = 0;  // ratio qlora_4bit / fp32_linear - 1
};

Paired paired_overhead(const Shape& s, int pairs = 9) {
  Setup& st = setup(s);
  auto step_seconds = [&](bool four_bit) {
    const auto begin = std::chrono::steady_clock::now();
    if (four_bit) {
      grads_clear({st.x, st.layer->lora_A(), st.layer->lora_B()});
      st.layer->forward(st.x).backward(st.g);
    } else {
      grads_clear({st.x, st.a, st.b});
      plain_forward(st).backward(st.g);
    }
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
  };
  step_seconds(false);  // warm-up
  step_seconds(true);
  std::vector<double> ratios;
  for (int i = 0; i < pairs; ++i) {
    const bool four_bit_first = i % 2 == 1;
    const double first = step_seconds(four_bit_first), second = step_seconds(!four_bit_first);
    ratios.push_back(four_bit_first ? first / second : second / first);
  }
  std::sort(ratios.begin(), ratios.end());
  return {ratios[ratios.size() / 2] - 1, ratios.front() - 1, ratios.back() - 1};
}

// Console output as usual, plus the time per iteration of every repetition for the summary.
class Collector : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& r : runs)
      if (r.run_type == Run::RT_Iteration && r.iterations > 0)
        times[r.benchmark_name()].push_back(r.real_accumulated_time /
                                            static_cast<double>(r.iterations));
    ConsoleReporter::ReportRuns(runs);
  }
  // Median over repetitions (--benchmark_repetitions): this VM's cores are shared, and the
  // median shrugs off a repetition that ran beside someone's compile.
  std::map<std::string, double> medians() const {
    std::map<std::string, double> out;
    for (auto [name, v] : times) {
      std::sort(v.begin(), v.end());
      out[name] = v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
    }
    return out;
  }
  std::map<std::string, std::vector<double>> times;
};

void summary_print(const std::map<std::string, double>& seconds,
                   const std::map<std::string, Paired>& paired, int threads) {
  auto find = [&](const std::string& name, const Shape& s) {
    for (const auto& [key, t] : seconds)
      if (key.rfind(name + "/" + shape_name(s) + "/", 0) == 0) return t;
    return -1.0;
  };
  std::printf(
      "\n| shape (in x out) | fp32_linear ms | qlora_4bit ms | fp32_linear GFLOP/s | "
      "qlora_4bit GFLOP/s | overhead of 4-bit | paired overhead, median (range) |\n");
  std::printf("| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  for (const Shape& s : kShapes) {
    const double plain = find("fp32_linear", s), q4 = find("qlora_4bit", s);
    if (plain <= 0 || q4 <= 0) continue;
    const Paired p = paired.at(shape_name(s));
    std::printf("| %s | %.1f | %.1f | %.1f | %.1f | %+.1f%% | %+.1f%% (%+.1f%% .. %+.1f%%) |\n",
                shape_name(s).c_str(), plain * 1e3, q4 * 1e3, step_flops(s) / plain * 1e-9,
                step_flops(s) / q4 * 1e-9, (q4 / plain - 1) * 100, p.median * 100, p.low * 100,
                p.high * 100);
  }
  std::printf(
      "\n| shape (in x out) | one base GEMM ms | dequantize ms | dequantize, reused "
      "output ms | 2 x dequantize / fp32_linear | 2 x reused / fp32_linear |\n");
  std::printf("| --- | ---: | ---: | ---: | ---: | ---: |\n");
  for (const Shape& s : kShapes) {
    const double plain = find("fp32_linear", s), deq = find("dequantize", s);
    const double reuse = find("dequantize_reuse", s), gemm = find("gemm", s);
    if (plain <= 0 || deq <= 0 || reuse <= 0 || gemm <= 0) continue;
    std::printf("| %s | %.1f | %.1f | %.1f | %.1f%% | %.1f%% |\n", shape_name(s).c_str(),
                gemm * 1e3, deq * 1e3, reuse * 1e3, 2 * deq / plain * 100, 2 * reuse / plain * 100);
  }
  std::printf(
      "\n%d thread(s), medians of the repetitions; peak %.0f GFLOP/s per core (AVX2 fp32, "
      "2.6 GHz nominal x 32 FLOP/cycle)\n",
      threads, kPeakGflopsPerCore);
}

}  // namespace
}  // namespace qlora::lora

int main(int argc, char** argv) {
  using namespace qlora::lora;
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  const char* threads_env = std::getenv("QLORA_BENCH_THREADS");
  const int threads = threads_env != nullptr ? std::atoi(threads_env) : kThreads;
  at::set_num_threads(threads);
  for (const Shape& s : kShapes) {
    validate(s);
    const std::string n = shape_name(s);
    benchmark::RegisterBenchmark(("fp32_linear/" + n).c_str(), bm_fp32_linear, s)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("qlora_4bit/" + n).c_str(), bm_qlora_4bit, s)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("dequantize/" + n).c_str(), bm_dequantize, s)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("dequantize_reuse/" + n).c_str(), bm_dequantize_reuse, s)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("gemm/" + n).c_str(), bm_gemm, s)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
  Collector collector;
  benchmark::RunSpecifiedBenchmarks(&collector);
  std::map<std::string, Paired> paired;
  for (const Shape& s : kShapes) paired[shape_name(s)] = paired_overhead(s);
  summary_print(collector.medians(), paired, threads);
  benchmark::Shutdown();
  return 0;
}
