// safetensors: writer -> reader round trips, every malformed header we know of (each must give
// a FormatError naming the file, what is wrong and what is expected), a seeded mutation fuzz
// loop, and Hugging Face model directories (single file and sharded index).
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "temp_dir.h"

namespace qlora::io {
namespace {

using testing::file_read;
using testing::file_write;
using testing::TempDir;

// u64 little-endian header length, header, data: a file built byte by byte, so tests can
// say exactly what is wrong with it.
std::string safetensors_bytes(const std::string& header, const std::string& data = "",
                              uint64_t header_nbytes = UINT64_MAX) {
  if (header_nbytes == UINT64_MAX) header_nbytes = header.size();
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(header_nbytes >> (8 * i));
  return bytes + header + data;
}

// The message of the FormatError that opening `path` must throw ("" and a failure if none).
std::string open_error(const std::string& path) {
  try {
    SafetensorsFile::open(path);
  } catch (const FormatError& e) {
    return e.what();
  }
  ADD_FAILURE() << "no FormatError opening " << path;
  return "";
}

// The message names the file first and ends with what would be right, in parentheses.
void expect_message(const std::string& message, const std::string& path, const std::string& what) {
  EXPECT_EQ(message.rfind(path + ": ", 0), 0u) << "message: " << message;
  EXPECT_NE(message.find(what), std::string::npos) << "expected '" << what << "' in: " << message;
  EXPECT_EQ(message.back(), ')') << "message: " << message;
  EXPECT_NE(message.find(" ("), std::string::npos) << "message: " << message;
}

std::vector<uint8_t> bytes_pattern(size_t nbytes, uint8_t seed) {
  std::vector<uint8_t> bytes(nbytes);
  for (size_t i = 0; i < nbytes; ++i) bytes[i] = static_cast<uint8_t>(seed + 31 * i);
  return bytes;
}

TEST(SafetensorsDType, NamesAndSizesRoundTrip) {
  const std::vector<std::pair<DType, size_t>> expected = {
      {DType::BOOL, 1}, {DType::U8, 1},  {DType::I8, 1},  {DType::I16, 2},     {DType::U16, 2},
      {DType::I32, 4},  {DType::U32, 4}, {DType::I64, 8}, {DType::U64, 8},     {DType::F16, 2},
      {DType::BF16, 2}, {DType::F32, 4}, {DType::F64, 8}, {DType::F8_E4M3, 1}, {DType::F8_E5M2, 1},
      {DType::F8_E8M0, 1}, {DType::F8_E4M3FNUZ, 1}, {DType::F8_E5M2FNUZ, 1}};
  for (const auto& [dtype, nbytes] : expected) {
    EXPECT_EQ(dtype_size(dtype), nbytes) << dtype_name(dtype);
    EXPECT_EQ(dtype_from_name(dtype_name(dtype)), dtype) << dtype_name(dtype);
  }
  EXPECT_STREQ(dtype_name(DType::BF16), "BF16");
  EXPECT_STREQ(dtype_name(DType::F8_E4M3), "F8_E4M3");
  EXPECT_STREQ(dtype_name(DType::F8_E8M0), "F8_E8M0");  // what Python safetensors writes
  try {
    dtype_from_name("F33");
    ADD_FAILURE() << "F33 accepted";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("'F33'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("BF16"), std::string::npos) << e.what();
  }
}

struct RoundTripCase {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
};

TEST(SafetensorsRoundTrip, DTypesShapesAndMetadata) {
  TempDir dir;
  // Odd byte sizes first, so later tensors start at unaligned offsets too.
  const std::vector<RoundTripCase> cases = {
      {"odd.u8", DType::U8, {7}},
      {"scalar.f32", DType::F32, {}},
      {"matrix.bf16", DType::BF16, {3, 5}},
      {"empty.f32", DType::F32, {0}},
      {"empty.inner.i64", DType::I64, {3, 0, 2}},
      {"cube.f64", DType::F64, {2, 3, 7}},
      {"ones.i16", DType::I16, {1, 1, 1}},
      {"mask.bool", DType::BOOL, {11}},
      {"fp8.e4m3", DType::F8_E4M3, {13}},
      {"fp8.e5m2", DType::F8_E5M2, {2, 2}},
      {"ids.i32", DType::I32, {5}},
      {"u64", DType::U64, {1}},
      {"f16", DType::F16, {9}},
  };
  SafetensorsWriter writer;
  std::vector<std::vector<uint8_t>> payloads;
  for (size_t i = 0; i < cases.size(); ++i) {
    int64_t numel = 1;
    for (int64_t dim : cases[i].shape) numel *= dim;
    payloads.push_back(bytes_pattern(static_cast<size_t>(numel) * dtype_size(cases[i].dtype),
                                     static_cast<uint8_t>(i)));
    writer.add(cases[i].name, cases[i].dtype, cases[i].shape, payloads[i].data(),
               payloads[i].size());
  }
  writer.set_metadata("format", "pt");
  writer.set_metadata("note", "round trip");
  EXPECT_EQ(writer.size(), cases.size());
  const std::string path = dir.file("model.safetensors");
  writer.write(path);

  const auto file = SafetensorsFile::open(path);
  EXPECT_EQ(file->path(), path);
  ASSERT_EQ(file->tensors().size(), cases.size());
  // Data goes in the reference writer's order, widest dtype first then by name, contiguous, so
  // every tensor is aligned to its element size even after odd-sized ones.
  size_t offset = 0;
  for (size_t i = 0; i < file->tensors().size(); ++i) {
    const TensorInfo& info = file->tensors()[i];
    SCOPED_TRACE("tensor " + info.name);
    EXPECT_EQ(info.offset, offset);
    EXPECT_EQ(info.offset % dtype_size(info.dtype), 0u);
    if (i > 0) {
      const TensorInfo& prev = file->tensors()[i - 1];
      const size_t a = dtype_size(prev.dtype), b = dtype_size(info.dtype);
      EXPECT_TRUE(a > b || (a == b && prev.name < info.name)) << prev.name << " before " << info.name;
    }
    offset += info.nbytes;
  }
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE("tensor " + cases[i].name);
    const TensorInfo& info = file->at(cases[i].name);
    EXPECT_EQ(info.dtype, cases[i].dtype);
    EXPECT_EQ(info.shape, cases[i].shape);
    EXPECT_EQ(info.nbytes, payloads[i].size());
    EXPECT_EQ(info.numel() * static_cast<int64_t>(dtype_size(info.dtype)),
              static_cast<int64_t>(info.nbytes));
    EXPECT_EQ(file->find(cases[i].name), &info);
    if (info.nbytes > 0) {
      EXPECT_EQ(std::memcmp(file->data(info), payloads[i].data(), info.nbytes), 0);
    }
  }
  EXPECT_EQ(file->find("absent"), nullptr);
  expect_message(
      [&] {
        try {
          file->at("absent");
        } catch (const FormatError& e) {
          return std::string(e.what());
        }
        return std::string();
      }(),
      path, "no tensor named 'absent'");
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"note", "round trip"}};
  EXPECT_EQ(file->metadata(), metadata);

