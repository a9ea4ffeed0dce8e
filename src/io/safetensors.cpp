// safetensors reading (mmap + a header validated before any tensor is exposed), writing
// (temp file + rename), and Hugging Face model directories (single file or sharded index).
// A tensor's bytes are data section [begin, end) with end - begin == prod(shape) * dtype_size.
#include "io/safetensors.h"
#include "io/shape_str.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>

namespace qlora::io {
namespace {

using json = nlohmann::json;

// Python safetensors refuses headers above 100 MB; a real header (tens of thousands of
// tensors) is a few MiB, so this only stops a corrupt length from driving the parser.
constexpr size_t kMaxHeaderBytes = size_t{100} << 20;
// Index files list names only; anything this large is not an index.
constexpr size_t kMaxIndexBytes = size_t{100} << 20;
constexpr const char* kMetadataKey = "__metadata__";

struct DTypeTraits {
  DType dtype;
  const char* name;
  size_t size;
};

// The one table of dtype names and sizes, in enum order.
constexpr DTypeTraits kDTypeTraits[] = {
    {DType::BOOL, "BOOL", 1}, {DType::U8, "U8", 1},           {DType::I8, "I8", 1},
    {DType::I16, "I16", 2},   {DType::U16, "U16", 2},         {DType::I32, "I32", 4},
    {DType::U32, "U32", 4},   {DType::I64, "I64", 8},         {DType::U64, "U64", 8},
    {DType::F16, "F16", 2},   {DType::BF16, "BF16", 2},       {DType::F32, "F32", 4},
    {DType::F64, "F64", 8},   {DType::F8_E4M3, "F8_E4M3", 1}, {DType::F8_E5M2, "F8_E5M2", 1},
    {DType::F8_E8M0, "F8_E8M0", 1}, {DType::F8_E4M3FNUZ, "F8_E4M3FNUZ", 1},
    {DType::F8_E5M2FNUZ, "F8_E5M2FNUZ", 1},
};

const DTypeTraits& dtype_traits(DType dtype) {
  for (const DTypeTraits& traits : kDTypeTraits) {
    if (traits.dtype == dtype) return traits;
  }
  throw std::invalid_argument("qlora::io: unknown DType value " +
                              std::to_string(static_cast<int>(dtype)));
}

const DTypeTraits* dtype_traits_find(const std::string& name) {
  for (const DTypeTraits& traits : kDTypeTraits) {
    if (name == traits.name) return &traits;
  }
  return nullptr;
}

std::string dtype_names_list() {
  std::string names;
  for (const DTypeTraits& traits : kDTypeTraits) {
    if (!names.empty()) names += ", ";
    names += traits.name;
  }
  return names;
}

[[noreturn]] void format_error_throw(const std::string& path, const std::string& what,
                                     const std::string& expected) {
  throw FormatError(path + ": " + what + " (" + expected + ")");
}

// Hostile headers can hold megabyte-long strings or deeply nested values; messages quote
// at most a short prefix, and never dump a container (dump() recurses).
std::string text_clip(const std::string& text, size_t max_chars = 80) {
  if (text.size() <= max_chars) return text;
  return text.substr(0, max_chars) + "...";
}

std::string json_describe(const json& value) {
  constexpr size_t kMaxItems = 8;
  switch (value.type()) {
    case json::value_t::object:
      return "an object";
    case json::value_t::array: {
      // Short arrays of scalars are quoted whole, so "[-4, 0]" shows what is wrong.
      bool scalars = value.size() <= kMaxItems;
      for (size_t i = 0; scalars && i < value.size(); ++i) {
        scalars = !value[i].is_structured();
      }
      if (!scalars) return "an array of " + std::to_string(value.size());
      std::string text = "[";
      for (size_t i = 0; i < value.size(); ++i) {
        text += (i > 0 ? ", " : "") + json_describe(value[i]);
      }
      return text + "]";
    }
    case json::value_t::string:
      return "\"" + text_clip(value.get_ref<const std::string&>()) + "\"";
    case json::value_t::discarded:
      return "nothing";
    default:
      return value.dump();  // null, boolean, number: short by construction
  }
}

std::string name_quote(const std::string& name) { return "'" + text_clip(name, 200) + "'"; }


std::string offsets_to_string(uint64_t begin, uint64_t end) {
  return "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
}

std::string errno_text() { return std::strerror(errno); }

bool file_is_regular(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string path_join(const std::string& dir, const std::string& name) {
  if (dir.empty() || dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

uint64_t u64_load_le(const uint8_t* bytes) {
  uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | bytes[i];
  return value;
}

void u64_store_le(uint64_t value, uint8_t* bytes) {
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<uint8_t>(value >> (8 * i));
}

// prod(shape), or false when a dimension is negative or the product leaves int64.
bool shape_numel(const std::vector<int64_t>& shape, int64_t* numel) {
  int64_t product = 1;
  for (int64_t dim : shape) {
    if (dim < 0 || __builtin_mul_overflow(product, dim, &product)) return false;
  }
  *numel = product;
  return true;
}

// The top-level keys of a JSON object in file order, from a SAX pass that builds nothing.
struct TopLevelKeys : json::json_sax_t {
  std::vector<std::string>* keys;
  std::string* duplicate;
  std::set<std::string> seen;
  int depth = 0;
  TopLevelKeys(std::vector<std::string>* k, std::string* d) : keys(k), duplicate(d) {}
  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override { return ++depth, true; }
  bool end_object() override { return --depth, true; }
  bool start_array(std::size_t) override { return ++depth, true; }
  bool end_array() override { return --depth, true; }
  bool key(string_t& key) override {
    if (depth == 1) {
      if (!seen.insert(key).second && duplicate->empty()) *duplicate = key;
      keys->push_back(key);
    }
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override {
    return false;
  }
};

// Parses JSON text; also reports the top-level keys in file order (nlohmann::json sorts them,
// ordered_json looks keys up linearly, which is quadratic on a large hostile header) and
// whether a top-level key appears twice (the parser would keep only the last one). Not
// nlohmann's callback parser: it rescans the parent object at the end of every child, which
// is quadratic too (a 1,000,000-tensor header took minutes).
json json_parse_keys(const char* text, size_t nbytes, std::vector<std::string>* keys,
                     std::string* duplicate) {
  json parsed = json::parse(text, text + nbytes);  // throws json::parse_error on bad JSON
  TopLevelKeys sax(keys, duplicate);
  json::sax_parse(text, text + nbytes, &sax);
  return parsed;
}

// A non-negative JSON integer that fits in uint64, or false.
bool json_to_u64(const json& value, uint64_t* out) {
  if (value.is_number_unsigned()) {
    *out = value.get<uint64_t>();
    return true;
  }
  if (value.is_number_integer() && value.get<int64_t>() >= 0) {
    *out = static_cast<uint64_t>(value.get<int64_t>());
    return true;
  }
  return false;
}

TensorInfo tensor_info_parse(const std::string& path, const std::string& name, const json& entry,
                             size_t data_nbytes) {
  const std::string tensor = "tensor " + name_quote(name);
  if (!entry.is_object()) {
    format_error_throw(path, tensor + " entry is " + json_describe(entry),
                       "expected an object with dtype, shape and data_offsets");
  }
  TensorInfo info;
  info.name = name;

  const auto dtype_it = entry.find("dtype");
  if (dtype_it == entry.end() || !dtype_it->is_string()) {
    format_error_throw(
        path,
        tensor + " dtype is " + (dtype_it == entry.end() ? "missing" : json_describe(*dtype_it)),
        "expected a dtype name: " + dtype_names_list());
  }
  const DTypeTraits* traits = dtype_traits_find(dtype_it->get_ref<const std::string&>());
  if (traits == nullptr) {
    format_error_throw(path, tensor + " has unknown dtype " + json_describe(*dtype_it),
                       "expected one of " + dtype_names_list());
  }
  info.dtype = traits->dtype;

  const auto shape_it = entry.find("shape");
  if (shape_it == entry.end() || !shape_it->is_array()) {
    format_error_throw(
        path,
        tensor + " shape is " + (shape_it == entry.end() ? "missing" : json_describe(*shape_it)),
        "expected an array of non-negative integers");
  }
  info.shape.reserve(shape_it->size());  // bounded by the header size, already validated
  for (const json& dim : *shape_it) {
    uint64_t value = 0;
    if (!json_to_u64(dim, &value) || value > uint64_t(std::numeric_limits<int64_t>::max())) {
      format_error_throw(path, tensor + " shape has entry " + json_describe(dim),
                         "expected non-negative integers");
    }
    info.shape.push_back(static_cast<int64_t>(value));
  }
  int64_t numel = 0;
  size_t expected_nbytes = 0;
  if (!shape_numel(info.shape, &numel) ||
      __builtin_mul_overflow(static_cast<size_t>(numel), traits->size, &expected_nbytes)) {
    format_error_throw(
        path,
        tensor + " shape " + shape_str(info.shape) + " has more elements than fit in 64 bits",
        "expected a shape whose byte size fits in the file");
  }

  const auto offsets_it = entry.find("data_offsets");
  uint64_t begin = 0;
  uint64_t end = 0;
  if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2 ||
      !json_to_u64((*offsets_it)[0], &begin) || !json_to_u64((*offsets_it)[1], &end)) {
    format_error_throw(path,
                       tensor + " data_offsets is " +
                           (offsets_it == entry.end() ? "missing" : json_describe(*offsets_it)),
                       "expected [begin, end] with non-negative integers");
  }
  if (begin > end) {
    format_error_throw(
        path, tensor + " data_offsets " + offsets_to_string(begin, end) + " have begin after end",
        "expected begin <= end");
  }
  if (end > data_nbytes) {
    format_error_throw(
        path,
        tensor + " data_offsets " + offsets_to_string(begin, end) + " end beyond the data section",
        "expected end <= " + std::to_string(data_nbytes) + ", the data section's size");
  }
  if (end - begin != expected_nbytes) {
    format_error_throw(path,
                       tensor + " data_offsets " + offsets_to_string(begin, end) +
                           " do not match dtype " + traits->name + " shape " +
                           shape_str(info.shape),
                       "expected " + std::to_string(expected_nbytes) + " bytes");
  }
  info.offset = static_cast<size_t>(begin);
  info.nbytes = static_cast<size_t>(end - begin);
  return info;
}

std::map<std::string, std::string> metadata_parse(const std::string& path, const json& value) {
  if (!value.is_object()) {
    format_error_throw(path, std::string(kMetadataKey) + " is " + json_describe(value),
                       "expected an object of string values");
  }
  std::map<std::string, std::string> metadata;
  for (auto it = value.begin(); it != value.end(); ++it) {
    if (!it->is_string()) {
      format_error_throw(
          path,
          std::string(kMetadataKey) + " key " + name_quote(it.key()) + " is " + json_describe(*it),
          "expected a string value");
    }
    metadata.emplace(it.key(), it->get<std::string>());
  }
  return metadata;
}

// Empty tensors occupy no bytes and cannot overlap anything.
void tensors_check_disjoint(const std::string& path, const std::vector<TensorInfo>& tensors) {
  std::vector<const TensorInfo*> sorted;
  for (const TensorInfo& info : tensors) {
    if (info.nbytes > 0) sorted.push_back(&info);
  }
  std::sort(sorted.begin(), sorted.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->offset != b->offset ? a->offset < b->offset : a->nbytes < b->nbytes;
  });
  // Compare against the tensor reaching furthest so far: one long tensor may cover several.
  const TensorInfo* furthest = nullptr;
  for (const TensorInfo* info : sorted) {
    if (furthest != nullptr && info->offset < furthest->offset + furthest->nbytes) {
      format_error_throw(
          path,
          "tensors " + name_quote(furthest->name) + " " +
              offsets_to_string(furthest->offset, furthest->offset + furthest->nbytes) + " and " +
              name_quote(info->name) + " " +
              offsets_to_string(info->offset, info->offset + info->nbytes) + " overlap",
          "expected disjoint data_offsets");
    }
    if (furthest == nullptr || info->offset + info->nbytes > furthest->offset + furthest->nbytes) {
      furthest = info;
    }
  }
}

// Closes a file descriptor on every path out of a function.
class FdGuard {
 public:
  explicit FdGuard(int fd) : fd_(fd) {}
  ~FdGuard() {
    if (fd_ >= 0) ::close(fd_);
  }
  FdGuard(const FdGuard&) = delete;
  FdGuard& operator=(const FdGuard&) = delete;
  int get() const { return fd_; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_;
};

bool fd_write_all(int fd, const void* data, size_t nbytes) {
  const auto* bytes = static_cast<const uint8_t*>(data);
  while (nbytes > 0) {
    ssize_t written = ::write(fd, bytes, nbytes);
    if (written < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    bytes += written;
    nbytes -= static_cast<size_t>(written);
  }
  return true;
}

json json_file_read(const std::string& path, size_t max_nbytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in) format_error_throw(path, "cannot open: " + errno_text(), "expected a readable file");
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  if (size < 0 || static_cast<uint64_t>(size) > max_nbytes) {
    format_error_throw(path, "file size " + std::to_string(size) + " bytes is not plausible",
                       "expected at most " + std::to_string(max_nbytes) + " bytes of JSON");
  }
  in.seekg(0, std::ios::beg);
  std::string text(static_cast<size_t>(size), '\0');
  if (!in.read(text.data(), size)) {
    format_error_throw(path, "cannot read: " + errno_text(), "expected a readable file");
  }
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    format_error_throw(path, "invalid JSON: " + text_clip(e.what(), 200),
                       "expected a well-formed JSON file");
  }
}

}  // namespace

size_t dtype_size(DType dtype) { return dtype_traits(dtype).size; }

const char* dtype_name(DType dtype) { return dtype_traits(dtype).name; }

DType dtype_from_name(const std::string& name) {
  const DTypeTraits* traits = dtype_traits_find(name);
  if (traits == nullptr) {
    throw FormatError("unknown safetensors dtype " + name_quote(name) + " (expected one of " +
                      dtype_names_list() + ")");
  }
  return traits->dtype;
}

int64_t TensorInfo::numel() const {
  int64_t numel = 0;
  if (!shape_numel(shape, &numel)) {
    throw std::overflow_error("tensor " + name_quote(name) + " shape " + shape_str(shape) +
                              " has no valid element count");
  }
  return numel;
}

// ---------------------------------------------------------------------------------------------
// SafetensorsFile

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  FdGuard fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    format_error_throw(path, "cannot open: " + errno_text(),
                       "expected a readable safetensors file");
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) {
    format_error_throw(path, "cannot stat: " + errno_text(),
                       "expected a readable safetensors file");
  }
  if (!S_ISREG(st.st_mode)) {
    format_error_throw(path, "is not a regular file", "expected a safetensors file");
  }
  const size_t file_nbytes = static_cast<size_t>(st.st_size);
  if (file_nbytes < 8) {
    format_error_throw(path, "file is " + std::to_string(file_nbytes) + " bytes",
                       "expected at least 8 bytes: the header length, then the header");
  }

