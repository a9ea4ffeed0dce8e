// H5File: bytes and int32 row round trips read back by hyperslab at every offset (sentinels around
// every output), the bytes_read counter, string / int64 attributes, and every error we expect a
// user to meet (missing, non-HDF5 and truncated files, missing datasets, ranges past the end,
// wrong types), each a one-line message naming the file and object with nothing on stderr.
// Files of types H5File never writes (float, int64, fixed-length strings) are made with the raw
// HDF5 API.
#include <gtest/gtest.h>
#include <hdf5.h>

#include <climits>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "expect_error.h"
#include "io/h5_file.h"
#include "h5_raw.h"
#include "temp_dir.h"

namespace qlora::io {
namespace {

using qlora::testing::contains;
using qlora::testing::invalid_argument_message;
using testing::file_write;
using testing::TempDir;

constexpr uint8_t kSentinel = 0xA5;
constexpr int32_t kSentinel32 = -0x5A5A5A5A;

// The message of the std::runtime_error that `f` must throw ("" and a failure if none). Also
// checks that HDF5 printed nothing on stderr on the way.
std::string runtime_error_message(const std::function<void()>& f) {
  ::testing::internal::CaptureStderr();
  std::string message;
  try {
    f();
    ADD_FAILURE() << "expected std::runtime_error, nothing thrown";
  } catch (const std::runtime_error& e) {
    message = e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected std::runtime_error, got: " << e.what();
  }
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(err, "") << "HDF5 printed on stderr for: " << message;
  return message;
}

// One line, starting with the file's path, naming every one of `names`.
void expect_message(const std::string& message, const std::string& path,
                    const std::vector<std::string>& names) {
  EXPECT_EQ(message.rfind(path + ": ", 0), 0u) << "message: " << message;
  EXPECT_EQ(message.find('\n'), std::string::npos) << "message: " << message;
  for (const std::string& name : names)
    EXPECT_TRUE(contains(message, name)) << "expected '" << name << "' in: " << message;
}

std::vector<uint8_t> bytes_pattern(size_t nbytes, uint8_t seed) {
  std::vector<uint8_t> bytes(nbytes);
  for (size_t i = 0; i < nbytes; ++i) bytes[i] = static_cast<uint8_t>(seed + 31 * i + (i >> 8));
  return bytes;
}

std::vector<int32_t> int32_pattern(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> dist(INT32_MIN, INT32_MAX);
  std::vector<int32_t> values(static_cast<size_t>(rows * cols));
  for (auto& v : values) v = dist(rng);
  if (!values.empty()) values.front() = INT32_MIN;
  if (values.size() > 1) values.back() = INT32_MAX;
  return values;
}

// A long config.json-like string (about 200 KB: far past HDF5's 64 KB object header limit).
std::string long_json() {
  std::string json =
      "{\"architectures\": [\"LlamaForCausalLM\"], \"name\": \"h\\u00e9llo \xc3\xa9\"";
  for (int i = 0; i < 6000; ++i)
    json += ", \"key_" + std::to_string(i) + "\": " + std::to_string(i * 7);
  return json + "}";
}

// ---- raw HDF5, for what H5File never writes ----

using qlora::io::testing::raw_dataset;

// floats [2, 3] float32; tokens64 [3, 2] int64 in int32 range; big64 [2, 2] int64 with a value
// past INT32_MAX; tokens16 [2, 3] uint16; vector [4] int32 (1-D); root attributes: fixed (a
// fixed-length NUL-padded string), spaced (space-padded), huge (uint64 past INT64_MAX), small
// (uint16), ratio (float64), list (int64 [3]).
void write_raw_file(const std::string& path) {
  const hid_t file = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  ASSERT_GE(file, 0);
  const float floats[6] = {0.5f, 1, 2, 3, 4, 5};
  raw_dataset(file, "floats", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, {2, 3}, floats);
  const int64_t tokens64[6] = {INT32_MIN, 1, 2, 3, 4, INT32_MAX};
  raw_dataset(file, "tokens64", H5T_STD_I64LE, H5T_NATIVE_INT64, {3, 2}, tokens64);
  const int64_t big64[4] = {1, 2, 3, int64_t{INT32_MAX} + 1};
  raw_dataset(file, "big64", H5T_STD_I64LE, H5T_NATIVE_INT64, {2, 2}, big64);
  const uint16_t tokens16[6] = {0, 1, 65535, 3, 4, 5};
  raw_dataset(file, "tokens16", H5T_STD_U16LE, H5T_NATIVE_UINT16, {2, 3}, tokens16);
  const int32_t vector[4] = {1, 2, 3, 4};
  raw_dataset(file, "vector", H5T_STD_I32LE, H5T_NATIVE_INT32, {4}, vector);

  const hid_t scalar = H5Screate(H5S_SCALAR);
  const auto attr = [&](const char* name, hid_t file_type, hid_t mem_type, const void* value,
                        hid_t space) {
    const hid_t a = H5Acreate2(file, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT);
    ASSERT_GE(a, 0) << name;
    ASSERT_GE(H5Awrite(a, mem_type, value), 0) << name;
    H5Aclose(a);
  };
  const hid_t fixed = H5Tcopy(H5T_C_S1);
  H5Tset_size(fixed, 16);
  H5Tset_strpad(fixed, H5T_STR_NULLPAD);
  const char fixed_value[16] = "fixed value";
  attr("fixed", fixed, fixed, fixed_value, scalar);
  const hid_t spaced = H5Tcopy(H5T_C_S1);
  H5Tset_size(spaced, 8);
  H5Tset_strpad(spaced, H5T_STR_SPACEPAD);
  attr("spaced", spaced, spaced, "abc     ", scalar);
  const uint64_t huge = uint64_t{1} << 63;
  attr("huge", H5T_STD_U64LE, H5T_NATIVE_UINT64, &huge, scalar);
  const uint16_t small = 65535;
  attr("small", H5T_STD_U16LE, H5T_NATIVE_UINT16, &small, scalar);
  const double ratio = 0.25;
  attr("ratio", H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &ratio, scalar);
  const hsize_t three = 3;
  const hid_t list_space = H5Screate_simple(1, &three, nullptr);
  const int64_t list[3] = {1, 2, 3};
  attr("list", H5T_STD_I64LE, H5T_NATIVE_INT64, list, list_space);
  H5Sclose(list_space);
  H5Tclose(fixed);
  H5Tclose(spaced);
  H5Sclose(scalar);
  H5Fclose(file);
}

// ---- bytes ----

TEST(H5FileBytes, RoundTripOddSizes) {
  TempDir dir;
  const std::string path = dir.file("bytes.h5");
  const std::vector<size_t> sizes = {0, 1, 2, 3, 5, 7, 11, 13, 64, 1000, 4097, 65537};
  {
    H5File file = H5File::create(path);
    for (size_t i = 0; i < sizes.size(); ++i) {
      const auto bytes = bytes_pattern(sizes[i], static_cast<uint8_t>(i));
      file.write_bytes("units/block." + std::to_string(i), bytes.data(), bytes.size());
    }
    file.write_bytes("/top", "xyz", 3);
    file.write_bytes("a/b/c/d", "q", 1);
    file.close();
  }
  const H5File file = H5File::open_read(path);
  for (size_t i = 0; i < sizes.size(); ++i) {
    const std::string name = "units/block." + std::to_string(i);
    const auto expected = bytes_pattern(sizes[i], static_cast<uint8_t>(i));
    ASSERT_TRUE(file.has(name)) << name;
    ASSERT_EQ(file.nbytes(name), sizes[i]) << name;
    EXPECT_EQ(file.shape(name), std::vector<int64_t>{static_cast<int64_t>(sizes[i])}) << name;
    std::vector<uint8_t> got(sizes[i] + 2, kSentinel);
    file.read_bytes(name, 0, sizes[i], got.data() + 1);
    EXPECT_EQ(std::vector<uint8_t>(got.begin() + 1, got.end() - 1), expected) << name;
    EXPECT_EQ(got.front(), kSentinel) << name;
    EXPECT_EQ(got.back(), kSentinel) << name;
  }
  char top[3];
  file.read_bytes("top", 0, 3, top);
  EXPECT_EQ(std::string(top, 3), "xyz");
  EXPECT_TRUE(file.has("/a/b/c/d"));
  EXPECT_FALSE(file.has("a/b/c"));  // a group, not a dataset
  EXPECT_FALSE(file.has("a/b/x"));
  EXPECT_FALSE(file.has("nothing/at/all"));
  EXPECT_FALSE(file.has("a/b/c/d/e"));  // below a dataset
}

TEST(H5FileBytes, HyperslabAtEveryOffset) {
  TempDir dir;
  const std::string path = dir.file("slab.h5");
  const size_t size = 37;
  const auto bytes = bytes_pattern(size, 5);
  {
    H5File file = H5File::create(path);
    file.write_bytes("units/block.3", bytes.data(), size);
  }
  const H5File file = H5File::open_read(path);
  size_t expected_read = 0;
  for (size_t offset = 0; offset <= size; ++offset) {
    for (size_t nbytes = 0; offset + nbytes <= size; ++nbytes) {
      std::vector<uint8_t> got(nbytes + 2, kSentinel);
      file.read_bytes("units/block.3", offset, nbytes, got.data() + 1);
      for (size_t i = 0; i < nbytes; ++i)
        ASSERT_EQ(got[1 + i], bytes[offset + i])
            << "offset " << offset << " nbytes " << nbytes << " byte " << i;
      ASSERT_EQ(got.front(), kSentinel) << "offset " << offset << " nbytes " << nbytes;
      ASSERT_EQ(got.back(), kSentinel) << "offset " << offset << " nbytes " << nbytes;
      expected_read += nbytes;
    }
  }
  EXPECT_EQ(file.bytes_read(), expected_read);
}

TEST(H5FileBytes, BytesReadCountsPayloadOfSuccessfulReads) {
  TempDir dir;
  const std::string path = dir.file("count.h5");
  const auto bytes = bytes_pattern(100, 1);
  const auto tokens = int32_pattern(5, 3, 2);
  {
    H5File file = H5File::create(path);
    file.write_bytes("b", bytes.data(), bytes.size());
    file.write_int32_2d("t", tokens.data(), 5, 3);
    EXPECT_EQ(file.bytes_read(), 0u);  // writes are not reads
  }
  H5File file = H5File::open_read(path);
  EXPECT_EQ(file.bytes_read(), 0u);
  std::vector<uint8_t> out(100);
  file.read_bytes("b", 10, 7, out.data());
  EXPECT_EQ(file.bytes_read(), 7u);
  EXPECT_EQ(file.nbytes("b"), 100u);  // metadata is not payload
  EXPECT_EQ(file.bytes_read(), 7u);
  std::vector<int32_t> rows(15);
  file.read_int32_rows("t", 1, 2, rows.data());
  EXPECT_EQ(file.bytes_read(), 7u + 2 * 3 * sizeof(int32_t));
  invalid_argument_message([&] { file.read_bytes("b", 95, 6, out.data()); });
  EXPECT_EQ(file.bytes_read(), 7u + 24u);  // a failed read adds nothing
  H5File moved = std::move(file);
  EXPECT_EQ(moved.bytes_read(), 31u);
}

// ---- int32 2-D ----

TEST(H5FileInt32, RowReadsOddShapes) {
  TempDir dir;
  const std::string path = dir.file("tokens.h5");
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{1, 1},  {3, 5}, {7, 11}, {13, 1},
                                                           {5, 13}, {0, 4}, {4, 0}};
  {
    H5File file = H5File::create(path);
    for (size_t s = 0; s < shapes.size(); ++s) {
      const auto [rows, cols] = shapes[s];
      const auto values = int32_pattern(rows, cols, static_cast<uint32_t>(s));
      file.write_int32_2d("data/tokens_" + std::to_string(s), values.data(), rows, cols);
    }
  }
  const H5File file = H5File::open_read(path);
  for (size_t s = 0; s < shapes.size(); ++s) {
    const auto [rows, cols] = shapes[s];
    const std::string name = "data/tokens_" + std::to_string(s);
    const auto values = int32_pattern(rows, cols, static_cast<uint32_t>(s));
    ASSERT_EQ(file.shape(name), (std::vector<int64_t>{rows, cols})) << name;
    for (int64_t row0 = 0; row0 <= rows; ++row0) {
      for (int64_t nrows = 0; row0 + nrows <= rows; ++nrows) {
        std::vector<int32_t> got(static_cast<size_t>(nrows * cols) + 2, kSentinel32);
        file.read_int32_rows(name, row0, nrows, got.data() + 1);
        for (int64_t i = 0; i < nrows * cols; ++i)
          ASSERT_EQ(got[1 + i], values[row0 * cols + i])
              << name << " row0 " << row0 << " nrows " << nrows << " element " << i;
        ASSERT_EQ(got.front(), kSentinel32) << name << " row0 " << row0 << " nrows " << nrows;
        ASSERT_EQ(got.back(), kSentinel32) << name << " row0 " << row0 << " nrows " << nrows;
      }
    }
  }
}

TEST(H5FileInt32, OtherIntegerTypesConvertAndOutOfRangeFails) {
  TempDir dir;
  const std::string path = dir.file("raw.h5");
  write_raw_file(path);
  const H5File file = H5File::open_read(path);
  std::vector<int32_t> got(6, kSentinel32);
  file.read_int32_rows("tokens64", 0, 3, got.data());
  EXPECT_EQ(got, (std::vector<int32_t>{INT32_MIN, 1, 2, 3, 4, INT32_MAX}));
  file.read_int32_rows("tokens16", 0, 2, got.data());
  EXPECT_EQ(got, (std::vector<int32_t>{0, 1, 65535, 3, 4, 5}));
  file.read_int32_rows("big64", 0, 1, got.data());  // the first row fits
  EXPECT_EQ(got[0], 1);
  EXPECT_EQ(got[1], 2);
  const std::string message =
      runtime_error_message([&] { file.read_int32_rows("big64", 0, 2, got.data()); });
  expect_message(message, path, {"'big64'", "int64", "int32 range", "rows [0, 2)"});
}

// ---- attributes ----

TEST(H5FileAttrs, StringAndInt64OnRootAndDataset) {
  TempDir dir;
  const std::string path = dir.file("attrs.h5");
  const std::string json = long_json();
  ASSERT_GT(json.size(), 100000u);
  {
    H5File file = H5File::create(path);
    file.write_bytes("units/block.0", "ab", 2);
    file.set_attr_string("/", "config", json);
    file.set_attr_string("/", "empty", "");
    file.set_attr_string("/", "replaced", "first");
    file.set_attr_string("/", "replaced", "second, longer");
    file.set_attr_int64("/", "step", 42);
    file.set_attr_int64("/", "min", INT64_MIN);
    file.set_attr_int64("/", "max", INT64_MAX);
    file.set_attr_string("units/block.0", "kind", "nf4");
    file.set_attr_int64("units/block.0", "numel", -7);
    file.set_attr_int64("units", "count", 1);  // a group
    file.set_attr_int64("units/block.0", "kind_then_int", 1);
    file.set_attr_string("units/block.0", "kind_then_int", "replaced by a string");
    EXPECT_EQ(file.attr_string("/", "config"), json);  // readable before closing
  }
  const H5File file = H5File::open_read(path);
  EXPECT_EQ(file.attr_string("/", "config"), json);
  EXPECT_EQ(file.attr_string("/", "empty"), "");
  EXPECT_EQ(file.attr_string("/", "replaced"), "second, longer");
  EXPECT_EQ(file.attr_int64("/", "step"), 42);
  EXPECT_EQ(file.attr_int64("/", "min"), INT64_MIN);
  EXPECT_EQ(file.attr_int64("/", "max"), INT64_MAX);
  EXPECT_EQ(file.attr_string("units/block.0", "kind"), "nf4");
  EXPECT_EQ(file.attr_string("/units/block.0", "kind"), "nf4");
  EXPECT_EQ(file.attr_int64("units/block.0", "numel"), -7);
  EXPECT_EQ(file.attr_int64("units", "count"), 1);
  EXPECT_EQ(file.attr_string("units/block.0", "kind_then_int"), "replaced by a string");
  EXPECT_TRUE(file.has_attr("/", "config"));
  EXPECT_TRUE(file.has_attr("units/block.0", "kind"));
  EXPECT_FALSE(file.has_attr("/", "kind"));
  EXPECT_FALSE(file.has_attr("units/block.0", "config"));
}

TEST(H5FileAttrs, OtherStoredTypes) {
  TempDir dir;
  const std::string path = dir.file("raw.h5");
  write_raw_file(path);
  const H5File file = H5File::open_read(path);
  EXPECT_EQ(file.attr_string("/", "fixed"), "fixed value");
  EXPECT_EQ(file.attr_string("/", "spaced"), "abc");
  EXPECT_EQ(file.attr_int64("/", "small"), 65535);
  expect_message(runtime_error_message([&] { file.attr_int64("/", "huge"); }), path,
                 {"'/'", "'huge'", "9223372036854775808", "int64"});
  expect_message(runtime_error_message([&] { file.attr_int64("/", "ratio"); }), path,
                 {"'ratio'", "float64", "expected an integer"});
  expect_message(runtime_error_message([&] { file.attr_string("/", "small"); }), path,
                 {"'small'", "uint16", "expected a string"});
  expect_message(runtime_error_message([&] { file.attr_int64("/", "list"); }), path,
                 {"'list'", "[3]", "single value"});
}

TEST(H5FileAttrs, MissingAttributeAndObject) {
  TempDir dir;
  const std::string path = dir.file("attrs.h5");
  {
    H5File file = H5File::create(path);
    file.write_bytes("units/block.0", "ab", 2);
    file.set_attr_string("/", "config", "{}");
    file.set_attr_int64("/", "step", 3);
    EXPECT_TRUE(contains(
        invalid_argument_message([&] { file.set_attr_string("/", "bad", std::string("a\0b", 3)); }),
        "NUL"));
    expect_message(runtime_error_message([&] { file.set_attr_int64("units/block.9", "x", 1); }),
                   path, {"'units/block.9'", "block.0"});
  }
  const H5File file = H5File::open_read(path);
  expect_message(runtime_error_message([&] { file.attr_string("/", "missing"); }), path,
                 {"'/'", "'missing'"});
  expect_message(runtime_error_message([&] { file.attr_int64("units/block.0", "step"); }), path,
                 {"'units/block.0'", "'step'"});
  expect_message(runtime_error_message([&] { file.attr_int64("/", "config"); }), path,
                 {"'config'", "string", "expected an integer"});
  expect_message(runtime_error_message([&] { file.attr_string("/", "step"); }), path,
                 {"'step'", "int64", "expected a string"});
  expect_message(runtime_error_message([&] { file.has_attr("no/such", "x"); }), path,
                 {"'no/such'"});
}

// ---- errors ----

TEST(H5FileErrors, MissingFile) {
  TempDir dir;
  const std::string path = dir.file("absent.h5");
  expect_message(runtime_error_message([&] { H5File::open_read(path); }), path, {"no such file"});
  const std::string in_missing_dir = dir.file("no_dir/out.h5");
  expect_message(runtime_error_message([&] { H5File::create(in_missing_dir); }), in_missing_dir,
                 {"cannot create"});
  expect_message(runtime_error_message([&] { H5File::open_read(dir.path()); }), dir.path(),
                 {"directory"});
}

TEST(H5FileErrors, NotAnHdf5File) {
  TempDir dir;
  std::mt19937 rng(7);
  std::string random(4096, '\0');
  for (char& c : random) c = static_cast<char>(rng());
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"random.h5", random},
      {"empty.h5", ""},
      {"text.h5", "{\"not\": \"hdf5\"}\n"},
      {"safetensors.h5", std::string(8, '\0') + "{}"}};
  for (const auto& [name, bytes] : cases) {
    const std::string path = dir.file(name);
    file_write(path, bytes);
    expect_message(runtime_error_message([&] { H5File::open_read(path); }), path,
                   {"not an HDF5 file"});
  }
}

