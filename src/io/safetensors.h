// safetensors: memory-mapped reading with a validated header, and writing.
// File layout: u64 little-endian header length N, N bytes of JSON
//   {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}
// then the data section; offsets are relative to the data section's start.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace qlora::io {

// A file a user handed us is wrong: the message names the file and what is wrong.
class FormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// safetensors dtypes we read and write (names as the format spells them).
// F8_E8M0: OCP E8M0 scale bytes (torch.float8_e8m0fnu); the FNUZ kinds are read so that a loader
// can refuse them by name.
enum class DType {
  BOOL, U8, I8, I16, U16, I32, U32, I64, U64, F16, BF16, F32, F64,
  F8_E4M3, F8_E5M2, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ
};
size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);            // "F32", "BF16", ...
DType dtype_from_name(const std::string& name);  // throws FormatError on an unknown name

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  size_t offset = 0;  // byte offset into the data section
  size_t nbytes = 0;
  int64_t numel() const;
};

// Read-only, memory-mapped. Every header is validated before any tensor is exposed: header
// length within the file and below a sane cap, JSON well formed, dtype known, shape entries
// non-negative and their product without overflow, nbytes == numel * dtype_size, data_offsets
// inside the data section, no two tensors overlapping. Nothing is allocated in proportion to
// a size the header claims.
class SafetensorsFile {
 public:
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // in header order
  const TensorInfo* find(const std::string& name) const;               // nullptr if absent
  const TensorInfo& at(const std::string& name) const;                 // throws FormatError
  const uint8_t* data(const TensorInfo& info) const;                   // into the mapping
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  size_t data_begin_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// Collects tensors (copies of their bytes) and writes one file: header entries and data ordered as the reference writer orders it (widest dtype first, then by name) so
// every tensor is aligned to its element size. Duplicate names are an error.
class SafetensorsWriter {
 public:
  void add(const std::string& name, DType dtype, const std::vector<int64_t>& shape,
           const void* data, size_t nbytes);
  void set_metadata(const std::string& key, const std::string& value);
  void write(const std::string& path) const;  // throws std::runtime_error on I/O failure
  size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    TensorInfo info;
    std::vector<uint8_t> bytes;
  };
  std::vector<Entry> entries_;
  std::map<std::string, size_t> index_;  // name -> entries_ index, for the duplicate check
  std::map<std::string, std::string> metadata_;
};

// The weights of a Hugging Face model directory: model.safetensors, or the shards listed in
// model.safetensors.index.json ("weight_map": name -> file). A tensor name maps to one file.
class ModelWeights {
 public:
  static ModelWeights open_dir(const std::string& dir);  // throws FormatError naming what is missing
  std::vector<std::string> names() const;                // sorted, as stored (no aliases)
  bool contains(const std::string& name) const;
  const TensorInfo& info(const std::string& name) const;  // throws FormatError naming the tensor
  const uint8_t* data(const std::string& name) const;
  // Makes `alias` another name of stored tensor `name` for contains / info / data (a model whose
  // decoder is stored under a prefix, read by the names the loader uses). info().name stays the
  // stored name. Throws std::invalid_argument if `name` is not stored or `alias` already is.
  void alias(const std::string& alias, const std::string& name);
  const std::vector<std::shared_ptr<SafetensorsFile>>& files() const { return files_; }

 private:
  std::string dir_;  // named in errors
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;  // name -> index into files_
  std::map<std::string, std::string> aliases_;  // alias -> stored name
  const std::string& resolve(const std::string& name) const;
};

}  // namespace qlora::io
