// Fuzzes the safetensors reader (io::SafetensorsFile::open): the 8-byte header length, the JSON
// header and its tensor table (dtype, shape, data_offsets, __metadata__). The input is the whole
// file. A file the reader accepts must keep its promises: every tensor's bytes lie inside the
// data section and match prod(shape) * dtype size; those are checked here, and the bytes read.
// Bad input must be io::FormatError (the one exception the reader documents for a bad file).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>

#include "fuzz_util.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qlora;
  const std::string path =
      fuzz::scratch_write("model.safetensors", {reinterpret_cast<const char*>(data), size});
  std::shared_ptr<io::SafetensorsFile> file;
  try {
    file = io::SafetensorsFile::open(path);
  } catch (const io::FormatError& e) {
    fuzz::refused(e);
    return 0;
  }
  uint64_t header = 0;
  for (int i = 7; i >= 0; --i) header = (header << 8) | data[i];
  const size_t data_nbytes = size - 8 - static_cast<size_t>(header);
  const uint8_t* data_begin = data + 8 + header;
  for (const io::TensorInfo& info : file->tensors()) {
    const size_t expected = static_cast<size_t>(info.numel()) * io::dtype_size(info.dtype);
    if (info.nbytes != expected || info.offset > data_nbytes ||
        info.nbytes > data_nbytes - info.offset || file->find(info.name) != &info) {
      std::fprintf(stderr, "safetensors fuzz: accepted tensor breaks the reader's promises\n");
      std::abort();
    }
    // The mapping holds the same bytes as the input at the same place.
    const uint8_t* bytes = file->data(info);
    for (size_t i = 0; i < info.nbytes; i += 97) {
      if (bytes[i] != data_begin[info.offset + i]) std::abort();
    }
  }
  try {
    file->at("no such tensor \x01");
    std::abort();  // at() must refuse a name the header does not hold
  } catch (const io::FormatError&) {
  }
  return 0;
}
