// The one formatter of tensor shapes in messages: "[4, 256]" ("[]" for a scalar). Shapes from
// untrusted files are clipped after 8 dims ("[1, 2, ..., (12 dims)]").
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace qlora::io {

std::string shape_str(const int64_t* dims, size_t ndim);
inline std::string shape_str(const std::vector<int64_t>& shape) {
  return shape_str(shape.data(), shape.size());
}

}  // namespace qlora::io