  // Owned by the object from here on, so every error below unmaps it.
  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  void* map = ::mmap(nullptr, file_nbytes, PROT_READ, MAP_PRIVATE, fd.get(), 0);
  if (map == MAP_FAILED) {
    format_error_throw(path, "cannot mmap: " + errno_text(),
                       "expected a readable safetensors file");
  }
  file->map_ = map;
  file->map_size_ = file_nbytes;
  const auto* bytes = static_cast<const uint8_t*>(map);

  const uint64_t header_nbytes = u64_load_le(bytes);
  if (header_nbytes > file_nbytes - 8) {
    format_error_throw(
        path, "header length " + std::to_string(header_nbytes) + " is larger than the file allows",
        "expected at most " + std::to_string(file_nbytes - 8) + " for a " +
            std::to_string(file_nbytes) + "-byte file");
  }
  if (header_nbytes > kMaxHeaderBytes) {
    format_error_throw(path, "header length " + std::to_string(header_nbytes) + " is too large",
                       "expected at most " + std::to_string(kMaxHeaderBytes) + " bytes (100 MiB)");
  }
  file->data_begin_ = 8 + static_cast<size_t>(header_nbytes);
  const size_t data_nbytes = file_nbytes - file->data_begin_;

  // nlohmann's lexer ends the input at a NUL byte and would ignore what follows; JSON text
  // never holds a raw NUL, so one means corruption (or padding the reference reader rejects).
  const char* header_text = reinterpret_cast<const char*>(bytes + 8);
  const void* nul = std::memchr(header_text, '\0', static_cast<size_t>(header_nbytes));
  if (nul != nullptr) {
    format_error_throw(path,
                       "header has a NUL byte at offset " +
                           std::to_string(static_cast<const char*>(nul) - header_text + 8),
                       "expected JSON text padded with spaces");
  }
  std::vector<std::string> keys;  // top-level keys in header order
  std::string duplicate;
  json header;
  try {
    header = json_parse_keys(header_text, static_cast<size_t>(header_nbytes), &keys, &duplicate);
  } catch (const json::exception& e) {
    format_error_throw(path, "header is not valid JSON: " + text_clip(e.what(), 200),
                       "expected a JSON object of tensor entries");
  }
  if (!header.is_object()) {
    format_error_throw(path, "header is " + json_describe(header),
                       "expected a JSON object of tensor entries");
  }
  if (!duplicate.empty()) {
    format_error_throw(path, "header lists " + name_quote(duplicate) + " twice",
                       "expected each tensor name once");
  }

