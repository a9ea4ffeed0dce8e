// The NCCL communicator (built only with CUDA; plain C++ against the CUDA runtime and NCCL).
// Bootstrap over MPI: rank 0 makes the unique id, MPI_Bcast hands it out, ncclCommInitRank on
// `device`. Every collective runs on one communication stream: *_start records an event on the
// legacy default stream (where libtorch enqueues by default, so the inputs are ready), makes the
// communication stream wait on it, enqueues the NCCL call there and records a completion event.
// Work::wait blocks the HOST on that event (cudaEventSynchronize, with blocking sync so the
// thread sleeps); after it, work on any stream sees the results.
#include <ATen/ATen.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include <iostream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cuda_check.h"
#include "dist/communicator.h"

namespace qlora::dist {
namespace {


// Selects `device` for the calling thread and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    QLORA_CUDA_CHECK(cudaGetDevice(&previous_));
    QLORA_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

class NcclWork final : public Work::State {
 public:
  NcclWork(cudaEvent_t event, std::vector<at::Tensor> keep)
      : event_(event), keep_(std::move(keep)) {}
  ~NcclWork() override { cudaEventDestroy(event_); }  // released once the event has completed
  bool done() override {
    cudaError_t err = cudaEventQuery(event_);
    if (err == cudaErrorNotReady) return false;
    QLORA_CUDA_CHECK(err);
    return true;
  }
  void block() override { QLORA_CUDA_CHECK(cudaEventSynchronize(event_)); }

 private:
  cudaEvent_t event_;
  std::vector<at::Tensor> keep_;  // the collective's tensors stay allocated until we go
};

ncclDataType_t nccl_type_of(at::ScalarType type) {
  if (type == at::kFloat) {
    return ncclFloat32;
  } else if (type == at::kDouble) {
    return ncclFloat64;
  } else if (type == at::kLong) {
    return ncclInt64;
  } else {
    throw std::invalid_argument(std::string("all_reduce: dtype ") + c10::toString(type) +
                                " is not supported; use float32, float64 or int64");
  }
}

ncclRedOp_t nccl_op_of(ReduceOp op) {
  if (op == ReduceOp::sum) {
    return ncclSum;
  } else if (op == ReduceOp::max) {
    return ncclMax;
  } else {
    throw std::invalid_argument("all_reduce: unknown ReduceOp " +
                                std::to_string(static_cast<int>(op)));
  }
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(const RankEnv& env, int device)
      : rank_(env.rank), world_size_(env.world_size), device_(device) {
    int device_count = 0;
    QLORA_CUDA_CHECK(cudaGetDeviceCount(&device_count));
    if (device < 0 || device >= device_count) {
      throw std::invalid_argument("communicator_nccl: device " + std::to_string(device) +
                                  " does not exist (this node has " +
                                  std::to_string(device_count) + " GPUs)");
    }
    ncclUniqueId id;
    if (rank_ == 0) QLORA_NCCL_CHECK(ncclGetUniqueId(&id));
    QLORA_MPI_CHECK(MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD));
    DeviceGuard guard(device_);
    QLORA_NCCL_CHECK(ncclCommInitRank(&comm_, world_size_, id, rank_));
    QLORA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    QLORA_CUDA_CHECK(cudaEventCreateWithFlags(&inputs_ready_, cudaEventDisableTiming));
    QLORA_CUDA_CHECK(cudaMalloc(&barrier_value_, sizeof(int)));
  }

