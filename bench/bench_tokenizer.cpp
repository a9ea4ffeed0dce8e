// Encode throughput of qlora::data::Tokenizer on the SmolLM2 tokenizer.json (env
// QLORA_SMOLLM2_DIR, else <repo>/.models/smollm2) over the plain-text licence files of
// /usr/share/common-licenses. Validates first: byte-level BPE is lossless, so decode(encode(x))
// must give x back. Target (issue 13): ~100 MB of text per minute per core = 1.7 MB/s.
// bench/tokenizer_vs_hf.py runs the same comparison against `tokenizers` side by side.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "data/tokenizer.h"

namespace {

std::string tokenizer_path() {
  const char* env = std::getenv("QLORA_SMOLLM2_DIR");
  const std::string dir = env ? env : std::string(QLORA_SOURCE_DIR) + "/.models/smollm2";
  return dir + "/tokenizer.json";
}

// The licence texts, each cut at line ends into ~4 KB documents.
std::vector<std::string> corpus() {
  std::vector<std::filesystem::path> files;
  for (const auto& e : std::filesystem::directory_iterator("/usr/share/common-licenses")) {
    if (e.is_regular_file()) files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());
  std::vector<std::string> docs;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    const std::string text((std::istreambuf_iterator<char>(in)), {});
    size_t start = 0;
    while (start < text.size()) {
      size_t end = std::min(text.size(), start + 4000);
      if (end < text.size()) {
        const size_t nl = text.rfind('\n', end);
        if (nl != std::string::npos && nl > start) end = nl + 1;
      }
      docs.push_back(text.substr(start, end - start));
      start = end;
    }
  }
  return docs;
}

size_t total_bytes(const std::vector<std::string>& docs) {
  size_t n = 0;
  for (const auto& d : docs) n += d.size();
  return n;
}

bool validate(const qlora::data::Tokenizer& tok, const std::vector<std::string>& docs) {
  for (const auto& d : docs) {
    if (tok.decode(tok.encode(d)) != d) {
      std::cerr << "bench_tokenizer: decode(encode(x)) != x for a document starting "
                << d.substr(0, 60) << "\n";
      return false;
    }
  }
  return true;
}

// Warm: the word cache holds the corpus' words after the first pass (steady state of a long run).
void BM_EncodeWarm(benchmark::State& state) {
  const auto tok = qlora::data::Tokenizer::from_file(tokenizer_path());
  const auto docs = corpus();
  if (!validate(tok, docs)) {
    state.SkipWithError("round trip failed");
    return;
  }
  size_t tokens = 0;
  for (auto _ : state) {
    for (const auto& d : docs) tokens += tok.encode(d).size();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * total_bytes(docs)));
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(tokens), benchmark::Counter::kIsRate);
  state.counters["target_MB/s"] = 1.7;
}

// Cold: a fresh tokenizer (empty cache) per pass; every word goes through the merge loop once.
void BM_EncodeCold(benchmark::State& state) {
  const auto docs = corpus();
  for (auto _ : state) {
    state.PauseTiming();
    auto tok = qlora::data::Tokenizer::from_file(tokenizer_path());
    state.ResumeTiming();
    for (const auto& d : docs) benchmark::DoNotOptimize(tok.encode(d));
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * total_bytes(docs)));
  state.counters["target_MB/s"] = 1.7;
}

void BM_Load(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(qlora::data::Tokenizer::from_file(tokenizer_path()));
}

}  // namespace

BENCHMARK(BM_EncodeWarm)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EncodeCold)->Unit(benchmark::kMillisecond)->Iterations(3);
BENCHMARK(BM_Load)->Unit(benchmark::kMillisecond)->Iterations(3);
BENCHMARK_MAIN();
