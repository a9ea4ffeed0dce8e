// HDF5 helpers: RAII over hid_t, hyperslab reads of byte and row ranges, string / int64 attributes.
// HDF5 reports failures on its error stack; we switch its printing off once and turn the innermost
// entry of the stack into the reason in our own one-line messages.
#include "io/h5_file.h"
#include "io/shape_str.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <hdf5.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <utility>

namespace qlora::io {
namespace {

static_assert(std::is_same_v<hid_t, int64_t>, "h5_file.h stores hid_t as int64_t (HDF5 >= 1.10)");

// Switches HDF5's automatic error printing off; idempotent, cheap, called by every way in.
void h5_init() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }

// The most specific description on HDF5's error stack (where the error was first detected), then
// the stack is cleared. "" if the stack is empty.
std::string h5_reason() {
  std::string innermost;
  H5Ewalk2(
      H5E_DEFAULT, H5E_WALK_UPWARD,
      [](unsigned n, const H5E_error2_t* err, void* data) -> herr_t {
        if (n == 0 && err->desc != nullptr) *static_cast<std::string*>(data) = err->desc;
        return 0;
      },
      &innermost);
  H5Eclear2(H5E_DEFAULT);
  if (innermost.empty()) return "no HDF5 error detail";
  // System call failures read "unable to open file: name = ..., errno = 2, error message =
  // 'No such file or directory', flags = ..."; the system's message is the useful part.
  const std::string key = "error message = '";
  const size_t begin = innermost.find(key);
  if (begin != std::string::npos) {
    const size_t end = innermost.find('\'', begin + key.size());
    if (end != std::string::npos)
      return innermost.substr(begin + key.size(), end - begin - key.size());
  }
  return "HDF5: " + innermost;
}

// One HDF5 identifier and the function that closes it.
class Handle {
 public:
  Handle(hid_t id, herr_t (*close_fn)(hid_t)) : id_(id), close_(close_fn) {}
  ~Handle() {
    if (id_ >= 0) close_(id_);
  }
  Handle(Handle&& other) noexcept : id_(std::exchange(other.id_, -1)), close_(other.close_) {}
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  Handle& operator=(Handle&&) = delete;
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }

 private:
  hid_t id_;
  herr_t (*close_)(hid_t);
};

std::string type_name(hid_t type) {
  const size_t bits = 8 * H5Tget_size(type);
  switch (H5Tget_class(type)) {
    case H5T_INTEGER:
      return (H5Tget_sign(type) == H5T_SGN_NONE ? "uint" : "int") + std::to_string(bits);
    case H5T_FLOAT:
      return "float" + std::to_string(bits);
    case H5T_STRING:
      return "string";
    case H5T_COMPOUND:
      return "compound";
    case H5T_OPAQUE:
      return "opaque";
    case H5T_BITFIELD:
      return "bitfield";
    case H5T_REFERENCE:
      return "reference";
    case H5T_ENUM:
      return "enum";
    case H5T_VLEN:
      return "vlen";
    case H5T_ARRAY:
      return "array";
    case H5T_TIME:
      return "time";
    default:
      return "HDF5 type class " + std::to_string(static_cast<int>(H5Tget_class(type)));
  }
}

std::vector<int64_t> space_dims(hid_t space) {
  const int ndims = H5Sget_simple_extent_ndims(space);
  if (ndims <= 0) return {};
  std::vector<hsize_t> dims(static_cast<size_t>(ndims));
  H5Sget_simple_extent_dims(space, dims.data(), nullptr);
  return std::vector<int64_t>(dims.begin(), dims.end());
}


// "a/b/c" -> {"/a", "/a/b", "/a/b/c"}; "/" and "" -> {}.
std::vector<std::string> path_prefixes(const std::string& name) {
  std::vector<std::string> prefixes;
  std::string prefix;
  size_t begin = 0;
  while (begin <= name.size()) {
    size_t end = name.find('/', begin);
    if (end == std::string::npos) end = name.size();
    if (end > begin) {
      prefix += "/" + name.substr(begin, end - begin);
      prefixes.push_back(prefix);
    }
    begin = end + 1;
  }
  return prefixes;
}