  // Layout: header padded with spaces to 8 bytes, metadata first, data right after.
  const std::string raw = file_read(path);
  uint64_t header_nbytes = 0;
  for (int i = 7; i >= 0; --i) header_nbytes = (header_nbytes << 8) | uint8_t(raw[i]);
  EXPECT_EQ(header_nbytes % 8, 0u);
  EXPECT_EQ(raw.size(), 8 + header_nbytes + offset);
  EXPECT_EQ(raw.compare(8, 16, "{\"__metadata__\":"), 0) << raw.substr(8, 40);
  const std::string header = raw.substr(8, header_nbytes);
  EXPECT_EQ(header.find_last_not_of(' '), header.find_last_of('}'));
}

TEST(SafetensorsRoundTrip, EmptyFileAndNoMetadata) {
  TempDir dir;
  const std::string path = dir.file("empty.safetensors");
  SafetensorsWriter().write(path);
  const auto file = SafetensorsFile::open(path);
  EXPECT_TRUE(file->tensors().empty());
  EXPECT_TRUE(file->metadata().empty());
  EXPECT_EQ(file_read(path), safetensors_bytes("{}      "));

  SafetensorsWriter writer;
  const float value = 1.5f;
  writer.add("x", DType::F32, {}, &value, sizeof value);
  writer.write(path);  // replaces the old file
  EXPECT_EQ(file_read(path).compare(8, 9, "{\"x\":{\"dt"), 0);
  const auto rewritten = SafetensorsFile::open(path);
  float read = 0;
  std::memcpy(&read, rewritten->data(rewritten->at("x")), sizeof read);
  EXPECT_EQ(read, value);
  // Nothing but the file itself is left in the directory (the temp file was renamed).
  size_t entries = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir.path())) {
    ++entries;
    EXPECT_EQ(entry.path().filename().string(), "empty.safetensors");
  }
  EXPECT_EQ(entries, 1u);
}

