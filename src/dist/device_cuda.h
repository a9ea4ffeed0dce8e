// The CUDA side of the device seam (device_context.h): what the runtime sees, which GPU this
// thread uses, and the caching allocator's peak. In builds without CUDA every function answers
// as a machine without GPUs would (visible: 0 with the reason; built: false).
#pragma once

#include <cstdint>
#include <string>

#include "dist/device_context.h"

namespace qlora::dist::cuda {

bool built();                       // this build has CUDA and NCCL
GpuVisibility visible();            // cudaGetDeviceCount, with the reason when it is 0
void device_select(int index);      // libtorch's and the runtime's current device
int64_t peak_allocated_bytes(int index);
int64_t device_memory_bytes(int index);  // the GPU's total memory (cudaDeviceProp); 0 without CUDA
std::string describe();             // "CUDA runtime 13.0, driver 12.8, NCCL 2.27.3, 1 GPU visible"

}  // namespace qlora::dist::cuda