// Whether every link on the way to `name` exists (H5Lexists itself fails when a parent is missing).
bool link_exists(hid_t file, const std::string& name) {
  for (const std::string& prefix : path_prefixes(name)) {
    if (H5Lexists(file, prefix.c_str(), H5P_DEFAULT) <= 0) {
      H5Eclear2(H5E_DEFAULT);
      return false;
    }
  }
  return true;
}

// "group 'units' holds block.0, block.1, ..." for the deepest existing group above `name`, so a
// missing-dataset message shows what is there instead.
std::string nearby_names(hid_t file, const std::string& name) {
  std::string group = "/";
  for (const std::string& prefix : path_prefixes(name)) {
    if (H5Lexists(file, prefix.c_str(), H5P_DEFAULT) <= 0) break;
    Handle object(H5Oopen(file, prefix.c_str(), H5P_DEFAULT), H5Oclose);
    if (!object.valid() || H5Iget_type(object.get()) != H5I_GROUP) break;
    group = prefix;
  }
  H5Eclear2(H5E_DEFAULT);
  struct Names {
    std::vector<std::string> shown;
    size_t total = 0;
  } names;
  H5Literate_by_name(
      file, group.c_str(), H5_INDEX_NAME, H5_ITER_INC, nullptr,
      [](hid_t, const char* member, const H5L_info_t*, void* data) -> herr_t {
        auto* names = static_cast<Names*>(data);
        if (names->shown.size() < 8) names->shown.push_back(member);
        ++names->total;
        return 0;
      },
      &names, H5P_DEFAULT);
  H5Eclear2(H5E_DEFAULT);
  std::string text = "group '" + group + "' holds ";
  if (names.total == 0) return text + "nothing";
  for (size_t i = 0; i < names.shown.size(); ++i) text += (i ? ", " : "") + names.shown[i];
  if (names.total > names.shown.size())
    text += " and " + std::to_string(names.total - names.shown.size()) + " more";
  return text;
}

void check_name(const std::string& path, const std::string& name, const char* what) {
  if (name.empty())
    throw std::invalid_argument(path + ": empty " + what + " name (expected e.g. 'units/block.0')");
}

Handle file_access_plist() {
  Handle fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  // Close every object with the file, so close() means the file is complete on disk.
  H5Pset_fclose_degree(fapl.get(), H5F_CLOSE_STRONG);
#if H5_VERSION_GE(1, 10, 7)
  // Keep file locks, but do not fail on file systems without flock (Lustre, some NFS mounts).
  H5Pset_file_locking(fapl.get(), true, true);
#endif
  return fapl;
}

// Aborts a conversion that would clamp an integer (int64 token ids beyond int32, say).
H5T_conv_ret_t abort_on_range_error(H5T_conv_except_t except, hid_t, hid_t, void*, void*,
                                    void* flag) {
  if (except == H5T_CONV_EXCEPT_RANGE_HI || except == H5T_CONV_EXCEPT_RANGE_LOW) {
    *static_cast<bool*>(flag) = true;
    return H5T_CONV_ABORT;
  }
  return H5T_CONV_UNHANDLED;
}

}  // namespace

H5File::H5File(int64_t file_id, std::string path, bool writable)
    : file_id_(file_id), path_(std::move(path)), writable_(writable) {}

H5File H5File::create(const std::string& path) {
  h5_init();
  Handle fapl = file_access_plist();
  const hid_t file = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get());
  if (file < 0) throw std::runtime_error(path + ": cannot create HDF5 file (" + h5_reason() + ")");
  return H5File(file, path, true);
}

