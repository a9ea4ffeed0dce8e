// Fuzzes our checks on top of HDF5: the token and preference-pair datasets (data::TokenDataset,
// data::PairDataset: opening checks, then row reads with their id / label / position checks) and
// the H5File reads a quantized unit file is validated with (string and integer attributes,
// dataset shapes, 1-D byte datasets, int32 rows). The input does not go to HDF5 as bytes: a
// mutated HDF5 file mostly exercises libhdf5's own parser, which is not ours to fix. It
// describes a file instead (which datasets, their stored type, rank and dimensions, up to 2^35
// per dimension without the storage being written, their values, the root attributes and their
// types), which the harness writes with the HDF5 API and then hands to the readers.
// Layout: mode, cutoff_len, model vocab (2 bytes), dataset count, then per dataset: name, type,
// rank, one byte per dimension, and one byte per element when there are at most 4096; then
// per attribute (vocab_size, pad_token_id, format): kind and value. Bad input must be
// std::invalid_argument (what TokenDataset / PairDataset document) or, for the bare H5File
// reads, std::invalid_argument / std::runtime_error (what H5File documents).
#include <hdf5.h>

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "fuzz_util.h"
#include "io/h5_file.h"

namespace {

const char* const kNames[] = {"input_ids",          "labels",          "position_ids",
                              "chosen_input_ids",   "chosen_labels",   "rejected_input_ids",
                              "rejected_labels",    "units/block.0"};
constexpr size_t kMaxWritten = 4096;  // elements written; larger datasets stay unallocated

int64_t element_value(uint8_t b) {
  static const int64_t kSpecial[] = {-100,       -1,          -2,         65535,
                                     1 << 20,    2147483647,  -2147483648LL, 4294967296LL,
                                     -4294967296LL, 1LL << 62};
  if (b < 200) return b % 50;
  return kSpecial[(b - 200) % (sizeof kSpecial / sizeof kSpecial[0])];
}

hid_t file_type(uint8_t b) {
  switch (b % 9) {
    case 0: return H5T_STD_I32LE;
    case 1: return H5T_STD_I64LE;
    case 2: return H5T_STD_I16LE;
    case 3: return H5T_STD_U8LE;
    case 4: return H5T_STD_U64LE;
    case 5: return H5T_IEEE_F32LE;
    case 6: return H5T_IEEE_F64LE;
    case 7: return H5T_STD_I32BE;
    default: return H5T_STD_I8LE;
  }
}

void dataset_write(hid_t file, qlora::fuzz::Bytes& in) {
  const char* name = kNames[in.u8() % (sizeof kNames / sizeof kNames[0])];
  const hid_t type = file_type(in.u8());
  const int rank = in.u8() % 4;
  std::vector<hsize_t> dims(static_cast<size_t>(rank));
  unsigned __int128 total = 1;
  for (hsize_t& d : dims) {
    const uint8_t b = in.u8();
    d = b < 240 ? b % 9 : hsize_t{1} << (20 + (b - 240));
    total *= d;
  }
  if (H5Lexists(file, name, H5P_DEFAULT) > 0) return;
  H5Eclear2(H5E_DEFAULT);
  const hid_t space = rank == 0 ? H5Screate(H5S_SCALAR)
                                : H5Screate_simple(rank, dims.data(), nullptr);
  const hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
  H5Pset_create_intermediate_group(lcpl, 1);
  const hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
  H5Pset_alloc_time(dcpl, H5D_ALLOC_TIME_LATE);  // a 2^35-element dataset costs nothing unread
  const hid_t dset = H5Dcreate2(file, name, type, space, lcpl, dcpl, H5P_DEFAULT);
  if (dset >= 0 && total > 0 && total <= kMaxWritten) {
    std::vector<int64_t> values(static_cast<size_t>(total));
    for (int64_t& v : values) v = element_value(in.u8());
    H5Dwrite(dset, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data());
  }
  if (dset >= 0) H5Dclose(dset);
  H5Pclose(dcpl);
  H5Pclose(lcpl);
  H5Sclose(space);
  H5Eclear2(H5E_DEFAULT);
}

void attribute_write(hid_t file, const char* name, qlora::fuzz::Bytes& in) {
  const uint8_t kind = in.u8() % 6;
  if (kind == 0) return;  // absent
  const hid_t space = H5Screate(H5S_SCALAR);
  if (kind <= 3) {  // int64, uint64, float64
    const hid_t type = kind == 1 ? H5T_STD_I64LE : kind == 2 ? H5T_STD_U64LE : H5T_IEEE_F64LE;
    const uint8_t b = in.u8();
    const int64_t v = b < 128 ? element_value(b) : static_cast<int64_t>(in.u64());
    const double d = static_cast<double>(v);
    const hid_t attr = H5Acreate2(file, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    if (attr >= 0) {
      if (kind == 3) H5Awrite(attr, H5T_NATIVE_DOUBLE, &d);
      else H5Awrite(attr, kind == 1 ? H5T_NATIVE_INT64 : H5T_NATIVE_UINT64, &v);
      H5Aclose(attr);
    }
  } else {  // variable-length or fixed-length string
    std::string text = in.str(64);
    const hid_t type = H5Tcopy(H5T_C_S1);
    if (kind == 4) H5Tset_size(type, H5T_VARIABLE);
    else H5Tset_size(type, text.size() + 1);
    const hid_t attr = H5Acreate2(file, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    if (attr >= 0) {
      const char* p = text.c_str();
      H5Awrite(attr, type, kind == 4 ? static_cast<const void*>(&p) : p);
      H5Aclose(attr);
    }
    H5Tclose(type);
  }
  H5Sclose(space);
  H5Eclear2(H5E_DEFAULT);
}

// What a unit file's validation reads, on whatever the file holds.
void probe(const std::string& path) {
  const qlora::io::H5File f = qlora::io::H5File::open_read(path);
  for (const char* attr : {"vocab_size", "pad_token_id", "format"}) {
    if (!f.has_attr("/", attr)) continue;
    try {
      (void)f.attr_string("/", attr);
    } catch (const std::runtime_error& e) {
      qlora::fuzz::refused(e);
    }
    try {
      (void)f.attr_int64("/", attr);
    } catch (const std::runtime_error& e) {
      qlora::fuzz::refused(e);
    }
  }
  for (const char* name : kNames) {
    if (!f.has(name)) continue;
    const std::vector<int64_t> shape = f.shape(name);
    try {
      const size_t n = f.nbytes(name);
      uint8_t buf[64];
      f.read_bytes(name, n > 64 ? n - 64 : 0, n > 64 ? 64 : n, buf);
    } catch (const std::runtime_error& e) {
      qlora::fuzz::refused(e);
    }
    if (shape.size() == 2 && shape[0] > 0 && shape[1] > 0 && shape[1] <= 4096) {
      std::vector<int32_t> row(static_cast<size_t>(shape[1]));
      try {
        f.read_int32_rows(name, shape[0] - 1, 1, row.data());
      } catch (const std::runtime_error& e) {
        qlora::fuzz::refused(e);
      }
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qlora;
  fuzz::Bytes in(data, size);
  const uint8_t mode = in.u8() % 3;
  const uint8_t cutoff_byte = in.u8();
  const int64_t cutoff = cutoff_byte < 250 ? cutoff_byte : int64_t{1} << (cutoff_byte - 230);
  const int64_t model_vocab = int64_t{in.u8()} | int64_t{in.u8()} << 8;
  const std::string path = (fuzz::scratch_dir() / "data.h5").string();
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  const hid_t file = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  if (file < 0) std::abort();
  const int ndatasets = in.u8() % 8;
  for (int i = 0; i < ndatasets; ++i) dataset_write(file, in);
  for (const char* attr : {"vocab_size", "pad_token_id", "format"}) attribute_write(file, attr, in);
  if (H5Fclose(file) < 0) std::abort();

  try {
    if (mode == 0) {
      const data::TokenDataset ds(path, cutoff, model_vocab);
      at::Tensor ids, labels, positions;
      const std::vector<int64_t> rows = {0, ds.rows() - 1, ds.rows() / 2};
      ds.read(rows, ids, labels, &positions);
      if (ids.size(0) != 3 || ids.size(1) != ds.seq_len() || ds.seq_len() > cutoff) std::abort();
      try {
        ds.read({ds.rows()}, ids, labels);
        std::abort();  // a row past the end must be refused
      } catch (const std::invalid_argument&) {
      }
    } else if (mode == 1) {
      const data::PairDataset ds(path, cutoff, model_vocab);
      at::Tensor ids, labels;
      ds.read({ds.rows() - 1, 0}, ids, labels);
      if (ids.size(0) != 4 || ids.size(1) != ds.seq_len() || ds.seq_len() > cutoff) std::abort();
    } else {
      try {
        probe(path);
      } catch (const std::runtime_error& e) {
        qlora::fuzz::refused(e);
      }
    }
  } catch (const std::invalid_argument& e) {
    qlora::fuzz::refused(e);
  }
  return 0;
}
