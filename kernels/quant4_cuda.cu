// CUDA 4-bit blockwise quantize / dequantize with exactly the rules of quant4_ref.cpp:
//   absmax[b] = max_i |x_i| (NaN wins);  q_i = order[#{bounds < clamp(x_i / absmax[b])}]
//   y_i = code[q_i] * absmax[i / bs]
// plus the NCCL version check. Built with --fmad=false -prec-div=true -ftz=false so that every
// rounding (including the subnormal 1e-38 floor) is the IEEE one the CPU reference makes.
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <cstdint>

#include "cuda_check.h"
#include "quant4_check.h"
#include "quant4_cuda.h"
#include "quant4_ref.h"

namespace qlora::kernels {
namespace {

// Device copies of the tables in quant4_format.h (constexpr arrays cannot be read from device
// code), built from them at compile time so they cannot drift. Index 0 = nf4, 1 = fp4; FP4
// code 8 is -0.0 there too, so this kernel decodes it as bitsandbytes' CUDA kernel does.
struct DeviceTables {
  float code[2][16];
  float bounds[2][15];
  uint8_t order[2][16];
};

constexpr DeviceTables make_device_tables() {
  DeviceTables t{};
  for (int i = 0; i < 16; ++i) {
    t.code[0][i] = kNF4Code[i];
    t.code[1][i] = kFP4Code[i];
    t.order[0][i] = kNF4Order[i];
    t.order[1][i] = kFP4Order[i];
  }
  for (int i = 0; i < 15; ++i) {
    t.bounds[0][i] = kNF4Bounds[i];
    t.bounds[1][i] = kFP4Bounds[i];
  }
  return t;
}

__constant__ DeviceTables c_tables = make_device_tables();

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = int64_t{1} << 20;  // grid-stride loops cover the rest

int table_index(const char* fn, QuantType type) {
  if (type == QuantType::nf4) {
    return 0;
  } else if (type == QuantType::fp4) {
    return 1;
  } else {
    detail::throw_bad_quant_type(fn, type);
  }
}

// fabsf via the sign bit: PTX abs.f32 may return a different NaN, and the stored absmax of a
// block holding NaN must carry that element's payload, as in the reference.
__device__ inline float abs_bits(float v) {
  return __int_as_float(__float_as_int(v) & 0x7fffffff);
}
__device__ inline float floor_keep_nan(float v) {
  return isnan(v) ? v : (v < kAbsmaxFloor ? kAbsmaxFloor : v);
}
__device__ inline float clamp_keep_nan(float v) {
  return isnan(v) ? v : (v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v));
}
// torch.bucketize(v, bounds, right=False) then the code of that bucket; NaN -> bucket 15.
__device__ inline uint8_t encode4(float v, int t) {
  int k = 15;
  if (!isnan(v)) {
    k = 0;
    while (k < 15 && c_tables.bounds[t][k] < v) ++k;
  }
  return c_tables.order[t][k];
}

// One thread block per quant block (grid-stride over blocks). Pass 1 finds absmax and the first
// NaN (the reference returns the first NaN it meets); pass 2 encodes one packed byte per step.
__global__ void quantize_4bit_kernel(const float* __restrict__ x, int64_t numel,
                                     int32_t blocksize, int t, uint8_t* __restrict__ packed,
                                     float* __restrict__ absmax) {
  __shared__ float s_max[kThreads / 32];
  __shared__ int s_nan[kThreads / 32];
  __shared__ float s_am;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t blocks = num_blocks(numel, blocksize);
  const uint8_t zero_code = encode4(0.0f, t);
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    const int64_t begin = b * blocksize;
    const int n = static_cast<int>(min(static_cast<int64_t>(blocksize), numel - begin));
    const float* xb = x + begin;  // [n]

    float m = 0.0f;
    int first_nan = n;  // n = none
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const float a = abs_bits(xb[i]);
      if (isnan(a)) first_nan = min(first_nan, i);
      else m = a > m ? a : m;
    }
    for (int off = 16; off > 0; off /= 2) {
      const float om = __shfl_down_sync(0xffffffffu, m, off);
      m = om > m ? om : m;
      first_nan = min(first_nan, __shfl_down_sync(0xffffffffu, first_nan, off));
    }
    if (lane == 0) {
      s_max[warp] = m;
      s_nan[warp] = first_nan;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < kThreads / 32; ++w) {
        m = s_max[w] > m ? s_max[w] : m;
        first_nan = min(first_nan, s_nan[w]);
      }
      const float am = first_nan < n ? abs_bits(xb[first_nan]) : m;
      s_am = am;
      absmax[b] = n == blocksize ? am : floor_keep_nan(am);
    }
    __syncthreads();
    const float am = s_am;
    const bool full = n == blocksize;
    const float div = floor_keep_nan(am);
    const float inv = 1.0f / div;
    uint8_t* pb = packed + begin / 2;  // [(n+1)/2]; begin is even
    for (int j = threadIdx.x; j < (n + 1) / 2; j += blockDim.x) {
      const int e = 2 * j;
      const float s0 = full ? xb[e] * inv : xb[e] / div;
      const uint8_t q0 = encode4(clamp_keep_nan(s0), t);
      uint8_t q1 = zero_code;  // odd numel: pad with the code of 0.0
      if (e + 1 < n) {
        const float s1 = full ? xb[e + 1] * inv : xb[e + 1] / div;
        q1 = encode4(clamp_keep_nan(s1), t);
      }
      pb[j] = static_cast<uint8_t>((q0 << 4) | q1);
    }
    __syncthreads();  // s_am and s_max are reused by the next block of the loop
  }
}