H5File H5File::open_read(const std::string& path) {
  h5_init();
  // Plain POSIX checks first: HDF5's messages for these are long and name no cause.
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) throw std::runtime_error(path + ": no such file (expected an HDF5 file)");
    throw std::runtime_error(path + ": cannot open (" + std::strerror(err) + ")");
  }
  ::close(fd);
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    throw std::runtime_error(path + ": is a directory (expected an HDF5 file)");
  const htri_t is_hdf5 = H5Fis_hdf5(path.c_str());
  if (is_hdf5 == 0) {
    const auto size = std::filesystem::file_size(path, ec);
    throw std::runtime_error(path + ": not an HDF5 file (no HDF5 signature in its " +
                             (ec ? std::string("?") : std::to_string(size)) +
                             " bytes; expected a file written by HDF5 or h5py)");
  }
  if (is_hdf5 < 0)
    throw std::runtime_error(path + ": cannot check for an HDF5 signature (" + h5_reason() + ")");
  Handle fapl = file_access_plist();
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl.get());
  if (file < 0) {
    const std::string reason = h5_reason();
    const auto size = std::filesystem::file_size(path, ec);
    throw std::runtime_error(path + ": HDF5 file is truncated or damaged (" +
                             (ec ? std::string("?") : std::to_string(size)) + " bytes; " + reason +
                             ")");
  }
  return H5File(file, path, false);
}

// HDF5 up to 1.14.0 (Debian ships 1.10.8) frees a file's state when the flush inside H5Fclose
// fails (a full disk), yet keeps its identifier, and closes it again at exit (H5_term_library,
// from atexit or, for parallel HDF5, from MPI_Finalize): a use after free that crashed writers
// after a failed write (HDFGroup/hdf5#2291, fixed in 1.14.1). A failed H5Fflush is no way out:
// it leaves the cache's skip list enabled, so every later flush, the one in H5Fclose included,
// fails too. So the flush in H5Fclose must not fail:
// - a complete file first gets the blocks of everything HDF5 may still write (the holes below
//   its end: metadata it keeps in its cache) with posix_fallocate, which obeys the same limits
//   as a write (space, quota, RLIMIT_FSIZE) and writes zeros where fallocate is not supported;
// - a file that cannot get them, or whose write already failed, is discarded (its writer removes
//   it): its contents are truncated away and HDF5's descriptor is pointed at an anonymous
//   in-memory file, so the close-time flush writes its few metadata blocks to memory, outside
//   any disk, quota or file-size limit (the soft RLIMIT_FSIZE is lifted for that close).
std::string H5File::release() noexcept {
  const hid_t file = std::exchange(file_id_, -1);
  std::string reason = write_failed_ ? "an earlier write failed" : "";
  bool discarded = false;
  rlimit fsize{};
  void* handle = nullptr;
  if (writable_ && H5Fget_vfd_handle(file, H5P_DEFAULT, &handle) >= 0 && handle != nullptr) {
    const int fd = *static_cast<int*>(handle);
    hsize_t size = 0;
    if (reason.empty() && H5Fget_filesize(file, &size) >= 0) {
      const int err = ::posix_fallocate(fd, 0, static_cast<off_t>(size));
      if (err != 0) reason = std::strerror(err);
    }
    if (!reason.empty()) {
      (void)::ftruncate(fd, 0);  // frees the disk at once (the writer unlinks the name)
      const int sink = ::memfd_create("qlora-h5-discard", MFD_CLOEXEC);
      if (sink >= 0) {
        (void)::dup2(sink, fd);
        ::close(sink);
      }
      discarded = ::getrlimit(RLIMIT_FSIZE, &fsize) == 0 && fsize.rlim_cur != fsize.rlim_max;
      if (discarded) {
        rlimit lifted = fsize;
        lifted.rlim_cur = fsize.rlim_max;
        discarded = ::setrlimit(RLIMIT_FSIZE, &lifted) == 0;
      }
    }
  }
  H5Eclear2(H5E_DEFAULT);
  if (H5Fclose(file) < 0 && reason.empty()) reason = h5_reason();
  H5Eclear2(H5E_DEFAULT);
  if (discarded) (void)::setrlimit(RLIMIT_FSIZE, &fsize);
  return reason;
}