  ~NcclCommunicator() override {
    // Destructors do not throw: report and go on.
    auto report = [&](cudaError_t err, const char* call) {
      if (err != cudaSuccess) {
        std::cerr << "communicator_nccl: " << call << " failed on rank " << rank_ << ": "
                  << cudaGetErrorString(err) << "\n";
      }
    };
    int previous = 0;
    cudaGetDevice(&previous);
    cudaSetDevice(device_);
    report(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    ncclResult_t res = ncclCommDestroy(comm_);
    if (res != ncclSuccess) {
      std::cerr << "communicator_nccl: ncclCommDestroy failed on rank " << rank_ << ": "
                << ncclGetErrorString(res) << "\n";
    }
    report(cudaFree(barrier_value_), "cudaFree");
    report(cudaEventDestroy(inputs_ready_), "cudaEventDestroy");
    report(cudaStreamDestroy(stream_), "cudaStreamDestroy");
    cudaSetDevice(previous);
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  std::string backend_name() const override { return "nccl"; }

  Work all_gather_start(const at::Tensor& shard, const at::Tensor& out) override {
    check_all_gather(shard, out);  // in place (shard = own slot of out) is fine for NCCL too
    require_on_device("all_gather", out);
    size_t nbytes = shard.nbytes();
    return launch({shard, out}, [&] {
      return ncclAllGather(shard.data_ptr(), out.data_ptr(), nbytes, ncclUint8, comm_, stream_);
    });
  }

  Work reduce_scatter_start(const at::Tensor& in, const at::Tensor& out) override {
    check_reduce_scatter(in, out);
    require_on_device("reduce_scatter", out);
    return launch({in, out}, [&] {
      return ncclReduceScatter(in.data_ptr(), out.data_ptr(), static_cast<size_t>(out.numel()),
                               ncclFloat32, ncclSum, comm_, stream_);
    });
  }

  Work all_reduce_start(const at::Tensor& t, ReduceOp op) override {
    check_all_reduce(t);
    require_on_device("all_reduce", t);
    ncclDataType_t type = nccl_type_of(t.scalar_type());
    ncclRedOp_t nccl_op = nccl_op_of(op);
    return launch({t}, [&] {
      return ncclAllReduce(t.data_ptr(), t.data_ptr(), static_cast<size_t>(t.numel()), type,
                           nccl_op, comm_, stream_);
    });
  }

  Work broadcast_start(const at::Tensor& t, int root) override {
    check_broadcast(t, root);
    require_on_device("broadcast", t);
    return launch({t}, [&] {
      return ncclBroadcast(t.data_ptr(), t.data_ptr(), t.nbytes(), ncclUint8, root, comm_,
                           stream_);
    });
  }

  // A barrier is an all-reduce of one int: it completes only when every rank has reached it.
  Work barrier_start() override {
    return launch({}, [&] {
      return ncclAllReduce(barrier_value_, barrier_value_, 1, ncclInt32, ncclSum, comm_, stream_);
    });
  }

 private:
  void require_on_device(const char* op, const at::Tensor& t) const {
    if (!t.is_cuda() || t.device().index() != device_) {
      throw std::invalid_argument(std::string(op) + ": tensor on " + t.device().str() +
                                  ", the NCCL communicator works on cuda:" +
                                  std::to_string(device_));
    }
  }

  template <typename Call>
  Work launch(std::vector<at::Tensor> keep, Call&& call) {
    DeviceGuard guard(device_);
    // The inputs were written by kernels on the legacy default stream.
    QLORA_CUDA_CHECK(cudaEventRecord(inputs_ready_, cudaStreamLegacy));
    QLORA_CUDA_CHECK(cudaStreamWaitEvent(stream_, inputs_ready_, 0));
    QLORA_NCCL_CHECK(call());
    cudaEvent_t finished = nullptr;
    QLORA_CUDA_CHECK(
        cudaEventCreateWithFlags(&finished, cudaEventDisableTiming | cudaEventBlockingSync));
    auto work = std::make_shared<NcclWork>(finished, std::move(keep));
    QLORA_CUDA_CHECK(cudaEventRecord(finished, stream_));
    stamp(*work, "nccl collective");  // the deadline: a timed-out wait throws, the job aborts
    return Work(work);
  }

  int rank_;
  int world_size_;
  int device_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t inputs_ready_ = nullptr;  // re-recorded by every start
  int* barrier_value_ = nullptr;        // [1] on device_
};

}  // namespace

std::unique_ptr<Communicator> communicator_nccl(const RankEnv& env, int device) {
  return std::make_unique<NcclCommunicator>(env, device);
}

bool communicator_nccl_available() { return true; }

}  // namespace qlora::dist
