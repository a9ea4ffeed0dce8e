// The device seam: see device_context.h.
#include "dist/device_context.h"

#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <torch/version.h>

#include <mutex>
#include <stdexcept>

#include "dist/device_cuda.h"

namespace qlora::dist {

const char* device_name(Device device) {
  switch (device) {
    case Device::cpu: return "cpu";
    case Device::cuda: return "cuda";
  }
  throw std::invalid_argument("device_name: unknown Device " + std::to_string(static_cast<int>(device)));
}

DeviceContext::DeviceContext(Device device, at::ScalarType compute_dtype, Communicator& comm,
                             int index)
    : device_(device), compute_dtype_(compute_dtype), comm_(&comm), index_(index) {
  if (device_ == Device::cuda) cuda::device_select(index_);
}

DeviceContext::DeviceContext(Device device, at::ScalarType compute_dtype, int index)
    : device_(device), compute_dtype_(compute_dtype), index_(index) {
  if (device_ == Device::cuda) cuda::device_select(index_);
}

Communicator& DeviceContext::comm() const {
  if (!comm_) throw std::logic_error("DeviceContext: no communicator set (comm_set)");
  return *comm_;
}

at::Device DeviceContext::torch_device() const {
  switch (device_) {
    case Device::cpu: return at::Device(at::kCPU);
    case Device::cuda: return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(index_));
  }
  throw std::invalid_argument("DeviceContext: unknown Device " + std::to_string(static_cast<int>(device_)));
}

at::TensorOptions DeviceContext::options(at::ScalarType dtype) const {
  return at::TensorOptions().dtype(dtype).device(torch_device());
}

at::Tensor DeviceContext::empty(at::IntArrayRef sizes, at::ScalarType dtype) const {
  return at::empty(sizes, options(dtype));
}

at::Tensor DeviceContext::zeros(at::IntArrayRef sizes, at::ScalarType dtype) const {
  return at::zeros(sizes, options(dtype));
}

at::Tensor DeviceContext::to_device(const at::Tensor& t) const {
  return t.device() == torch_device() ? t : t.to(torch_device());
}

namespace {

// A clone of `device`'s default generator, reseeded: on the CPU this is exactly
// at::make_generator<CPUGeneratorImpl>(seed) (set_current_seed resets the cached normals).
at::Generator seeded_generator(at::Device device, uint64_t seed) {
  at::Generator base = at::globalContext().defaultGenerator(device);
  at::Generator gen;
  {
    std::lock_guard<std::mutex> lock(base.mutex());
    gen = base.clone();
  }
  gen.set_current_seed(seed);
  return gen;
}

}  // namespace

at::Generator DeviceContext::generator(uint64_t seed) const {
  return seeded_generator(torch_device(), seed);
}

at::Generator DeviceContext::host_generator(uint64_t seed) {
  return seeded_generator(at::Device(at::kCPU), seed);
}

uint64_t DeviceContext::seed_mix(uint64_t seed, std::initializer_list<uint64_t> parts) {
  uint64_t x = seed * 0x9e3779b97f4a7c15ULL;
  for (uint64_t v : parts) x = (x ^ (v + 0x632be59bd9b4e019ULL + (x << 6) + (x >> 2))) * 0xff51afd7ed558ccdULL;
  return x;
}

at::Tensor DeviceContext::to_host(const at::Tensor& t) {
  return t.device().is_cpu() ? t : t.to(at::kCPU);
}

at::TensorOptions DeviceContext::host_options(at::ScalarType dtype) {
  return at::TensorOptions().dtype(dtype).device(at::kCPU);
}

int64_t DeviceContext::peak_memory_bytes() const {
  return device_ == Device::cuda ? cuda::peak_allocated_bytes(index_) : 0;
}

GpuVisibility gpus_visible() { return cuda::visible(); }

int64_t gpu_memory_bytes(int index) { return cuda::device_memory_bytes(index); }

std::string build_describe() {
  std::string s = "libtorch " + std::to_string(TORCH_VERSION_MAJOR) + "." +
                  std::to_string(TORCH_VERSION_MINOR) + "." + std::to_string(TORCH_VERSION_PATCH);
  s += "\ndevices: cpu";
  if (cuda::built()) s += ", cuda (" + cuda::describe() + ")";
  s += "\nbackends: mpi";
  if (cuda::built()) s += ", nccl";
  return s;
}

}  // namespace qlora::dist
