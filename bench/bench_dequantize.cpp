// Single-thread 4-bit (NF4, blocksize 64) dequantize of LLaMA-sized weights to fp32 and bf16:
// scalar reference vs AVX2, beside a plain memcpy moving the same number of bytes, which is the
// limit a streaming kernel can reach. Bytes counted per call (read + written):
//   n/2 packed + n/64*4 absmax + n*4 (fp32) or n*2 (bf16) output;  memcpy: half read, half written.
// The AVX2 output is checked bit for bit against the reference before anything is timed.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "quant4_cpu.h"
#include "quant4_format.h"
#include "quant4_ref.h"

namespace qlora::kernels {
namespace {

constexpr int32_t kBlocksize = 64;
constexpr QuantType kType = QuantType::nf4;
constexpr uint32_t kSeed = 1234;

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<uint8_t, FreeDeleter>;

// 64-byte aligned like a torch tensor, and touched so page faults are not timed.
Buffer alloc_buffer(size_t nbytes) {
  const size_t rounded = (nbytes + 63) / 64 * 64;
  Buffer b(static_cast<uint8_t*>(std::aligned_alloc(64, rounded)));
  if (!b) throw std::bad_alloc();
  std::memset(b.get(), 0, rounded);
  return b;
}

// A quantized weight [rows, cols]: random normal values through quantize_4bit_ref.
struct Weight {
  int64_t numel = 0;
  std::vector<uint8_t> packed;  // [(numel+1)/2]
  std::vector<float> absmax;    // [numel/64]
};

const Weight& weight(int64_t rows, int64_t cols) {
  static std::map<std::pair<int64_t, int64_t>, Weight> cache;
  auto it = cache.find({rows, cols});
  if (it != cache.end()) return it->second;
  Weight w;
  w.numel = rows * cols;
  std::vector<float> x(static_cast<size_t>(w.numel));
  std::mt19937 rng(kSeed);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  for (auto& v : x) v = normal(rng);
  w.packed.resize(static_cast<size_t>(packed_nbytes(w.numel)));
  w.absmax.resize(static_cast<size_t>(num_blocks(w.numel, kBlocksize)));
  quantize_4bit_ref(x.data(), w.numel, kBlocksize, kType, w.packed.data(), w.absmax.data());
  return cache.emplace(std::make_pair(rows, cols), std::move(w)).first->second;
}

template <typename Out>
size_t traffic_nbytes(int64_t numel) {
  return static_cast<size_t>(packed_nbytes(numel)) +
         static_cast<size_t>(num_blocks(numel, kBlocksize)) * sizeof(float) +
         static_cast<size_t>(numel) * sizeof(Out);
}

void run(const Weight& w, float* out, bool avx2) {
  if (avx2) {
    dequantize_4bit_avx2(w.packed.data(), w.absmax.data(), w.numel, kBlocksize, kType, out);
  } else {
    dequantize_4bit_ref(w.packed.data(), w.absmax.data(), w.numel, kBlocksize, kType, out);
  }
}
void run(const Weight& w, uint16_t* out, bool avx2) {
  if (avx2) {
    dequantize_4bit_bf16_avx2(w.packed.data(), w.absmax.data(), w.numel, kBlocksize, kType, out);
  } else {
    dequantize_4bit_bf16_ref(w.packed.data(), w.absmax.data(), w.numel, kBlocksize, kType, out);
  }
}

// AVX2 == reference, byte for byte, once per shape and dtype. Returns an error or "".
template <typename Out>
std::string validate(const Weight& w) {
  const size_t nbytes = static_cast<size_t>(w.numel) * sizeof(Out);
  Buffer ref = alloc_buffer(nbytes);
  Buffer avx = alloc_buffer(nbytes);
  run(w, reinterpret_cast<Out*>(ref.get()), false);
  run(w, reinterpret_cast<Out*>(avx.get()), true);
  if (std::memcmp(ref.get(), avx.get(), nbytes) != 0) {
    return "AVX2 output differs from dequantize_4bit_ref (numel=" + std::to_string(w.numel) +
           ", out " + std::to_string(sizeof(Out) * 8) + "-bit)";
  }
  return "";
}

template <typename Out>
void bm_dequantize(benchmark::State& state, int64_t rows, int64_t cols, bool avx2) {
  if (avx2 && !cpu_has_avx2()) {
    state.SkipWithError("CPU lacks AVX2/FMA");
    return;
  }
  const Weight& w = weight(rows, cols);
  if (avx2) {
    static std::map<int64_t, std::string> checked;  // numel -> error ("" = identical)
    auto it = checked.find(w.numel);
    if (it == checked.end()) it = checked.emplace(w.numel, validate<Out>(w)).first;
    if (!it->second.empty()) {
      state.SkipWithError(it->second.c_str());
      return;
    }
  }
  Buffer out = alloc_buffer(static_cast<size_t>(w.numel) * sizeof(Out));
  for (auto _ : state) {
    run(w, reinterpret_cast<Out*>(out.get()), avx2);
    benchmark::DoNotOptimize(out.get());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) *
                          static_cast<int64_t>(traffic_nbytes<Out>(w.numel)));
}

// memcpy of half the dequantize traffic: the same number of bytes read plus written.
template <typename Out>
void bm_memcpy(benchmark::State& state, int64_t rows, int64_t cols) {
  const size_t nbytes = traffic_nbytes<Out>(rows * cols) / 2;
  Buffer src = alloc_buffer(nbytes);
  Buffer dst = alloc_buffer(nbytes);
  for (auto _ : state) {
    std::memcpy(dst.get(), src.get(), nbytes);
    benchmark::DoNotOptimize(dst.get());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) *
                          static_cast<int64_t>(2 * nbytes));
}

// Names: dequantize/<kernel>/<dtype>/<rows>x<cols>, kernel one of ref, avx2, memcpy.
void register_all() {
  const std::pair<int64_t, int64_t> shapes[] = {{4096, 4096}, {4096, 11008}};
  for (const auto& [rows, cols] : shapes) {
    const std::string shape = std::to_string(rows) + "x" + std::to_string(cols);
    for (const char* kernel : {"memcpy", "ref", "avx2"}) {
      const std::string k = kernel;
      for (const char* dtype : {"fp32", "bf16"}) {
        const std::string name = "dequantize/" + k + "/" + dtype + "/" + shape;
        const bool f32 = std::string(dtype) == "fp32";
        benchmark::internal::Benchmark* b = nullptr;
        if (k == "memcpy") {
          b = f32 ? benchmark::RegisterBenchmark(name.c_str(), bm_memcpy<float>, rows, cols)
                  : benchmark::RegisterBenchmark(name.c_str(), bm_memcpy<uint16_t>, rows, cols);
        } else if (k == "ref" || k == "avx2") {
          const bool avx2 = k == "avx2";
          b = f32 ? benchmark::RegisterBenchmark(name.c_str(), bm_dequantize<float>, rows, cols,
                                                 avx2)
                  : benchmark::RegisterBenchmark(name.c_str(), bm_dequantize<uint16_t>, rows,
                                                 cols, avx2);
        } else {
          throw std::logic_error("bench_dequantize: unknown kernel " + k);
        }
        b->Unit(benchmark::kMillisecond)->UseRealTime();
      }
    }
  }
}

}  // namespace
}  // namespace qlora::kernels

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  qlora::kernels::register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
