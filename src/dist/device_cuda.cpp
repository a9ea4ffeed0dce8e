// See device_cuda.h. The CUDA parts compile only where CMake found nvcc (QLORA_HAVE_NCCL).
#include "dist/device_cuda.h"

#include <cstdlib>
#include <stdexcept>

#ifdef QLORA_HAVE_NCCL
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>
#include <nccl.h>
#endif

namespace qlora::dist::cuda {

#ifdef QLORA_HAVE_NCCL

bool built() { return true; }

GpuVisibility visible() {
  GpuVisibility v;
  const cudaError_t err = cudaGetDeviceCount(&v.count);
  const char* env = std::getenv("CUDA_VISIBLE_DEVICES");
  const std::string cvd = env ? std::string(" with CUDA_VISIBLE_DEVICES=") + env : "";
  if (err != cudaSuccess) {
    v.count = 0;
    v.reason = std::string("cudaGetDeviceCount: ") + cudaGetErrorString(err) + cvd;
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
  } else if (v.count == 0) {
    v.reason = "the CUDA runtime lists no device" + cvd;
  }
  return v;
}

void device_select(int index) {
  const GpuVisibility v = visible();
  if (index < 0 || index >= v.count)
    throw std::invalid_argument("model.device = cuda: GPU " + std::to_string(index) +
                                " does not exist (" + std::to_string(v.count) + " visible" +
                                (v.reason.empty() ? "" : "; " + v.reason) + ")");
  c10::cuda::set_device(static_cast<c10::DeviceIndex>(index));
}

int64_t peak_allocated_bytes(int index) {
  const auto stats =
      c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(index));
  return stats.allocated_bytes[0].peak;  // [0]: StatType::AGGREGATE (all pools)
}

int64_t device_memory_bytes(int index) {
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, index) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return static_cast<int64_t>(prop.totalGlobalMem);
}

std::string describe() {
  auto version = [](int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); };
  int runtime = 0, driver = 0, nccl = 0;
  cudaRuntimeGetVersion(&runtime);
  std::string s = "CUDA runtime " + version(runtime);
  s += cudaDriverGetVersion(&driver) == cudaSuccess && driver > 0 ? ", driver " + version(driver)
                                                                  : ", no driver";
  if (ncclGetVersion(&nccl) == ncclSuccess)
    s += ", NCCL " + std::to_string(nccl / 10000) + "." + std::to_string(nccl % 10000 / 100) +
         "." + std::to_string(nccl % 100);
  const GpuVisibility v = visible();
  s += ", " + std::to_string(v.count) + " GPU(s) visible";
  return s;
}

#else  // no CUDA in this build

bool built() { return false; }

GpuVisibility visible() {
  return {0, "this build has no CUDA (configured without nvcc)"};
}

void device_select(int) {
  throw std::invalid_argument(
      "model.device = cuda: this build has no CUDA (configured without nvcc); use model.device = "
      "cpu");
}

int64_t peak_allocated_bytes(int) { return 0; }

int64_t device_memory_bytes(int) { return 0; }

std::string describe() { return "not built"; }

#endif

}  // namespace qlora::dist::cuda
