// The NCCL communicator (built only with CUDA). Bootstrap over MPI: rank 0 makes the unique id,
// MPI_Bcast hands it out, ncclCommInitRank on `device`. Every collective runs on one dedicated
// communication stream: *_start records an event on libtorch's current stream of the device (the
// compute stream, where the inputs were written), makes the communication stream wait on it,
// enqueues the NCCL call there, records the caching allocator's use of every tensor on that
// stream (so freed memory is not handed to a new tensor while NCCL still reads or writes it) and
// records a completion event. Gathers move bytes (ncclUint8): no float op ever touches packed
// storage.
// Work::wait polls that event and ncclCommGetAsyncError (no blocking CUDA call that could hang):
// an asynchronous NCCL error, a CUDA error or the watchdog's deadline (dist.timeout_s) prints
// which collective (kind, number, step, unit) failed, aborts the NCCL communicator
// (ncclCommAbort) and then the job (MPI_Abort). After wait() returns, work on any stream sees the
// results (the host has seen the event complete).
#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <exception>
#include <iostream>
#include <stdexcept>
#include <string>
#include <thread>
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

// What the handles and the watchdog share with the communicator.
struct NcclShared {
  ncclComm_t comm = nullptr;
  int rank = 0;
  std::atomic<bool> aborted{false};
};

// The end of the job after an NCCL or CUDA failure or a missed deadline: one line, the NCCL
// communicator aborted (its kernels stop spinning, no later call blocks), then MPI_Abort.
[[noreturn]] void nccl_fail(NcclShared& shared, const std::string& line) {
  if (!shared.aborted.exchange(true)) ncclCommAbort(shared.comm);
  job_abort(line + "; the NCCL communicator was aborted, ending the job", 1);
}

std::string seconds_text(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", s);
  return buf;
}

class NcclWork final : public Work::State {
 public:
  NcclWork(std::shared_ptr<NcclShared> shared, cudaEvent_t event, std::vector<at::Tensor> keep)
      : shared_(std::move(shared)), event_(event), keep_(std::move(keep)) {}
  ~NcclWork() override { cudaEventDestroy(event_); }

  bool done() override {
    const cudaError_t err = cudaEventQuery(event_);
    if (err == cudaSuccess) return true;
    if (err != cudaErrorNotReady)
      nccl_fail(*shared_, "nccl: " + describe() + " failed: CUDA error " + cudaGetErrorString(err));
    ncclResult_t async = ncclSuccess;
    const ncclResult_t res = ncclCommGetAsyncError(shared_->comm, &async);
    if (res != ncclSuccess) async = res;
    if (async != ncclSuccess && async != ncclInProgress) {
      const char* last = ncclGetLastError(shared_->comm);
      nccl_fail(*shared_, "nccl: " + describe() + " failed: " + ncclGetErrorString(async) +
                              (last && *last ? std::string(" (") + last + ")" : ""));
    }
    return false;
  }

  // Polls: a few yields first (most waits end within microseconds once the data is there),
  // then sleeps growing to 200 us, so that a long wait costs no core.
  bool block_until(Clock::time_point deadline) override {
    int polls = 0;
    auto pause = std::chrono::microseconds(10);
    while (!done()) {
      if (Clock::now() >= deadline) return false;
      if (++polls < 64) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(pause);
        pause = std::min<std::chrono::microseconds>(2 * pause, std::chrono::microseconds(200));
      }
    }
    return true;
  }
  void block() override { block_until(Clock::time_point::max()); }

 private:
  std::shared_ptr<NcclShared> shared_;
  cudaEvent_t event_;
  std::vector<at::Tensor> keep_;  // the collective's tensors stay referenced until we go
};

ncclDataType_t nccl_type_of(at::ScalarType type) {
  if (type == at::kFloat) return ncclFloat32;
  if (type == at::kDouble) return ncclFloat64;
  if (type == at::kLong) return ncclInt64;
  throw std::invalid_argument(std::string("all_reduce: dtype ") + c10::toString(type) +
                              " is not supported; use float32, float64 or int64");
}

