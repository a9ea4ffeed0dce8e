// The device seam: one object owns where the engine computes (device, compute dtype), how it
// allocates (tensor options), where its randomness comes from (seeded generators on the device)
// and whom it talks to (the communicator). Code in src/dist and src/train allocates through it
// and never names a device itself, so the same engine runs on the CPU (every test here) and on a
// GPU (the CUDA path plugs in here: device = cuda, a CUDA generator, the NCCL communicator).
// Host transfers are explicit: to_host(), once per optimizer step in the trainer.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>

#include <cstdint>
#include <initializer_list>
#include <string>

#include "dist/communicator.h"

namespace qlora::dist {

enum class Device { cpu, cuda };
const char* device_name(Device device);

// What this process sees of GPUs: how many the CUDA runtime lists (CUDA_VISIBLE_DEVICES
// applied), or 0 with the reason (a build without CUDA, no driver, no device).
struct GpuVisibility {
  int count = 0;
  std::string reason;  // empty when count > 0
};
GpuVisibility gpus_visible();
// Total memory of GPU `index` (0 in a build without CUDA or where it cannot be read).
int64_t gpu_memory_bytes(int index);

// The build's libtorch version, devices and collective backends, for qlora_dist --version.
std::string build_describe();

class DeviceContext {
 public:
  // `index`: the device ordinal (the local rank's GPU; 0 on the CPU). On cuda the GPU becomes
  // this thread's current device (libtorch's and the CUDA runtime's).
  DeviceContext(Device device, at::ScalarType compute_dtype, Communicator& comm, int index = 0);
  // Without a communicator yet (the NCCL one is made on the selected GPU): comm_set before use.
  DeviceContext(Device device, at::ScalarType compute_dtype, int index);
  void comm_set(Communicator& comm) { comm_ = &comm; }

  Device device() const { return device_; }
  at::Device torch_device() const;
  at::ScalarType compute_dtype() const { return compute_dtype_; }
  Communicator& comm() const;
  int rank() const { return comm().rank(); }
  int world_size() const { return comm().world_size(); }

  at::TensorOptions options(at::ScalarType dtype) const;
  at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype) const;
  at::Tensor zeros(at::IntArrayRef sizes, at::ScalarType dtype) const;
  // A tensor on this device (a copy when it is elsewhere, else `t` itself).
  at::Tensor to_device(const at::Tensor& t) const;

  // A fresh generator on this device seeded with `seed`: the same seed, the same stream
  // (torch's Philox/MT semantics of the device's default generator).
  at::Generator generator(uint64_t seed) const;
  // The same on the host: draws that must not depend on the device (LoRA init, as peft makes it
  // on the CPU before moving the model).
  static at::Generator host_generator(uint64_t seed);
  // One seed from a base seed and indices (step, micro-step, rank, block, ...): stateless
  // randomness, so that a resumed run draws what an uninterrupted one would.
  static uint64_t seed_mix(uint64_t seed, std::initializer_list<uint64_t> parts);

  // Host memory: the copy of a (small) device tensor the host reads, and host options for
  // staging buffers. The only ways host and device meet in the engine.
  static at::Tensor to_host(const at::Tensor& t);
  static at::TensorOptions host_options(at::ScalarType dtype);

  // The most device memory the caching allocator has handed out since the start (cuda: its
  // peak of allocated bytes on this GPU); 0 on the CPU (host memory is max_rss_bytes).
  int64_t peak_memory_bytes() const;

 private:
  Device device_;
  at::ScalarType compute_dtype_;
  Communicator* comm_ = nullptr;
  int index_;
};

}  // namespace qlora::dist