  file->tensors_.reserve(keys.size());
  for (const std::string& key : keys) {
    const json& value = header.at(key);
    if (key == kMetadataKey) {
      file->metadata_ = metadata_parse(path, value);
    } else {
      file->tensors_.push_back(tensor_info_parse(path, key, value, data_nbytes));
    }
  }
  tensors_check_disjoint(path, file->tensors_);
  for (size_t i = 0; i < file->tensors_.size(); ++i) file->index_[file->tensors_[i].name] = i;
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const TensorInfo& SafetensorsFile::at(const std::string& name) const {
  const TensorInfo* info = find(name);
  if (info == nullptr) {
    format_error_throw(
        path_, "no tensor named " + name_quote(name),
        "expected one of the file's " + std::to_string(tensors_.size()) + " tensors");
  }
  return *info;
}

const uint8_t* SafetensorsFile::data(const TensorInfo& info) const {
  return static_cast<const uint8_t*>(map_) + data_begin_ + info.offset;
}

// ---------------------------------------------------------------------------------------------
// SafetensorsWriter

void SafetensorsWriter::add(const std::string& name, DType dtype, const std::vector<int64_t>& shape,
                            const void* data, size_t nbytes) {
  if (name == kMetadataKey) {
    throw std::invalid_argument("safetensors: tensor name " + name_quote(name) +
                                " is reserved for metadata");
  }
  if (index_.count(name) > 0) {
    throw std::invalid_argument("safetensors: tensor " + name_quote(name) + " added twice");
  }
  int64_t numel = 0;
  size_t expected_nbytes = 0;
  if (!shape_numel(shape, &numel) ||
      __builtin_mul_overflow(static_cast<size_t>(numel), dtype_size(dtype), &expected_nbytes)) {
    throw std::invalid_argument("safetensors: tensor " + name_quote(name) + " shape " +
                                shape_str(shape) +
                                " is invalid (expected non-negative "
                                "dimensions whose product fits in 64 bits)");
  }
  if (nbytes != expected_nbytes) {
    throw std::invalid_argument("safetensors: tensor " + name_quote(name) + " has " +
                                std::to_string(nbytes) + " bytes for dtype " + dtype_name(dtype) +
                                " shape " + shape_str(shape) + " (expected " +
                                std::to_string(expected_nbytes) + ")");
  }
  if (data == nullptr && nbytes > 0) {
    throw std::invalid_argument("safetensors: tensor " + name_quote(name) + " has no data");
  }
  Entry entry;
  entry.info.name = name;
  entry.info.dtype = dtype;
  entry.info.shape = shape;
  entry.info.nbytes = nbytes;
  entry.info.offset =
      entries_.empty() ? 0 : entries_.back().info.offset + entries_.back().info.nbytes;
  const auto* bytes = static_cast<const uint8_t*>(data);
  entry.bytes.assign(bytes, bytes + nbytes);
  index_.emplace(name, entries_.size());
  entries_.push_back(std::move(entry));
}

void SafetensorsWriter::set_metadata(const std::string& key, const std::string& value) {
  metadata_[key] = value;
}

void SafetensorsWriter::write(const std::string& path) const {
  // Data in the order the reference writer uses: widest dtype first, then by name, so that every
  // tensor starts at a multiple of its element size (the data section starts 8-byte aligned).
  std::vector<const Entry*> order;
  for (const Entry& entry : entries_) order.push_back(&entry);
  std::stable_sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) {
    const size_t sa = dtype_size(a->info.dtype), sb = dtype_size(b->info.dtype);
    return sa != sb ? sa > sb : a->info.name < b->info.name;
  });
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata_.empty()) header[kMetadataKey] = metadata_;
  size_t offset = 0;
  for (const Entry* entry : order) {
    const TensorInfo& info = entry->info;
    header[info.name] = {{"dtype", dtype_name(info.dtype)},
                         {"shape", info.shape},
                         {"data_offsets", {offset, offset + info.nbytes}}};
    offset += info.nbytes;
  }
  std::string header_text = header.dump();
  // The data section starts 8-byte aligned, as the reference writer pads it.
  header_text.append((8 - header_text.size() % 8) % 8, ' ');
  uint8_t length_bytes[8];
  u64_store_le(header_text.size(), length_bytes);

  std::string tmp_path = path + ".tmp.XXXXXX";  // same directory, so rename is atomic
  FdGuard fd(::mkstemp(tmp_path.data()));
  if (fd.get() < 0) {
    throw std::runtime_error(path + ": cannot create a temporary file: " + errno_text());
  }
  auto fail = [&](const std::string& what) {
    const std::string reason = errno_text();
    ::close(fd.release());
    ::unlink(tmp_path.c_str());
    throw std::runtime_error(path + ": cannot " + what + ": " + reason);
  };
  // mkstemp creates 0600; a weights file should be readable like any other output.
  if (::fchmod(fd.get(), 0644) != 0) fail("set permissions");
  if (!fd_write_all(fd.get(), length_bytes, sizeof length_bytes) ||
      !fd_write_all(fd.get(), header_text.data(), header_text.size())) {
    fail("write the header");
  }
  for (const Entry* entry : order) {
    if (!fd_write_all(fd.get(), entry->bytes.data(), entry->bytes.size())) fail("write the data");
  }
  // Flushed before the rename so a crash leaves the old file or the complete new one.
  if (::fsync(fd.get()) != 0) fail("flush");
  if (::close(fd.release()) != 0) {
    const std::string reason = errno_text();
    ::unlink(tmp_path.c_str());
    throw std::runtime_error(path + ": cannot close: " + reason);
  }
  if (::rename(tmp_path.c_str(), path.c_str()) != 0) {
    const std::string reason = errno_text();
    ::unlink(tmp_path.c_str());
    throw std::runtime_error(path + ": cannot rename the temporary file into place: " + reason);
  }
}

