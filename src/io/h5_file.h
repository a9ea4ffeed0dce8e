// HDF5 helpers for our own files (quantized model checkpoints, token datasets): 1-D uint8 "bytes"
// datasets read by byte range (hyperslab), 2-D int32 datasets read by row range, and string /
// int64 attributes. Each rank opens the file on its own, read-only, with the default (sec2)
// driver: no MPI-IO. Every HDF5 failure becomes one exception line naming the file and object;
// HDF5's own error stack is never printed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace qlora::io {

// One open HDF5 file; move-only, closed by the destructor (or close(), which reports errors).
// Object names are HDF5 paths relative to the root ("units/block.3", "/tokens"); "/" is the root
// group itself (for attributes).
// Errors: std::invalid_argument for a caller's mistake (a range past the end, a null buffer,
// a dataset that already exists, a string with a NUL byte); std::runtime_error for everything
// about the file (missing, not HDF5, truncated, a missing dataset or attribute, the wrong type
// or rank). Messages read "<path>: <what is wrong> (<what was expected>)".
// The Debian HDF5 build is not thread-safe: use H5File objects from one thread at a time, and
// close them before MPI_Finalize (parallel HDF5 shuts itself down there).
class H5File {
 public:
  static H5File create(const std::string& path);     // truncates an existing file
  static H5File open_read(const std::string& path);  // read-only
  ~H5File();
  H5File(H5File&& other) noexcept;
  H5File& operator=(H5File&& other) noexcept;
  H5File(const H5File&) = delete;
  H5File& operator=(const H5File&) = delete;

  const std::string& path() const { return path_; }
  // Closes the file now and throws if HDF5 cannot complete it (a writer should call it before
  // renaming). A written file that cannot be completed (a full disk), or whose earlier write
  // failed, is emptied before HDF5 closes it (see release() in h5_file.cpp): its writer removes it.
  void close();

  // Bytes: a 1-D uint8 dataset; groups on the way ("units" in "units/block.3") are created.
  void write_bytes(const std::string& dataset, const void* data, size_t nbytes);
  size_t nbytes(const std::string& dataset) const;
  // Reads bytes [offset, offset + nbytes) of the dataset into out, and only those.
  void read_bytes(const std::string& dataset, size_t offset, size_t nbytes, void* out) const;

  // Token datasets: 2-D int32 [rows, cols], row-major.
  void write_int32_2d(const std::string& dataset,
                      const int32_t* data,  // [rows, cols]
                      int64_t rows, int64_t cols);
  std::vector<int64_t> shape(const std::string& dataset) const;  // any dataset
  // Rows [row0, row0 + nrows), all columns, or with ncols >= 0 only columns [0, ncols) (at most
  // the dataset's; a reader cutting rows reads no more than it keeps). The dataset may hold any
  // integer type (h5py writes int64 by default); a value outside the int32 range is an error,
  // floats are rejected.
  void read_int32_rows(const std::string& dataset, int64_t row0, int64_t nrows,
                       int32_t* out,  // [nrows, cols or ncols]
                       int64_t ncols = -1) const;

  // Attributes on an object (a dataset, a group, or "/" for the root). Setting an attribute that
  // exists replaces it. Strings are variable-length UTF-8 (h5py reads them back as str) and may be
  // long (a whole config.json); reading also accepts fixed-length strings.
  void set_attr_string(const std::string& object, const std::string& name,
                       const std::string& value);
  std::string attr_string(const std::string& object, const std::string& name) const;
  void set_attr_int64(const std::string& object, const std::string& name, int64_t value);
  int64_t attr_int64(const std::string& object, const std::string& name) const;
  bool has_attr(const std::string& object, const std::string& name) const;  // object must exist
  bool has(const std::string& dataset) const;  // true only for an existing dataset

  // Payload bytes delivered by read_bytes and read_int32_rows since the file was opened.
  size_t bytes_read() const { return bytes_read_; }

 private:
  H5File(int64_t file_id, std::string path, bool writable);
  int64_t open_dataset(const std::string& dataset) const;  // hid_t; throws if absent
  int64_t open_object(const std::string& object) const;    // hid_t; throws if absent
  void require_writable(const std::string& object) const;
  std::string where(const std::string& object) const;  // "path: 'object'"
  std::string release() noexcept;  // closes file_id_; "" or why the file is not complete


  int64_t file_id_ = -1;  // hid_t (int64_t since HDF5 1.10; checked in h5_file.cpp)
  std::string path_;
  bool writable_ = false;
  bool write_failed_ = false;  // a data or attribute write failed: the file is discarded at close
  mutable size_t bytes_read_ = 0;
};

}  // namespace qlora::io