TEST(H5FileErrors, TruncatedFile) {
  TempDir dir;
  const std::string path = dir.file("whole.h5");
  {
    H5File file = H5File::create(path);
    const auto bytes = bytes_pattern(65536, 3);
    file.write_bytes("units/block.0", bytes.data(), bytes.size());
    file.write_bytes("units/block.1", bytes.data(), bytes.size());
    file.set_attr_string("/", "config", long_json());
  }
  const std::string whole = testing::file_read(path);
  ASSERT_GT(whole.size(), 131072u);
  for (const size_t cut : {whole.size() / 2, whole.size() - 1, size_t{100}, size_t{8}}) {
    const std::string cut_path = dir.file("cut_" + std::to_string(cut) + ".h5");
    file_write(cut_path, whole.substr(0, cut));
    const std::string message = runtime_error_message([&] { H5File::open_read(cut_path); });
    expect_message(message, cut_path, {});
    EXPECT_TRUE(contains(message, "truncated")) << "cut at " << cut << ": " << message;
  }
}

TEST(H5FileErrors, MissingDataset) {
  TempDir dir;
  const std::string path = dir.file("m.h5");
  {
    H5File file = H5File::create(path);
    for (int i = 0; i < 12; ++i) file.write_bytes("units/block." + std::to_string(i), "a", 1);
  }
  const H5File file = H5File::open_read(path);
  char out[1];
  std::vector<int32_t> rows(1);
  expect_message(runtime_error_message([&] { file.read_bytes("units/block.99", 0, 1, out); }), path,
                 {"no dataset 'units/block.99'", "'/units'", "block.0", "4 more"});
  expect_message(runtime_error_message([&] { file.nbytes("nope/block.0"); }), path,
                 {"'nope/block.0'", "'/' holds units"});
  expect_message(runtime_error_message([&] { file.shape("units"); }), path,
                 {"'units'", "group, not a dataset"});
  expect_message(runtime_error_message([&] { file.read_int32_rows("tokens", 0, 1, rows.data()); }),
                 path, {"'tokens'"});
  EXPECT_TRUE(contains(invalid_argument_message([&] { file.nbytes(""); }), "empty dataset name"));
}