H5File::~H5File() {
  if (file_id_ >= 0) release();
}

H5File::H5File(H5File&& other) noexcept
    : file_id_(std::exchange(other.file_id_, -1)),
      path_(std::move(other.path_)),
      writable_(other.writable_),
      write_failed_(other.write_failed_),
      bytes_read_(other.bytes_read_) {}

H5File& H5File::operator=(H5File&& other) noexcept {
  if (this != &other) {
    if (file_id_ >= 0) release();
    file_id_ = std::exchange(other.file_id_, -1);
    path_ = std::move(other.path_);
    writable_ = other.writable_;
    write_failed_ = other.write_failed_;
    bytes_read_ = other.bytes_read_;
  }
  return *this;
}

void H5File::close() {
  if (file_id_ < 0) return;
  const std::string reason = release();
  if (!reason.empty())
    throw std::runtime_error(path_ + ": cannot complete HDF5 file (" + reason + ")");
}

std::string H5File::where(const std::string& object) const { return path_ + ": '" + object + "'"; }

void H5File::require_writable(const std::string& object) const {
  if (file_id_ < 0)
    throw std::invalid_argument(path_ + ": file is closed (writing '" + object + "')");
  if (!writable_)
    throw std::invalid_argument(path_ + ": opened read-only (writing '" + object +
                                "' needs H5File::create)");
}

int64_t H5File::open_object(const std::string& object) const {
  check_name(path_, object, "object");
  if (file_id_ < 0)
    throw std::invalid_argument(path_ + ": file is closed (reading '" + object + "')");
  if (!link_exists(file_id_, object))
    throw std::runtime_error(path_ + ": no object '" + object + "' (" +
                             nearby_names(file_id_, object) + ")");
  const hid_t id = H5Oopen(file_id_, object.c_str(), H5P_DEFAULT);
  if (id < 0) throw std::runtime_error(where(object) + " cannot be opened (" + h5_reason() + ")");
  return id;
}

int64_t H5File::open_dataset(const std::string& dataset) const {
  check_name(path_, dataset, "dataset");
  if (file_id_ < 0)
    throw std::invalid_argument(path_ + ": file is closed (reading '" + dataset + "')");
  if (!link_exists(file_id_, dataset))
    throw std::runtime_error(path_ + ": no dataset '" + dataset + "' (" +
                             nearby_names(file_id_, dataset) + ")");
  Handle object(H5Oopen(file_id_, dataset.c_str(), H5P_DEFAULT), H5Oclose);
  if (!object.valid())
    throw std::runtime_error(where(dataset) + " cannot be opened (" + h5_reason() + ")");
  if (H5Iget_type(object.get()) != H5I_DATASET)
    throw std::runtime_error(where(dataset) + " is a group, not a dataset (expected a dataset)");
  const hid_t id = H5Dopen2(file_id_, dataset.c_str(), H5P_DEFAULT);
  if (id < 0) throw std::runtime_error(where(dataset) + " cannot be opened (" + h5_reason() + ")");
  return id;
}

bool H5File::has(const std::string& dataset) const {
  if (dataset.empty() || file_id_ < 0 || !link_exists(file_id_, dataset)) return false;
  Handle object(H5Oopen(file_id_, dataset.c_str(), H5P_DEFAULT), H5Oclose);
  H5Eclear2(H5E_DEFAULT);
  return object.valid() && H5Iget_type(object.get()) == H5I_DATASET;
}

// ---- bytes ----

