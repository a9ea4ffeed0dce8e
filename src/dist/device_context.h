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

class DeviceContext {
 public:
  // `index`: the device ordinal (the local rank's GPU; 0 on the CPU).
  DeviceContext(Device device, at::ScalarType compute_dtype, Communicator& comm, int index = 0);

  Device device() const { return device_; }
  at::Device torch_device() const;
  at::ScalarType compute_dtype() const { return compute_dtype_; }
  Communicator& comm() const { return *comm_; }
  int rank() const { return comm_->rank(); }
  int world_size() const { return comm_->world_size(); }

  at::TensorOptions options(at::ScalarType dtype) const;
  at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype) const;
  at::Tensor zeros(at::IntArrayRef sizes, at::ScalarType dtype) const;
  // A tensor on this device (a copy when it is elsewhere, else `t` itself).
  at::Tensor to_device(const at::Tensor& t) const;

  // A fresh generator on this device seeded with `seed`: the same seed, the same stream
  // (torch's Philox/MT semantics of the device's default generator).
  at::Generator generator(uint64_t seed) const;
  // One seed from a base seed and indices (step, micro-step, rank, block, ...): stateless
  // randomness, so that a resumed run draws what an uninterrupted one would.
  static uint64_t seed_mix(uint64_t seed, std::initializer_list<uint64_t> parts);

  // Host memory: the copy of a (small) device tensor the host reads, and host options for
  // staging buffers. The only ways host and device meet in the engine.
  static at::Tensor to_host(const at::Tensor& t);
  static at::TensorOptions host_options(at::ScalarType dtype);

 private:
  Device device_;
  at::ScalarType compute_dtype_;
  Communicator* comm_;
  int index_;
};

}  // namespace qlora::dist
