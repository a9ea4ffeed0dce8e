// Drives qlora::data::Tokenizer for test_tokenizer_reference.py and bench/tokenizer_vs_hf.py:
//   tokenize_probe encode TOKENIZER_JSON TEXTS OUT [--add-special]   texts -> ids
//   tokenize_probe decode TOKENIZER_JSON IDS OUT [--skip-special]    ids -> texts
// TEXTS and decode's OUT are records (uint32 byte count, bytes); IDS and encode's OUT are
// records (uint32 count, int32 ids), little-endian. Prints {"seconds": s, "bytes": n} for the
// work alone (file I/O excluded), so the same run measures throughput.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "data/tokenizer.h"

namespace {

std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

uint32_t read_u32(const std::string& buf, size_t& pos) {
  if (pos + 4 > buf.size()) throw std::runtime_error("truncated record header");
  uint32_t v;
  std::memcpy(&v, buf.data() + pos, 4);
  pos += 4;
  return v;
}

void put_u32(std::string& out, uint32_t v) { out.append(reinterpret_cast<const char*>(&v), 4); }

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 5) {
      std::cerr << "usage: tokenize_probe encode|decode TOKENIZER_JSON IN OUT [--add-special|--skip-special]\n";
      return 2;
    }
    const std::string mode = argv[1];
    const bool flag = argc > 5;
    const auto tok = qlora::data::Tokenizer::from_file(argv[2]);
    const std::string in = read_all(argv[3]);
    std::string out;
    size_t pos = 0, work_bytes = 0;
    double seconds = 0;
    if (mode == "encode") {
      std::vector<std::string> texts;
      while (pos < in.size()) {
        const uint32_t n = read_u32(in, pos);
        if (pos + n > in.size()) throw std::runtime_error("truncated text record");
        texts.emplace_back(in, pos, n);
        pos += n;
        work_bytes += n;
      }
      std::vector<std::vector<int32_t>> ids(texts.size());
      const auto t0 = std::chrono::steady_clock::now();
      for (size_t i = 0; i < texts.size(); ++i) ids[i] = tok.encode(texts[i], flag);
      seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      for (const auto& v : ids) {
        put_u32(out, static_cast<uint32_t>(v.size()));
        out.append(reinterpret_cast<const char*>(v.data()), v.size() * 4);
      }
    } else if (mode == "decode") {
      std::vector<std::vector<int32_t>> ids;
      while (pos < in.size()) {
        const uint32_t n = read_u32(in, pos);
        if (pos + 4ull * n > in.size()) throw std::runtime_error("truncated ids record");
        ids.emplace_back(n);
        std::memcpy(ids.back().data(), in.data() + pos, 4ull * n);
        pos += 4ull * n;
      }
      std::vector<std::string> texts(ids.size());
      const auto t0 = std::chrono::steady_clock::now();
      for (size_t i = 0; i < ids.size(); ++i) texts[i] = tok.decode(ids[i], flag);
      seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      for (const auto& t : texts) {
        put_u32(out, static_cast<uint32_t>(t.size()));
        out += t;
        work_bytes += t.size();
      }
    } else {
      throw std::runtime_error("unknown mode '" + mode + "' (encode, decode)");
    }
    std::ofstream(argv[4], std::ios::binary).write(out.data(), static_cast<std::streamsize>(out.size()));
    std::printf("{\"seconds\": %.6f, \"bytes\": %zu}\n", seconds, work_bytes);
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "tokenize_probe: " << e.what() << "\n";
    return 1;
  }
}