void H5File::write_bytes(const std::string& dataset, const void* data, size_t nbytes) {
  check_name(path_, dataset, "dataset");
  require_writable(dataset);
  if (data == nullptr && nbytes > 0)
    throw std::invalid_argument(where(dataset) + ": null data for " + std::to_string(nbytes) +
                                " bytes");
  if (link_exists(file_id_, dataset))
    throw std::invalid_argument(where(dataset) + " already exists (write each dataset once)");
  const hsize_t dims[1] = {nbytes};
  Handle space(H5Screate_simple(1, dims, nullptr), H5Sclose);
  Handle lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
  H5Pset_create_intermediate_group(lcpl.get(), 1);
  Handle dset(H5Dcreate2(file_id_, dataset.c_str(), H5T_STD_U8LE, space.get(), lcpl.get(),
                         H5P_DEFAULT, H5P_DEFAULT),
              H5Dclose);
  if (!dset.valid())
    throw std::runtime_error(where(dataset) + ": cannot create a uint8 dataset of " +
                             std::to_string(nbytes) + " bytes (" + h5_reason() + ")");
  if (nbytes > 0 && H5Dwrite(dset.get(), H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0) {
    write_failed_ = true;
    throw std::runtime_error(where(dataset) + ": cannot write " + std::to_string(nbytes) +
                             " bytes (" + h5_reason() + ")");
  }
}

namespace {

// The byte count of a 1-D dataset of 8-bit integers; throws naming what it holds instead.
size_t bytes_dataset_size(hid_t dset, hid_t type, const std::string& where) {
  Handle space(H5Dget_space(dset), H5Sclose);
  const std::vector<int64_t> dims = space_dims(space.get());
  if (H5Tget_class(type) != H5T_INTEGER || H5Tget_size(type) != 1 || dims.size() != 1)
    throw std::runtime_error(where + " holds " + type_name(type) + " " + shape_str(dims) +
                             " (expected a 1-D uint8 dataset)");
  return static_cast<size_t>(dims[0]);
}

}  // namespace

size_t H5File::nbytes(const std::string& dataset) const {
  Handle dset(open_dataset(dataset), H5Dclose);
  Handle type(H5Dget_type(dset.get()), H5Tclose);
  return bytes_dataset_size(dset.get(), type.get(), where(dataset));
}

void H5File::read_bytes(const std::string& dataset, size_t offset, size_t nbytes, void* out) const {
  if (out == nullptr && nbytes > 0)
    throw std::invalid_argument(where(dataset) + ": null output buffer for " +
                                std::to_string(nbytes) + " bytes");
  Handle dset(open_dataset(dataset), H5Dclose);
  Handle type(H5Dget_type(dset.get()), H5Tclose);
  const size_t size = bytes_dataset_size(dset.get(), type.get(), where(dataset));
  if (offset > size || nbytes > size - offset) {
    const std::string end = offset > SIZE_MAX - nbytes
                                ? std::to_string(offset) + " + " + std::to_string(nbytes)
                                : std::to_string(offset + nbytes);
    throw std::invalid_argument(where(dataset) + ": bytes [" + std::to_string(offset) + ", " + end +
                                ") are beyond its end (size " + std::to_string(size) + " bytes)");
  }
  if (nbytes == 0) return;
  Handle file_space(H5Dget_space(dset.get()), H5Sclose);
  const hsize_t start[1] = {offset};
  const hsize_t count[1] = {nbytes};
  Handle mem_space(H5Screate_simple(1, count, nullptr), H5Sclose);
  // The dataset's own native type: uint8 or int8 are read as they are, never converted.
  Handle mem_type(H5Tget_native_type(type.get(), H5T_DIR_ASCEND), H5Tclose);
  if (H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start, nullptr, count, nullptr) < 0 ||
      H5Dread(dset.get(), mem_type.get(), mem_space.get(), file_space.get(), H5P_DEFAULT, out) < 0)
    throw std::runtime_error(where(dataset) + ": cannot read bytes [" + std::to_string(offset) +
                             ", " + std::to_string(offset + nbytes) + ") (" + h5_reason() + ")");
  bytes_read_ += nbytes;
}