ncclRedOp_t nccl_op_of(ReduceOp op) {
  if (op == ReduceOp::sum) return ncclSum;
  if (op == ReduceOp::max) return ncclMax;
  throw std::invalid_argument("all_reduce: unknown ReduceOp " +
                              std::to_string(static_cast<int>(op)));
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
    QLORA_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &host_comm_));
    DeviceGuard guard(device_);
    shared_->rank = rank_;
    QLORA_NCCL_CHECK(ncclCommInitRank(&shared_->comm, world_size_, id, rank_));
    QLORA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    QLORA_CUDA_CHECK(cudaEventCreateWithFlags(&inputs_ready_, cudaEventDisableTiming));
    QLORA_CUDA_CHECK(cudaMalloc(&barrier_value_, sizeof(int)));
    std::shared_ptr<NcclShared> shared = shared_;
    watchdog_expired_set([shared](const Work::State& waited, double waited_s) {
      const double timeout_s = waited.watchdog ? waited.watchdog->timeout_s : 0.0;
      nccl_fail(*shared, "watchdog: " + waited.describe() + " did not complete within " +
                             "dist.timeout_s = " + seconds_text(timeout_s) + " s (waited " +
                             seconds_text(waited_s) + " s): a rank has not arrived or its GPU " +
                             "stalled (NCCL does not say which rank)");
    });
  }

  // Normally: finish what is queued, then free. While an exception unwinds (the job is about to
  // end) or after a failure, the communicator is aborted instead: a collective the other ranks
  // never join would make the synchronisation hang.
  ~NcclCommunicator() override {
    auto report = [&](cudaError_t err, const char* call) {
      if (err != cudaSuccess)
        std::cerr << "communicator_nccl: " << call << " failed on rank " << rank_ << ": "
                  << cudaGetErrorString(err) << "\n";
    };
    int previous = 0;
    cudaGetDevice(&previous);
    cudaSetDevice(device_);
    const bool unwinding = std::uncaught_exceptions() > 0;
    if (unwinding || shared_->aborted) {
      if (!shared_->aborted.exchange(true)) ncclCommAbort(shared_->comm);
    } else {
      report(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
      const ncclResult_t res = ncclCommDestroy(shared_->comm);
      if (res != ncclSuccess)
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

  // Bytes, whatever the dtype: packed 4-bit storage in a bf16 tensor is copied bit for bit.
  Work all_gather_start(const at::Tensor& shard, const at::Tensor& out) override {
    check_all_gather(shard, out);  // in place (shard = own slot of out) is fine for NCCL too
    require_on_device("all_gather", out);
    const size_t nbytes = shard.nbytes();
    return launch("all_gather", {shard, out}, [&](ncclComm_t comm) {
      return ncclAllGather(shard.data_ptr(), out.data_ptr(), nbytes, ncclUint8, comm, stream_);
    });
  }

  Work reduce_scatter_start(const at::Tensor& in, const at::Tensor& out) override {
    check_reduce_scatter(in, out);
    require_on_device("reduce_scatter", out);
    return launch("reduce_scatter", {in, out}, [&](ncclComm_t comm) {
      return ncclReduceScatter(in.data_ptr(), out.data_ptr(), static_cast<size_t>(out.numel()),
                               ncclFloat32, ncclSum, comm, stream_);
    });
  }

  Work all_reduce_start(const at::Tensor& t, ReduceOp op) override {
    check_all_reduce(t);
    require_on_device("all_reduce", t);
    const ncclDataType_t type = nccl_type_of(t.scalar_type());
    const ncclRedOp_t nccl_op = nccl_op_of(op);
    return launch("all_reduce", {t}, [&](ncclComm_t comm) {
      return ncclAllReduce(t.data_ptr(), t.data_ptr(), static_cast<size_t>(t.numel()), type,
                           nccl_op, comm, stream_);
    });
  }

  Work broadcast_start(const at::Tensor& t, int root) override {
    check_broadcast(t, root);
    require_on_device("broadcast", t);
    return launch("broadcast", {t}, [&](ncclComm_t comm) {
      return ncclBroadcast(t.data_ptr(), t.data_ptr(), t.nbytes(), ncclUint8, root, comm,
                           stream_);
    });
  }

  // A barrier is an all-reduce of one int: it completes only when every rank has reached it.
  Work barrier_start() override {
    return launch("barrier", {}, [&](ncclComm_t comm) {
      return ncclAllReduce(barrier_value_, barrier_value_, 1, ncclInt32, ncclSum, comm, stream_);
    });
  }

  // Host-side agreement (stop signals, metrics, checkpoints) stays on MPI, on a duplicate of
  // MPI_COMM_WORLD: a request tested until done, with the watchdog's deadline.
  void all_reduce_host(double* values, int64_t n, ReduceOp op) override {
    MPI_Request req;
    QLORA_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, values, static_cast<int>(n), MPI_DOUBLE,
                                   op == ReduceOp::sum ? MPI_SUM : MPI_MAX, host_comm_, &req));
    const auto start = std::chrono::steady_clock::now();
    auto pause = std::chrono::microseconds(10);
    for (int done = 0;;) {
      QLORA_MPI_CHECK(MPI_Test(&req, &done, MPI_STATUS_IGNORE));
      if (done) return;
      const double waited =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (timeout() > 0 && waited > timeout())
        nccl_fail(*shared_, "watchdog: the host all-reduce over MPI did not complete within "
                            "dist.timeout_s = " + seconds_text(timeout()) + " s (waited " +
                            seconds_text(waited) + " s): a rank has not arrived");
      std::this_thread::sleep_for(pause);
      pause = std::min<std::chrono::microseconds>(2 * pause, std::chrono::microseconds(1000));
    }
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
  Work launch(const char* kind, std::vector<at::Tensor> keep, Call&& call) {
    if (shared_->aborted) throw std::runtime_error("nccl: the communicator was aborted");
    DeviceGuard guard(device_);
    const c10::cuda::CUDAStream compute =
        c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_));
    // The inputs were written by kernels on the compute stream.
    QLORA_CUDA_CHECK(cudaEventRecord(inputs_ready_, compute.stream()));
    QLORA_CUDA_CHECK(cudaStreamWaitEvent(stream_, inputs_ready_, 0));
    QLORA_NCCL_CHECK(call(shared_->comm));
    const c10::cuda::CUDAStream comm_stream =
        c10::cuda::getStreamFromExternal(stream_, static_cast<c10::DeviceIndex>(device_));
    for (const at::Tensor& t : keep)
      c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), comm_stream);
    cudaEvent_t finished = nullptr;
    QLORA_CUDA_CHECK(cudaEventCreateWithFlags(&finished, cudaEventDisableTiming));
    auto work = std::make_shared<NcclWork>(shared_, finished, std::move(keep));
    QLORA_CUDA_CHECK(cudaEventRecord(finished, stream_));
    stamp(*work, kind);  // the deadline and the names the failure line gives
    return Work(work);
  }

  int rank_;
  int world_size_;
  int device_;
  std::shared_ptr<NcclShared> shared_ = std::make_shared<NcclShared>();
  cudaStream_t stream_ = nullptr;
  cudaEvent_t inputs_ready_ = nullptr;  // re-recorded by every start
  int* barrier_value_ = nullptr;        // [1] on device_
  MPI_Comm host_comm_ = MPI_COMM_NULL;  // all_reduce_host (freed by MPI_Finalize)
};

}  // namespace

std::unique_ptr<Communicator> communicator_nccl(const RankEnv& env, int device) {
  return std::make_unique<NcclCommunicator>(env, device);
}

bool communicator_nccl_available() { return true; }

}  // namespace qlora::dist
