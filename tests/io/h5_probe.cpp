// h5_probe: a tiny command line over H5File for tests/io/test_h5_interop.py, which checks with
// h5py that both sides read what the other wrote.
//   h5_probe write FILE                          a known file: bytes, int32 2-D, attributes
//   h5_probe bytes FILE DATASET [OFFSET NBYTES]  hex of the bytes (all of them by default)
//   h5_probe rows FILE DATASET ROW0 NROWS        {"shape": [..], "rows": [[..], ..]}
//   h5_probe attr-string FILE OBJECT NAME        the string, then a newline
//   h5_probe attr-int FILE OBJECT NAME           the integer
//   h5_probe has FILE DATASET                    true / false
// Errors: one line "h5_probe: error: ..." on stderr, exit 1.
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "io/h5_file.h"

namespace {

using qlora::io::H5File;

// The file `write` produces; test_h5_interop.py holds the same values.
void write_known_file(const std::string& path) {
  H5File file = H5File::create(path);
  std::vector<uint8_t> bytes(1003);  // odd on purpose
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>(i * 31 + 7);
  file.write_bytes("units/block.3", bytes.data(), bytes.size());
  std::vector<int32_t> tokens(5 * 7);  // [5, 7]
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>(i * i) - 17;
  tokens.front() = INT32_MIN;
  tokens.back() = INT32_MAX;
  file.write_int32_2d("data/tokens", tokens.data(), 5, 7);
  nlohmann::json config = {{"name", "h\u00e9llo"}};
  for (int i = 0; i < 5000; ++i) config["key_" + std::to_string(i)] = i;
  file.set_attr_string("/", "config", config.dump());
  file.set_attr_int64("/", "step", 1234567890123);
  file.set_attr_string("units/block.3", "kind", "nf4");
  file.set_attr_int64("units/block.3", "numel", 2006);
  file.close();
}

std::string hex(const std::vector<uint8_t>& bytes) {
  static const char digits[] = "0123456789abcdef";
  std::string text;
  for (uint8_t b : bytes) {
    text += digits[b >> 4];
    text += digits[b & 15];
  }
  return text;
}

int run(const std::vector<std::string>& args) {
  const auto need = [&](size_t n) {
    if (args.size() < n) throw std::invalid_argument("usage: see tests/io/h5_probe.cpp");
  };
  need(2);
  const std::string& command = args[0];
  const std::string& path = args[1];
  if (command == "write") {
    write_known_file(path);
  } else if (command == "bytes") {
    need(3);
    const H5File file = H5File::open_read(path);
    const size_t offset = args.size() > 3 ? std::stoull(args[3]) : 0;
    const size_t nbytes = args.size() > 4 ? std::stoull(args[4]) : file.nbytes(args[2]) - offset;
    std::vector<uint8_t> out(nbytes);
    file.read_bytes(args[2], offset, nbytes, out.data());
    std::cout << hex(out) << "\n";
  } else if (command == "rows") {
    need(5);
    const H5File file = H5File::open_read(path);
    const std::vector<int64_t> shape = file.shape(args[2]);
    const int64_t nrows = std::stoll(args[4]);
    const int64_t cols = shape.size() == 2 ? shape[1] : 0;
    std::vector<int32_t> out(static_cast<size_t>(nrows * cols));
    file.read_int32_rows(args[2], std::stoll(args[3]), nrows, out.data());
    nlohmann::json rows = nlohmann::json::array();
    for (int64_t r = 0; r < nrows; ++r)
      rows.push_back(std::vector<int32_t>(out.begin() + r * cols, out.begin() + (r + 1) * cols));
    std::cout << nlohmann::json{{"shape", shape}, {"rows", rows}}.dump() << "\n";
  } else if (command == "attr-string") {
    need(4);
    std::cout << H5File::open_read(path).attr_string(args[2], args[3]) << "\n";
  } else if (command == "attr-int") {
    need(4);
    std::cout << H5File::open_read(path).attr_int64(args[2], args[3]) << "\n";
  } else if (command == "has") {
    need(3);
    std::cout << (H5File::open_read(path).has(args[2]) ? "true" : "false") << "\n";
  } else {
    throw std::invalid_argument("unknown command '" + command +
                                "' (expected write, bytes, rows, attr-string, attr-int or has)");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(std::vector<std::string>(argv + 1, argv + argc));
  } catch (const std::exception& e) {
    std::cout.flush();
    std::fprintf(stderr, "h5_probe: error: %s\n", e.what());
    return 1;
  }
}