// ---- 2-D int32 ----

void H5File::write_int32_2d(const std::string& dataset, const int32_t* data, int64_t rows,
                            int64_t cols) {
  check_name(path_, dataset, "dataset");
  require_writable(dataset);
  if (rows < 0 || cols < 0)
    throw std::invalid_argument(where(dataset) + ": negative shape [" + std::to_string(rows) +
                                ", " + std::to_string(cols) + "]");
  if (data == nullptr && rows > 0 && cols > 0)
    throw std::invalid_argument(where(dataset) + ": null data for shape [" + std::to_string(rows) +
                                ", " + std::to_string(cols) + "]");
  if (link_exists(file_id_, dataset))
    throw std::invalid_argument(where(dataset) + " already exists (write each dataset once)");
  const hsize_t dims[2] = {static_cast<hsize_t>(rows), static_cast<hsize_t>(cols)};
  Handle space(H5Screate_simple(2, dims, nullptr), H5Sclose);
  Handle lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
  H5Pset_create_intermediate_group(lcpl.get(), 1);
  Handle dset(H5Dcreate2(file_id_, dataset.c_str(), H5T_STD_I32LE, space.get(), lcpl.get(),
                         H5P_DEFAULT, H5P_DEFAULT),
              H5Dclose);
  if (!dset.valid())
    throw std::runtime_error(where(dataset) + ": cannot create an int32 dataset [" +
                             std::to_string(rows) + ", " + std::to_string(cols) + "] (" +
                             h5_reason() + ")");
  if (rows > 0 && cols > 0 &&
      H5Dwrite(dset.get(), H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0) {
    write_failed_ = true;
    throw std::runtime_error(where(dataset) + ": cannot write int32 [" + std::to_string(rows) +
                             ", " + std::to_string(cols) + "] (" + h5_reason() + ")");
  }
}

std::vector<int64_t> H5File::shape(const std::string& dataset) const {
  Handle dset(open_dataset(dataset), H5Dclose);
  Handle space(H5Dget_space(dset.get()), H5Sclose);
  return space_dims(space.get());
}

void H5File::read_int32_rows(const std::string& dataset, int64_t row0, int64_t nrows,
                             int32_t* out, int64_t ncols) const {
  if (row0 < 0 || nrows < 0)
    throw std::invalid_argument(where(dataset) + ": negative row range (row0 " +
                                std::to_string(row0) + ", nrows " + std::to_string(nrows) + ")");
  Handle dset(open_dataset(dataset), H5Dclose);
  Handle type(H5Dget_type(dset.get()), H5Tclose);
  Handle file_space(H5Dget_space(dset.get()), H5Sclose);
  const std::vector<int64_t> dims = space_dims(file_space.get());
  if (H5Tget_class(type.get()) != H5T_INTEGER || dims.size() != 2)
    throw std::runtime_error(where(dataset) + " holds " + type_name(type.get()) + " " +
                             shape_str(dims) + " (expected 2-D integer token ids, e.g. int32)");
  const int64_t rows = dims[0];
  if (ncols > dims[1])
    throw std::invalid_argument(where(dataset) + ": columns [0, " + std::to_string(ncols) +
                                ") are beyond its end (shape " + shape_str(dims) + ")");
  const int64_t cols = ncols >= 0 ? ncols : dims[1];
  if (row0 > rows || nrows > rows - row0) {
    const std::string end = row0 > INT64_MAX - nrows
                                ? std::to_string(row0) + " + " + std::to_string(nrows)
                                : std::to_string(row0 + nrows);
    throw std::invalid_argument(where(dataset) + ": rows [" + std::to_string(row0) + ", " + end +
                                ") are beyond its end (shape " + shape_str(dims) + ")");
  }
  if (nrows == 0 || cols == 0) return;
  if (out == nullptr)
    throw std::invalid_argument(where(dataset) + ": null output buffer for " +
                                std::to_string(nrows) + " rows");
  const hsize_t start[2] = {static_cast<hsize_t>(row0), 0};
  const hsize_t count[2] = {static_cast<hsize_t>(nrows), static_cast<hsize_t>(cols)};
  Handle mem_space(H5Screate_simple(2, count, nullptr), H5Sclose);
  Handle dxpl(H5Pcreate(H5P_DATASET_XFER), H5Pclose);
  bool out_of_range = false;
  H5Pset_type_conv_cb(dxpl.get(), abort_on_range_error, &out_of_range);
  if (H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start, nullptr, count, nullptr) < 0 ||
      H5Dread(dset.get(), H5T_NATIVE_INT32, mem_space.get(), file_space.get(), dxpl.get(), out) <
          0) {
    const std::string reason = h5_reason();
    const std::string rows_text =
        "rows [" + std::to_string(row0) + ", " + std::to_string(row0 + nrows) + ")";
    if (out_of_range)
      throw std::runtime_error(where(dataset) + ": " + type_name(type.get()) +
                               " value outside the int32 range in " + rows_text +
                               " (expected token ids that fit int32)");
    throw std::runtime_error(where(dataset) + ": cannot read " + rows_text + " (" + reason + ")");
  }
  bytes_read_ += static_cast<size_t>(nrows) * static_cast<size_t>(cols) * sizeof(int32_t);
}