TEST(SafetensorsWriter, RejectsBadTensorsAndUnwritablePaths) {
  SafetensorsWriter writer;
  const std::vector<uint8_t> bytes(12);
  writer.add("a", DType::F32, {3}, bytes.data(), 12);
  EXPECT_THROW(writer.add("a", DType::F32, {3}, bytes.data(), 12), std::invalid_argument);
  EXPECT_THROW(writer.add("b", DType::F32, {4}, bytes.data(), 12), std::invalid_argument);
  EXPECT_THROW(writer.add("c", DType::F32, {-3}, bytes.data(), 12), std::invalid_argument);
  EXPECT_THROW(writer.add("__metadata__", DType::U8, {12}, bytes.data(), 12),
               std::invalid_argument);
  EXPECT_THROW(writer.add("d", DType::U8, {12}, nullptr, 12), std::invalid_argument);
  EXPECT_EQ(writer.size(), 1u);

  TempDir dir;
  const std::string path = dir.file("missing_dir/model.safetensors");
  try {
    writer.write(path);
    ADD_FAILURE() << "wrote into a missing directory";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
}

struct BadHeaderCase {
  const char* label;
  std::string bytes;
  const char* what;  // must appear in the message
};

TEST(SafetensorsBadHeader, EachGivesAFormatErrorWithAUsefulMessage) {
  TempDir dir;
  const std::string data12(12, '\x01');
  const std::vector<BadHeaderCase> cases = {
      {"empty file", "", "file is 0 bytes"},
      {"truncated length", std::string("\x08\x00\x00", 3), "file is 3 bytes"},
      {"length beyond the file", safetensors_bytes("{}", "", 100), "header length 100 is larger"},
      {"absurd length", safetensors_bytes("{}", "", uint64_t{1} << 60), "is larger than the file"},
      {"empty header", safetensors_bytes(""), "not valid JSON"},
      {"invalid JSON", safetensors_bytes("{\"x\": {\"dtype\": "), "not valid JSON"},
      {"NUL padding", safetensors_bytes(std::string("{}\0\0", 4)),
       "header has a NUL byte at offset 10"},
      {"text after NUL", safetensors_bytes(std::string("{}\0x", 4)), "NUL byte"},
      {"text after the object", safetensors_bytes("{} {}"), "not valid JSON"},
      {"array header", safetensors_bytes("[1, 2]"), "header is [1, 2]"},
      {"string header", safetensors_bytes("\"x\""), "header is \"x\""},
      {"entry not an object", safetensors_bytes("{\"x\": 5}"), "tensor 'x' entry is 5"},
      {"missing dtype",
       safetensors_bytes(R"({"x": {"shape": [], "data_offsets": [0, 4]}})", "abcd"),
       "tensor 'x' dtype is missing"},
      {"unknown dtype",
       safetensors_bytes(R"({"x": {"dtype": "F33", "shape": [], "data_offsets": [0, 4]}})", "abcd"),
       "tensor 'x' has unknown dtype \"F33\""},
      {"dtype not a string",
       safetensors_bytes(R"({"x": {"dtype": 4, "shape": [], "data_offsets": [0, 4]}})", "abcd"),
       "tensor 'x' dtype is 4"},
      {"missing shape",
       safetensors_bytes(R"({"x": {"dtype": "F32", "data_offsets": [0, 4]}})", "abcd"),
       "tensor 'x' shape is missing"},
      {"negative shape",
       safetensors_bytes(R"({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})",
                         "abcd"),
       "tensor 'x' shape has entry -1"},
      {"fractional shape",
       safetensors_bytes(R"({"x": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 4]}})",
                         "abcd"),
       "tensor 'x' shape has entry 2.5"},
      {"shape beyond int64",
       safetensors_bytes(
           R"({"x": {"dtype": "U8", "shape": [18446744073709551615], "data_offsets": [0, 4]}})",
           "abcd"),
       "shape has entry 18446744073709551615"},
      {"shape product overflow",
       safetensors_bytes(
           R"({"x": {"dtype": "F32", "shape": [1099511627776, 1099511627776], "data_offsets": [0, 4]}})",
           "abcd"),
       "shape [1099511627776, 1099511627776] has more elements than fit in 64 bits"},
      {"byte size overflow",
       safetensors_bytes(
           R"({"x": {"dtype": "F64", "shape": [2305843009213693952], "data_offsets": [0, 4]}})",
           "abcd"),
       "has more elements than fit in 64 bits"},
      {"missing offsets", safetensors_bytes(R"({"x": {"dtype": "F32", "shape": [1]}})", "abcd"),
       "tensor 'x' data_offsets is missing"},
      {"three offsets",
       safetensors_bytes(R"({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}})",
                         "abcd"),
       "data_offsets is [0, 4, 8]"},
      {"negative offset",
       safetensors_bytes(R"({"x": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}})",
                         "abcd"),
       "data_offsets is [-4, 0]"},
      {"offsets beyond the data section",
       safetensors_bytes(R"({"x": {"dtype": "F32", "shape": [3], "data_offsets": [4, 16]}})",
                         data12),
       "tensor 'x' data_offsets [4, 16] end beyond the data section (expected end <= 12"},
      {"begin after end",
       safetensors_bytes(R"({"x": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}})",
                         data12),
       "tensor 'x' data_offsets [8, 4] have begin after end"},
      {"size mismatch",
       safetensors_bytes(R"({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 10]}})",
                         data12),
       "tensor 'x' data_offsets [0, 10] do not match dtype F32 shape [3] (expected 12 bytes)"},
      {"overlapping tensors",
       safetensors_bytes(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                         data12),
       "tensors 'a' [0, 8] and 'b' [4, 12] overlap"},
      {"tensor inside another",
       safetensors_bytes(R"({"b": {"dtype": "U8", "shape": [2], "data_offsets": [5, 7]},
                             "a": {"dtype": "U8", "shape": [12], "data_offsets": [0, 12]},
                             "c": {"dtype": "U8", "shape": [2], "data_offsets": [8, 10]}})",
                         data12),
       "tensors 'a' [0, 12] and 'b' [5, 7] overlap"},
      {"duplicate name",
       safetensors_bytes(R"({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                             "a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}})",
                         data12),
       "header lists 'a' twice"},
      {"metadata not an object", safetensors_bytes(R"({"__metadata__": ["pt"]})"),
       "__metadata__ is [\"pt\"] (expected an object"},
      {"metadata value not a string",
       safetensors_bytes(R"({"__metadata__": {"format": "pt", "step": 3}})"),
       "__metadata__ key 'step' is 3 (expected a string value)"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(cases[i].label);
    const std::string path = dir.file("bad_" + std::to_string(i) + ".safetensors");
    file_write(path, cases[i].bytes);
    expect_message(open_error(path), path, cases[i].what);
  }
}