TEST(H5FileErrors, ReadBeyondEnd) {
  TempDir dir;
  const std::string path = dir.file("end.h5");
  const auto tokens = int32_pattern(4, 3, 1);
  {
    H5File file = H5File::create(path);
    file.write_bytes("units/block.3", "0123456789", 10);
    file.write_int32_2d("tokens", tokens.data(), 4, 3);
  }
  const H5File file = H5File::open_read(path);
  std::vector<uint8_t> out(32, kSentinel);
  for (const auto& [offset, nbytes] : std::vector<std::pair<size_t, size_t>>{
           {0, 11}, {10, 1}, {11, 0}, {5, SIZE_MAX}, {SIZE_MAX, 2}}) {
    const std::string message = invalid_argument_message(
        [&] { file.read_bytes("units/block.3", offset, nbytes, out.data()); });
    expect_message(message, path,
                   {"'units/block.3'", "[" + std::to_string(offset) + ", ", "size 10 bytes"});
  }
  EXPECT_EQ(out, std::vector<uint8_t>(32, kSentinel));
  std::vector<int32_t> rows(32, kSentinel32);
  for (const auto& [row0, nrows] :
       std::vector<std::pair<int64_t, int64_t>>{{0, 5}, {4, 1}, {5, 0}, {3, INT64_MAX}}) {
    const std::string message =
        invalid_argument_message([&] { file.read_int32_rows("tokens", row0, nrows, rows.data()); });
    expect_message(message, path, {"'tokens'", "rows [" + std::to_string(row0), "[4, 3]"});
  }
  expect_message(
      invalid_argument_message([&] { file.read_int32_rows("tokens", -1, 1, rows.data()); }), path,
      {"'tokens'", "negative"});
  EXPECT_EQ(rows, std::vector<int32_t>(32, kSentinel32));
  EXPECT_EQ(file.bytes_read(), 0u);
}