// ---- attributes ----

namespace {

// Opens attribute `name` of `object`, which must hold exactly one element.
Handle open_attr(hid_t object_id, const std::string& where, const std::string& name) {
  const htri_t exists = H5Aexists(object_id, name.c_str());
  if (exists <= 0) {
    H5Eclear2(H5E_DEFAULT);
    throw std::runtime_error(where + " has no attribute '" + name + "'");
  }
  Handle attr(H5Aopen(object_id, name.c_str(), H5P_DEFAULT), H5Aclose);
  if (!attr.valid())
    throw std::runtime_error(where + ": cannot open attribute '" + name + "' (" + h5_reason() +
                             ")");
  Handle space(H5Aget_space(attr.get()), H5Sclose);
  if (H5Sget_simple_extent_npoints(space.get()) != 1)
    throw std::runtime_error(where + ": attribute '" + name + "' has shape " +
                             shape_str(space_dims(space.get())) + " (expected a single value)");
  return attr;
}

// Replaces attribute `name` of `object_id` with a new scalar one of `type`.
Handle create_attr(hid_t object_id, const std::string& where, const std::string& name, hid_t type) {
  if (H5Aexists(object_id, name.c_str()) > 0 && H5Adelete(object_id, name.c_str()) < 0)
    throw std::runtime_error(where + ": cannot replace attribute '" + name + "' (" + h5_reason() +
                             ")");
  H5Eclear2(H5E_DEFAULT);
  Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  Handle attr(H5Acreate2(object_id, name.c_str(), type, space.get(), H5P_DEFAULT, H5P_DEFAULT),
              H5Aclose);
  if (!attr.valid())
    throw std::runtime_error(where + ": cannot create attribute '" + name + "' (" + h5_reason() +
                             ")");
  return attr;
}

}  // namespace

void H5File::set_attr_string(const std::string& object, const std::string& name,
                             const std::string& value) {
  check_name(path_, name, "attribute");
  require_writable(object);
  if (value.find('\0') != std::string::npos)
    throw std::invalid_argument(where(object) + ": attribute '" + name +
                                "' contains a NUL byte (HDF5 strings end at the first NUL)");
  Handle obj(open_object(object), H5Oclose);
  Handle type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type.get(), H5T_VARIABLE);
  H5Tset_cset(type.get(), H5T_CSET_UTF8);
  Handle attr = create_attr(obj.get(), where(object), name, type.get());
  const char* text = value.c_str();
  if (H5Awrite(attr.get(), type.get(), &text) < 0) {
    write_failed_ = true;
    throw std::runtime_error(where(object) + ": cannot write attribute '" + name + "' (" +
                             h5_reason() + ")");
  }
}

