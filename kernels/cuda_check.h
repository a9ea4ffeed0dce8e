// The one checking macro for raw CUDA runtime calls and one for NCCL calls: a failure throws
// std::runtime_error with file, line, the call and the library's own error string.
// Only for code built when QLORA_HAVE_CUDA (needs cuda_runtime.h and nccl.h).
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <stdexcept>
#include <string>

namespace qlora::kernels {

inline void cuda_check(cudaError_t err, const char* call, const char* file, int line) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + call +
                             " failed: " + cudaGetErrorString(err));
  }
}

inline void nccl_check(ncclResult_t res, const char* call, const char* file, int line) {
  if (res != ncclSuccess) {
    throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + call +
                             " failed: " + ncclGetErrorString(res));
  }
}

}  // namespace qlora::kernels

#define QLORA_CUDA_CHECK(call) ::qlora::kernels::cuda_check((call), #call, __FILE__, __LINE__)
#define QLORA_NCCL_CHECK(call) ::qlora::kernels::nccl_check((call), #call, __FILE__, __LINE__)