TEST(SafetensorsBadHeader, HeaderAboveTheCapIsRefusedBeforeParsing) {
  TempDir dir;
  const std::string path = dir.file("huge.safetensors");
  const uint64_t header_nbytes = (uint64_t{100} << 20) + 8;
  file_write(path, safetensors_bytes("{", "", header_nbytes));
  std::filesystem::resize_file(path, 8 + header_nbytes + 64);  // sparse: costs no disk
  expect_message(open_error(path), path, "header length 104857608 is too large");
}

TEST(SafetensorsBadHeader, MissingFileAndDirectory) {
  TempDir dir;
  expect_message(open_error(dir.file("absent.safetensors")), dir.file("absent.safetensors"),
                 "cannot open");
  expect_message(open_error(dir.path()), dir.path(), "is not a regular file");
}

TEST(SafetensorsValidEdgeCases, EmptyTensorsGapsAndWhitespace) {
  TempDir dir;
  const std::string path = dir.file("edge.safetensors");
  // Empty tensors may sit anywhere, even at the very end or inside another tensor's bytes;
  // gaps between tensors are allowed.
  file_write(
      path, safetensors_bytes(R"(  {"e0": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]},
      "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
      "e1": {"dtype": "I64", "shape": [0], "data_offsets": [2, 2]},
      "b": {"dtype": "U8", "shape": [2], "data_offsets": [6, 8]},
      "e2": {"dtype": "U8", "shape": [0], "data_offsets": [8, 8]}}   )",
                              "abcdefgh"));
  const auto file = SafetensorsFile::open(path);
  ASSERT_EQ(file->tensors().size(), 5u);
  EXPECT_EQ(file->tensors()[0].name, "e0");  // header order, not sorted
  EXPECT_EQ(file->tensors()[4].name, "e2");
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(file->data(file->at("b"))), 2), "gh");
  EXPECT_EQ(file->at("e0").numel(), 0);
}