TEST(H5FileErrors, WrongDatasetType) {
  TempDir dir;
  const std::string path = dir.file("types.h5");
  const auto tokens = int32_pattern(2, 3, 1);
  {
    H5File file = H5File::create(path);
    file.write_bytes("units/block.0", "abc", 3);
    file.write_int32_2d("tokens", tokens.data(), 2, 3);
  }
  {
    const H5File file = H5File::open_read(path);
    char out[3];
    std::vector<int32_t> rows(6);
    expect_message(runtime_error_message([&] { file.read_bytes("tokens", 0, 1, out); }), path,
                   {"'tokens'", "int32 [2, 3]", "expected a 1-D uint8 dataset"});
    expect_message(runtime_error_message([&] { file.nbytes("tokens"); }), path,
                   {"'tokens'", "expected a 1-D uint8 dataset"});
    expect_message(
        runtime_error_message([&] { file.read_int32_rows("units/block.0", 0, 1, rows.data()); }),
        path, {"'units/block.0'", "uint8 [3]", "expected 2-D integer"});
  }
  const std::string raw_path = dir.file("raw.h5");
  write_raw_file(raw_path);
  const H5File file = H5File::open_read(raw_path);
  std::vector<int32_t> rows(6, kSentinel32);
  expect_message(runtime_error_message([&] { file.read_int32_rows("floats", 0, 1, rows.data()); }),
                 raw_path, {"'floats'", "float32 [2, 3]", "expected 2-D integer token ids"});
  expect_message(runtime_error_message([&] { file.read_int32_rows("vector", 0, 1, rows.data()); }),
                 raw_path, {"'vector'", "int32 [4]", "expected 2-D"});
  EXPECT_EQ(rows, std::vector<int32_t>(6, kSentinel32));
  expect_message(runtime_error_message([&] { file.nbytes("floats"); }), raw_path,
                 {"'floats'", "float32", "1-D uint8"});
}