// ---------------------------------------------------------------------------------------------
// ModelWeights

ModelWeights ModelWeights::open_dir(const std::string& dir) {
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    format_error_throw(dir, "model directory does not exist",
                       "expected a directory with model.safetensors or "
                       "model.safetensors.index.json");
  }
  ModelWeights weights;
  weights.dir_ = dir;

  const std::string single_path = path_join(dir, "model.safetensors");
  if (file_is_regular(single_path)) {
    weights.files_.push_back(SafetensorsFile::open(single_path));
    for (const TensorInfo& info : weights.files_[0]->tensors()) weights.where_[info.name] = 0;
    return weights;
  }

  const std::string index_path = path_join(dir, "model.safetensors.index.json");
  if (!file_is_regular(index_path)) {
    format_error_throw(dir, "no model weights found",
                       "expected model.safetensors or model.safetensors.index.json");
  }
  const json index = json_file_read(index_path, kMaxIndexBytes);
  if (!index.is_object()) {
    format_error_throw(index_path, "top level is " + json_describe(index),
                       "expected an object with a \"weight_map\"");
  }
  const auto map_it = index.find("weight_map");
  if (map_it == index.end() || !map_it->is_object()) {
    format_error_throw(
        index_path, "weight_map is " + (map_it == index.end() ? "missing" : json_describe(*map_it)),
        "expected an object mapping tensor names to shard files");
  }

  // Each shard opens once; shards open in name order so files() is deterministic.
  std::map<std::string, std::vector<std::string>> names_by_shard;
  for (auto it = map_it->begin(); it != map_it->end(); ++it) {
    if (!it->is_string() || it->get_ref<const std::string&>().empty()) {
      format_error_throw(
          index_path,
          "weight_map entry for tensor " + name_quote(it.key()) + " is " + json_describe(*it),
          "expected a shard file name such as "
          "\"model-00001-of-00002.safetensors\"");
    }
    names_by_shard[it->get<std::string>()].push_back(it.key());
  }
  for (const auto& [shard, names] : names_by_shard) {
    const std::string shard_path = path_join(dir, shard);
    if (!file_is_regular(shard_path)) {
      format_error_throw(index_path,
                         "shard " + name_quote(shard) + " (holding tensor " +
                             name_quote(names.front()) + ") does not exist",
                         "expected the file " + shard_path);
    }
    std::shared_ptr<SafetensorsFile> file = SafetensorsFile::open(shard_path);
    for (const std::string& name : names) {
      if (file->find(name) == nullptr) {
        format_error_throw(
            index_path, "tensor " + name_quote(name) + " is not in its shard " + name_quote(shard),
            "expected every tensor in weight_map to be in the shard it names");
      }
      weights.where_[name] = weights.files_.size();
    }
    weights.files_.push_back(std::move(file));
  }
  return weights;
}

