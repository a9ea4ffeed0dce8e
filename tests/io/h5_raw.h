// Raw HDF5 writes for tests: datasets of types and ranks that io::H5File never writes (floats,
// int64, uint16, 1-D), to check how readers reject or convert them.
#pragma once

#include <gtest/gtest.h>
#include <hdf5.h>

#include <vector>

namespace qlora::io::testing {

// A dataset `name` of `dims` in `file`, stored as file_type, written from `data` (mem_type).
// Fails the current test if HDF5 refuses.
inline void raw_dataset(hid_t file, const char* name, hid_t file_type, hid_t mem_type,
                        const std::vector<hsize_t>& dims, const void* data) {
  const hid_t space = H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr);
  const hid_t dset =
      H5Dcreate2(file, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  ASSERT_GE(dset, 0) << name;
  ASSERT_GE(H5Dwrite(dset, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data), 0) << name;
  H5Dclose(dset);
  H5Sclose(space);
}

}  // namespace qlora::io::testing