TEST(H5FileErrors, WritingMistakes) {
  TempDir dir;
  const std::string path = dir.file("w.h5");
  {
    H5File file = H5File::create(path);
    file.write_bytes("units/block.0", "a", 1);
    expect_message(invalid_argument_message([&] { file.write_bytes("units/block.0", "b", 1); }),
                   path, {"'units/block.0'", "already exists"});
    expect_message(invalid_argument_message([&] { file.write_bytes("units", "b", 1); }), path,
                   {"'units'", "already exists"});
    expect_message(invalid_argument_message([&] { file.write_bytes("x", nullptr, 4); }), path,
                   {"'x'", "null"});
    expect_message(invalid_argument_message([&] { file.write_int32_2d("t", nullptr, -1, 2); }),
                   path, {"'t'", "negative"});
    expect_message(runtime_error_message([&] { file.write_bytes("units/block.0/child", "b", 1); }),
                   path, {"'units/block.0/child'", "cannot create"});
    file.write_bytes("empty", nullptr, 0);
    file.write_int32_2d("no_rows", nullptr, 0, 5);
    file.close();
    file.close();  // a second close does nothing
    expect_message(invalid_argument_message([&] { file.write_bytes("late", "a", 1); }), path,
                   {"closed", "'late'"});
  }
  H5File file = H5File::open_read(path);
  EXPECT_EQ(file.nbytes("empty"), 0u);
  EXPECT_EQ(file.shape("no_rows"), (std::vector<int64_t>{0, 5}));
  expect_message(invalid_argument_message([&] { file.write_bytes("new", "a", 1); }), path,
                 {"read-only", "'new'"});
  expect_message(invalid_argument_message([&] { file.set_attr_int64("/", "step", 1); }), path,
                 {"read-only"});
  EXPECT_FALSE(file.has_attr("/", "step"));
}