// Random byte flips, JSON-ish character swaps and truncations of a valid file: the only
// acceptable outcomes are a FormatError or a file whose every tensor reads within bounds.
TEST(SafetensorsFuzz, MutatedFilesGiveFormatErrorOrValidTensors) {
  constexpr uint64_t kSeed = 20240611;
  constexpr int kIterations = 4000;
  TempDir dir;
  SafetensorsWriter writer;
  const std::vector<uint8_t> a = bytes_pattern(4 * 6, 1);
  const std::vector<uint8_t> b = bytes_pattern(3, 2);
  const std::vector<uint8_t> c = bytes_pattern(2 * 10, 3);
  writer.add("layers.0.weight", DType::F32, {2, 3}, a.data(), a.size());
  writer.add("layers.0.bias", DType::U8, {3}, b.data(), b.size());
  writer.add("empty", DType::I64, {0, 5}, nullptr, 0);
  writer.add("scalar", DType::BF16, {}, c.data(), 2);
  writer.add("layers.1.weight", DType::F16, {9}, c.data() + 2, 18);
  writer.set_metadata("format", "pt");
  const std::string valid_path = dir.file("valid.safetensors");
  writer.write(valid_path);
  const std::string valid = file_read(valid_path);
  uint64_t header_nbytes = 0;
  for (int i = 7; i >= 0; --i) header_nbytes = (header_nbytes << 8) | uint8_t(valid[i]);
  const size_t header_end = 8 + header_nbytes;

  std::mt19937_64 rng(kSeed);
  auto uniform = [&](size_t lo, size_t hi) {  // [lo, hi]
    return std::uniform_int_distribution<size_t>(lo, hi)(rng);
  };
  const std::string json_chars = "0123456789[]{},:\"- .eE";
  const std::string path = dir.file("mutated.safetensors");
  int opened = 0;
  int rejected = 0;
  for (int iteration = 0; iteration < kIterations; ++iteration) {
    std::string bytes = valid;
    const size_t kind = uniform(0, 4);
    std::string mutation;
    if (kind == 0) {  // flip bits anywhere in the length and header
      for (size_t n = uniform(1, 3); n > 0; --n) {
        const size_t at = uniform(0, header_end - 1);
        bytes[at] = static_cast<char>(bytes[at] ^ (1u << uniform(0, 7)));
        mutation += " flip@" + std::to_string(at);
      }
    } else if (kind == 1) {  // swap header characters for JSON punctuation and digits
      for (size_t n = uniform(1, 3); n > 0; --n) {
        const size_t at = uniform(8, header_end - 1);
        bytes[at] = json_chars[uniform(0, json_chars.size() - 1)];
        mutation += " char@" + std::to_string(at) + "=" + bytes[at];
      }
    } else if (kind == 2) {  // truncate
      bytes.resize(uniform(0, bytes.size() - 1));
      mutation = " truncate to " + std::to_string(bytes.size());
    } else if (kind == 3) {  // a random byte in the length
      const size_t at = uniform(0, 7);
      bytes[at] = static_cast<char>(uniform(0, 255));
      mutation = " length byte " + std::to_string(at);
    } else {  // delete a header byte, keeping the stated length
      const size_t at = uniform(8, header_end - 1);
      bytes.erase(at, 1);
      mutation = " erase@" + std::to_string(at);
    }
    file_write(path, bytes);
    try {
      const auto file = SafetensorsFile::open(path);
      ++opened;
      uint64_t checksum = 0;
      for (const TensorInfo& info : file->tensors()) {
        ASSERT_EQ(info.numel() * static_cast<int64_t>(dtype_size(info.dtype)),
                  static_cast<int64_t>(info.nbytes))
            << "iteration " << iteration << mutation;
        const uint8_t* data = file->data(info);
        for (size_t i = 0; i < info.nbytes; ++i) checksum += data[i];
      }
      volatile uint64_t sink = checksum;  // keeps the reads
      (void)sink;
    } catch (const FormatError& e) {
      ++rejected;
      ASSERT_EQ(std::string(e.what()).rfind(path + ": ", 0), 0u)
          << "iteration " << iteration << mutation << ": " << e.what();
    } catch (const std::exception& e) {
      FAIL() << "iteration " << iteration << mutation << ": not a FormatError: " << e.what();
    }
  }
  // Both outcomes occur, so the loop exercises the validation and not only the JSON parser.
  EXPECT_GT(opened, 0) << "seed " << kSeed;
  EXPECT_GT(rejected, 0) << "seed " << kSeed;
  std::cout << "fuzz: " << opened << " opened, " << rejected << " rejected\n";
}