std::vector<std::string> ModelWeights::names() const {
  std::vector<std::string> names;
  names.reserve(where_.size());
  for (const auto& entry : where_) names.push_back(entry.first);
  return names;
}

const std::string& ModelWeights::resolve(const std::string& name) const {
  const auto it = aliases_.find(name);
  return it == aliases_.end() ? name : it->second;
}

void ModelWeights::alias(const std::string& alias, const std::string& name) {
  if (where_.count(name) == 0)
    throw std::invalid_argument(dir_ + ": cannot alias " + name_quote(alias) + " to " +
                                name_quote(name) + ", which is not stored");
  if (where_.count(alias) != 0 || aliases_.count(alias) != 0)
    throw std::invalid_argument(dir_ + ": tensor " + name_quote(alias) + " is stored both as " +
                                name_quote(alias) + " and as " + name_quote(name));
  aliases_[alias] = name;
}

bool ModelWeights::contains(const std::string& name) const {
  return where_.count(resolve(name)) > 0;
}

const TensorInfo& ModelWeights::info(const std::string& alias_or_name) const {
  const std::string& name = resolve(alias_or_name);
  const auto it = where_.find(name);
  if (it == where_.end()) {
    format_error_throw(dir_, "model weights have no tensor " + name_quote(name),
                       "expected one of " + std::to_string(where_.size()) + " tensors" +
                           (where_.empty() ? "" : ", e.g. " + name_quote(where_.begin()->first)));
  }
  return files_[it->second]->at(name);
}

const uint8_t* ModelWeights::data(const std::string& name) const {
  const TensorInfo& tensor = info(name);
  return files_[where_.at(resolve(name))]->data(tensor);
}

}  // namespace qlora::io