__device__ inline void store_out(float* out, float v) { *out = v; }
__device__ inline void store_out(uint16_t* out, float v) { *out = float_to_bf16_bits(v); }

// One packed byte (two elements; blocksize is even so both share an absmax) per step.
template <typename Out>
__global__ void dequantize_4bit_kernel(const uint8_t* __restrict__ packed,
                                       const float* __restrict__ absmax, int64_t numel,
                                       int32_t blocksize, int t, Out* __restrict__ out) {
  const int64_t nbytes = packed_nbytes(numel);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < nbytes;
       j += stride) {
    const int64_t e = 2 * j;
    const uint8_t byte = packed[j];
    const float am = absmax[e / blocksize];
    store_out(out + e, c_tables.code[t][byte >> 4] * am);
    if (e + 1 < numel) store_out(out + e + 1, c_tables.code[t][byte & 0x0f] * am);
  }
}

int grid_for(int64_t work_items, int64_t per_block) {
  return static_cast<int>(std::min((work_items + per_block - 1) / per_block, kMaxGrid));
}

template <typename Out>
void dequantize_cuda(const char* fn, const uint8_t* packed, const float* absmax, int64_t numel,
                     int32_t blocksize, QuantType type, Out* out, void* stream) {
  detail::check_quant4_args(fn, numel, blocksize, type);
  const int t = table_index(fn, type);
  if (numel == 0) return;  // a launch with an empty grid is an error
  dequantize_4bit_kernel<Out>
      <<<grid_for(packed_nbytes(numel), kThreads), kThreads, 0,
         static_cast<cudaStream_t>(stream)>>>(packed, absmax, numel, blocksize, t, out);
  QLORA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void quantize_4bit_cuda(const float* x, int64_t numel, int32_t blocksize, QuantType type,
                        uint8_t* packed, float* absmax, void* stream) {
  detail::check_quant4_args("quantize_4bit_cuda", numel, blocksize, type);
  const int t = table_index("quantize_4bit_cuda", type);
  if (numel == 0) return;
  quantize_4bit_kernel<<<grid_for(num_blocks(numel, blocksize), 1), kThreads, 0,
                         static_cast<cudaStream_t>(stream)>>>(x, numel, blocksize, t, packed,
                                                               absmax);
  QLORA_CUDA_CHECK(cudaGetLastError());
}

void dequantize_4bit_cuda(const uint8_t* packed, const float* absmax, int64_t numel,
                          int32_t blocksize, QuantType type, float* out, void* stream) {
  dequantize_cuda("dequantize_4bit_cuda", packed, absmax, numel, blocksize, type, out, stream);
}

void dequantize_4bit_bf16_cuda(const uint8_t* packed, const float* absmax, int64_t numel,
                               int32_t blocksize, QuantType type, uint16_t* out,
                               void* stream) {
  dequantize_cuda("dequantize_4bit_bf16_cuda", packed, absmax, numel, blocksize, type, out,
                  stream);
}

int nccl_linked_version() {
  int version = 0;
  QLORA_NCCL_CHECK(ncclGetVersion(&version));
  return version;
}

int nccl_header_version() { return NCCL_VERSION_CODE; }

}  // namespace qlora::kernels