// ---------------------------------------------------------------------------------------------
// Model directories

void shard_write(const std::string& path, const std::vector<std::string>& names, uint8_t seed) {
  SafetensorsWriter writer;
  for (size_t i = 0; i < names.size(); ++i) {
    const std::vector<uint8_t> bytes = bytes_pattern(8, static_cast<uint8_t>(seed + i));
    writer.add(names[i], DType::F32, {2}, bytes.data(), bytes.size());
  }
  writer.write(path);
}

std::string open_dir_error(const std::string& dir) {
  try {
    ModelWeights::open_dir(dir);
  } catch (const FormatError& e) {
    return e.what();
  }
  ADD_FAILURE() << "no FormatError opening " << dir;
  return "";
}

const char* kIndexTwoShards = R"({
  "metadata": {"total_size": 32},
  "weight_map": {
    "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
    "model.layers.0.weight": "model-00001-of-00002.safetensors",
    "lm_head.weight": "model-00002-of-00002.safetensors"
  }
})";

TEST(ModelWeights, SingleFile) {
  TempDir dir;
  shard_write(dir.file("model.safetensors"), {"b", "a"}, 10);
  const ModelWeights weights = ModelWeights::open_dir(dir.path());
  EXPECT_EQ(weights.names(), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(weights.files().size(), 1u);
  EXPECT_TRUE(weights.contains("a"));
  EXPECT_FALSE(weights.contains("c"));
  EXPECT_EQ(weights.info("b").shape, (std::vector<int64_t>{2}));
  EXPECT_EQ(weights.data("b")[0], 10);
  EXPECT_EQ(weights.data("a")[0], 11);
  try {
    weights.info("c");
    ADD_FAILURE() << "unknown tensor accepted";
  } catch (const FormatError& e) {
    expect_message(e.what(), dir.path(), "model weights have no tensor 'c'");
  }
}

TEST(ModelWeights, ShardedIndex) {
  TempDir dir;
  shard_write(dir.file("model-00001-of-00002.safetensors"),
              {"model.embed_tokens.weight", "model.layers.0.weight"}, 20);
  // A tensor the index does not list is not part of the model.
  shard_write(dir.file("model-00002-of-00002.safetensors"), {"lm_head.weight", "stray"}, 30);
  file_write(dir.file("model.safetensors.index.json"), kIndexTwoShards);
  const ModelWeights weights = ModelWeights::open_dir(dir.path() + "/");
  EXPECT_EQ(weights.names(),
            (std::vector<std::string>{"lm_head.weight", "model.embed_tokens.weight",
                                      "model.layers.0.weight"}));
  ASSERT_EQ(weights.files().size(), 2u);
  EXPECT_FALSE(weights.contains("stray"));
  EXPECT_EQ(weights.data("model.embed_tokens.weight")[0], 20);
  EXPECT_EQ(weights.data("model.layers.0.weight")[0], 21);
  EXPECT_EQ(weights.data("lm_head.weight")[0], 30);
  EXPECT_EQ(weights.info("lm_head.weight").dtype, DType::F32);
}

// A decoder stored under a prefix is read by the loader's names (Gemma3ForConditionalGeneration).
TEST(ModelWeights, AliasReadsTheStoredTensor) {
  TempDir dir;
  shard_write(dir.file("model.safetensors"),
              {"model.language_model.norm.weight", "model.vision_tower.w"}, 40);
  ModelWeights weights = ModelWeights::open_dir(dir.path());
  weights.alias("model.norm.weight", "model.language_model.norm.weight");
  EXPECT_TRUE(weights.contains("model.norm.weight"));
  EXPECT_EQ(weights.data("model.norm.weight")[0], 40);
  EXPECT_EQ(weights.info("model.norm.weight").name, "model.language_model.norm.weight");
  // names() lists what is stored, once.
  EXPECT_EQ(weights.names(), (std::vector<std::string>{"model.language_model.norm.weight",
                                                       "model.vision_tower.w"}));
  // An alias of nothing stored, or one that is stored itself, is refused.
  EXPECT_THROW(weights.alias("x", "not.stored"), std::invalid_argument);
  EXPECT_THROW(weights.alias("model.vision_tower.w", "model.language_model.norm.weight"),
               std::invalid_argument);
  EXPECT_THROW(weights.alias("model.norm.weight", "model.vision_tower.w"), std::invalid_argument);
}

TEST(ModelWeights, SingleFileWinsOverIndex) {
  TempDir dir;
  shard_write(dir.file("model.safetensors"), {"only"}, 1);
  file_write(dir.file("model.safetensors.index.json"), kIndexTwoShards);  // shards absent
  EXPECT_EQ(ModelWeights::open_dir(dir.path()).names(), std::vector<std::string>{"only"});
}

TEST(ModelWeights, IndexNamingAMissingShard) {
  TempDir dir;
  shard_write(dir.file("model-00001-of-00002.safetensors"),
              {"model.embed_tokens.weight", "model.layers.0.weight"}, 20);
  file_write(dir.file("model.safetensors.index.json"), kIndexTwoShards);
  expect_message(open_dir_error(dir.path()), dir.file("model.safetensors.index.json"),
                 "shard 'model-00002-of-00002.safetensors' (holding tensor 'lm_head.weight') does "
                 "not exist");
}

TEST(ModelWeights, TensorMissingFromItsShard) {
  TempDir dir;
  shard_write(dir.file("model-00001-of-00002.safetensors"), {"model.embed_tokens.weight"}, 20);
  shard_write(dir.file("model-00002-of-00002.safetensors"),
              {"lm_head.weight", "model.layers.0.weight"}, 30);
  file_write(dir.file("model.safetensors.index.json"), kIndexTwoShards);
  expect_message(open_dir_error(dir.path()), dir.file("model.safetensors.index.json"),
                 "tensor 'model.layers.0.weight' is not in its shard "
                 "'model-00001-of-00002.safetensors'");
}

TEST(ModelWeights, BadIndexFiles) {
  TempDir dir;
  const std::string index = dir.file("model.safetensors.index.json");
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{\"weight_map\": ", "invalid JSON"},
      {"[]", "top level is []"},
      {"{\"metadata\": {}}", "weight_map is missing"},
      {"{\"weight_map\": [\"a\"]}", "weight_map is [\"a\"]"},
      {"{\"weight_map\": {\"a\": 3}}", "weight_map entry for tensor 'a' is 3"},
      {"{\"weight_map\": {\"a\": \"\"}}", "weight_map entry for tensor 'a' is \"\""},
  };
  for (const auto& [text, what] : cases) {
    SCOPED_TRACE(text);
    file_write(index, text);
    expect_message(open_dir_error(dir.path()), index, what);
  }
}

TEST(ModelWeights, MissingDirectoryOrWeights) {
  TempDir dir;
  const std::string absent = dir.file("absent");
  expect_message(open_dir_error(absent), absent, "model directory does not exist");
  const std::string message = open_dir_error(dir.path());
  expect_message(message, dir.path(), "no model weights found");
  EXPECT_NE(message.find("model.safetensors or model.safetensors.index.json"), std::string::npos)
      << message;
  // A broken shard's own error comes through with the shard's path.
  file_write(dir.file("model.safetensors"), "abc");
  expect_message(open_dir_error(dir.path()), dir.file("model.safetensors"), "file is 3 bytes");
}

}  // namespace
}  // namespace qlora::io