std::string H5File::attr_string(const std::string& object, const std::string& name) const {
  Handle obj(open_object(object), H5Oclose);
  Handle attr = open_attr(obj.get(), where(object), name);
  Handle type(H5Aget_type(attr.get()), H5Tclose);
  if (H5Tget_class(type.get()) != H5T_STRING)
    throw std::runtime_error(where(object) + ": attribute '" + name + "' holds " +
                             type_name(type.get()) + " (expected a string)");
  const auto read_failed = [&] {
    return std::runtime_error(where(object) + ": cannot read string attribute '" + name + "' (" +
                              h5_reason() + ")");
  };
  if (H5Tis_variable_str(type.get()) > 0) {
    Handle mem_type(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(mem_type.get(), H5T_VARIABLE);
    H5Tset_cset(mem_type.get(), H5Tget_cset(type.get()));
    char* text = nullptr;
    if (H5Aread(attr.get(), mem_type.get(), &text) < 0) throw read_failed();
    std::string value = text != nullptr ? text : "";
    H5free_memory(text);
    return value;
  }
  // Fixed length: padded with NULs (or spaces) up to the type's size.
  std::string value(H5Tget_size(type.get()), '\0');
  if (!value.empty() && H5Aread(attr.get(), type.get(), value.data()) < 0) throw read_failed();
  if (H5Tget_strpad(type.get()) == H5T_STR_SPACEPAD) {
    value.erase(value.find_last_not_of(' ') + 1);
  } else {
    value.resize(std::strlen(value.c_str()));
  }
  return value;
}

void H5File::set_attr_int64(const std::string& object, const std::string& name, int64_t value) {
  check_name(path_, name, "attribute");
  require_writable(object);
  Handle obj(open_object(object), H5Oclose);
  Handle attr = create_attr(obj.get(), where(object), name, H5T_STD_I64LE);
  if (H5Awrite(attr.get(), H5T_NATIVE_INT64, &value) < 0) {
    write_failed_ = true;
    throw std::runtime_error(where(object) + ": cannot write attribute '" + name + "' (" +
                             h5_reason() + ")");
  }
}

int64_t H5File::attr_int64(const std::string& object, const std::string& name) const {
  Handle obj(open_object(object), H5Oclose);
  Handle attr = open_attr(obj.get(), where(object), name);
  Handle type(H5Aget_type(attr.get()), H5Tclose);
  if (H5Tget_class(type.get()) != H5T_INTEGER)
    throw std::runtime_error(where(object) + ": attribute '" + name + "' holds " +
                             type_name(type.get()) + " (expected an integer)");
  const auto read_failed = [&] {
    return std::runtime_error(where(object) + ": cannot read integer attribute '" + name + "' (" +
                              h5_reason() + ")");
  };
  // uint64 is read as such and range-checked: HDF5 would clamp it to INT64_MAX silently.
  if (H5Tget_sign(type.get()) == H5T_SGN_NONE && H5Tget_size(type.get()) >= 8) {
    uint64_t value = 0;
    if (H5Aread(attr.get(), H5T_NATIVE_UINT64, &value) < 0) throw read_failed();
    if (value > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      throw std::runtime_error(where(object) + ": attribute '" + name + "' = " +
                               std::to_string(value) + " (expected a value that fits int64)");
    return static_cast<int64_t>(value);
  }
  int64_t value = 0;
  if (H5Aread(attr.get(), H5T_NATIVE_INT64, &value) < 0) throw read_failed();
  return value;
}

bool H5File::has_attr(const std::string& object, const std::string& name) const {
  Handle obj(open_object(object), H5Oclose);
  const htri_t exists = H5Aexists(obj.get(), name.c_str());
  H5Eclear2(H5E_DEFAULT);
  return exists > 0;
}

}  // namespace qlora::io
