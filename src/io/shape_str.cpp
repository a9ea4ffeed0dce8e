// Shape formatting: see shape_str.h.
#include "io/shape_str.h"

namespace qlora::io {

std::string shape_str(const int64_t* dims, size_t ndim) {
  constexpr size_t kMaxDims = 8;
  std::string text = "[";
  for (size_t i = 0; i < ndim && i < kMaxDims; ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(dims[i]);
  }
  if (ndim > kMaxDims) text += ", ... (" + std::to_string(ndim) + " dims)";
  return text + "]";
}

}  // namespace qlora::io
