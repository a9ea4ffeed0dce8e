// The one checking-macro family for raw CUDA runtime and NCCL calls (kernels and the NCCL
// communicator alike): a failure throws std::runtime_error with file, line, the call, the rank
// (from the launcher's environment: Open MPI, PMIx, SLURM or torchrun) and the library's own
// error string. Only for code built when QLORA_HAVE_CUDA (needs cuda_runtime.h and nccl.h).
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdlib>
#include <stdexcept>
#include <string>

namespace qlora::kernels {

// "rank R" from the launcher's environment, "rank ?" outside a launcher.
inline std::string launcher_rank_text() {
  for (const char* v : {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID", "RANK"})
    if (const char* r = std::getenv(v)) return std::string("rank ") + r;
  return "rank ?";
}

[[noreturn]] inline void gpu_fail(const char* call, const char* file, int line, const char* what) {
  throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + call +
                           " failed on " + launcher_rank_text() + ": " + what);
}

inline void cuda_check(cudaError_t err, const char* call, const char* file, int line) {
  if (err != cudaSuccess) gpu_fail(call, file, line, cudaGetErrorString(err));
}

inline void nccl_check(ncclResult_t res, const char* call, const char* file, int line) {
  if (res != ncclSuccess) gpu_fail(call, file, line, ncclGetErrorString(res));
}

}  // namespace qlora::kernels

#define QLORA_CUDA_CHECK(call) ::qlora::kernels::cuda_check((call), #call, __FILE__, __LINE__)
#define QLORA_NCCL_CHECK(call) ::qlora::kernels::nccl_check((call), #call, __FILE__, __LINE__)