TEST(H5File, MoveAndCreateTruncates) {
  TempDir dir;
  const std::string path = dir.file("move.h5");
  {
    H5File file = H5File::create(path);
    file.write_bytes("old", "a", 1);
  }
  {
    H5File a = H5File::create(path);  // truncates: "old" is gone
    H5File b = std::move(a);
    EXPECT_EQ(b.path(), path);
    b.write_bytes("new", "b", 1);
    H5File c = H5File::create(dir.file("other.h5"));
    c = std::move(b);  // closes other.h5
    EXPECT_EQ(c.path(), path);
  }
  const H5File file = H5File::open_read(path);
  EXPECT_FALSE(file.has("old"));
  EXPECT_TRUE(file.has("new"));
  EXPECT_TRUE(H5File::open_read(dir.file("other.h5")).path() == dir.file("other.h5"));
}

TEST(H5File, ManyReadersOfOneFile) {
  // Each MPI rank opens the file on its own; here several handles in one process stand in.
  TempDir dir;
  const std::string path = dir.file("shared.h5");
  const auto bytes = bytes_pattern(1000, 9);
  {
    H5File file = H5File::create(path);
    file.write_bytes("units/block.0", bytes.data(), bytes.size());
  }
  std::vector<H5File> readers;
  for (int r = 0; r < 4; ++r) readers.push_back(H5File::open_read(path));
  for (int r = 0; r < 4; ++r) {
    std::vector<uint8_t> got(250);
    readers[r].read_bytes("units/block.0", 250 * r, 250, got.data());
    EXPECT_EQ(got, std::vector<uint8_t>(bytes.begin() + 250 * r, bytes.begin() + 250 * (r + 1)))
        << "reader " << r;
    EXPECT_EQ(readers[r].bytes_read(), 250u) << "reader " << r;
  }
}

}  // namespace
}  // namespace qlora::io
