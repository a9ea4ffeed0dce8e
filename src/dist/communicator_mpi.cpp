// The MPI communicator: a duplicate of MPI_COMM_WORLD and one communication thread that runs the
// queued collectives with blocking MPI calls, strictly in the order they were started. Every rank
// starts the same collectives in the same order, so FIFO order keeps the ranks matched, and the
// caller computes while the thread sits in MPI. Device tensors go through host copies.
//   all_gather:     MPI_Allgather of bytes           reduce_scatter: MPI_Reduce_scatter_block (fp32)
//   all_reduce:     MPI_Allreduce, in place          broadcast:      MPI_Bcast of bytes
// MPI counts are int: a message above max_message_nbytes runs in pieces (all_gather with a
// datatype whose extent is the whole shard, so piece k of every rank lands at its own offset).
#include <ATen/ATen.h>
#include <pthread.h>

#include <algorithm>
#include <climits>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <iostream>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

#include "dist/communicator.h"
#include "dist/device_context.h"

namespace qlora::dist {
namespace {

constexpr size_t kDefaultMaxMessageBytes = size_t{1} << 30;

// Completed by the communication thread; waited on by the caller.
class MpiWork final : public Work::State {
 public:
  bool done() override {
    std::lock_guard<std::mutex> lock(mu_);
    return finished_;
  }
  void block() override {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return finished_; });
    if (error_) std::rethrow_exception(error_);
  }
  void finish(std::exception_ptr error) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      error_ = std::move(error);
      finished_ = true;
    }
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool finished_ = false;
  std::exception_ptr error_;
};

// A started collective: what the thread runs (holding its tensors alive) and whom it tells.
struct Task {
  std::function<void(MPI_Comm)> run;
  std::shared_ptr<MpiWork> work;
};

// Shared by the communicator and its thread, so that a thread left blocked in MPI while an
// exception unwinds (see ~MpiCommunicator) never touches a destroyed object.
struct Queue {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Task> tasks;  // guarded by mu
  bool stop = false;       // guarded by mu
  bool busy = false;       // guarded by mu: the thread is inside a task
  MPI_Comm comm = MPI_COMM_NULL;
};

void queue_run(const std::shared_ptr<Queue>& queue) {
  pthread_setname_np(pthread_self(), "qlora-mpi-comm");
  for (;;) {
    Task task;
    {
      std::unique_lock<std::mutex> lock(queue->mu);
      queue->cv.wait(lock, [&] { return queue->stop || !queue->tasks.empty(); });
      if (queue->tasks.empty()) return;  // stop requested and drained
      task = std::move(queue->tasks.front());
      queue->tasks.pop_front();
      queue->busy = true;
    }
    std::exception_ptr error;
    try {
      task.run(queue->comm);
    } catch (...) {
      error = std::current_exception();
    }
    task.run = nullptr;  // drop the tensors before the waiter returns
    {
      std::lock_guard<std::mutex> lock(queue->mu);
      queue->busy = false;
    }
    task.work->finish(std::move(error));
  }
}

// A committed MPI datatype freed on scope exit.
struct TypeGuard {
  MPI_Datatype type = MPI_DATATYPE_NULL;
  ~TypeGuard() {
    if (type != MPI_DATATYPE_NULL) MPI_Type_free(&type);
  }
};

// recv[r*nbytes : (r+1)*nbytes] = send of rank r; send == nullptr: in place (own part already in
// recv).
void all_gather_bytes(MPI_Comm comm, const char* send, char* recv, size_t nbytes,
                      size_t max_nbytes) {
  if (nbytes <= max_nbytes) {
    int count = static_cast<int>(nbytes);
    QLORA_MPI_CHECK(MPI_Allgather(send ? send : MPI_IN_PLACE, count, MPI_BYTE, recv, count,
                                  MPI_BYTE, comm));
    return;
  }
  for (size_t offset = 0; offset < nbytes; offset += max_nbytes) {
    size_t piece_nbytes = std::min(max_nbytes, nbytes - offset);
    TypeGuard piece;
    TypeGuard strided;  // piece_nbytes bytes, extent nbytes: rank r's piece at r * nbytes
    QLORA_MPI_CHECK(MPI_Type_contiguous(static_cast<int>(piece_nbytes), MPI_BYTE, &piece.type));
    QLORA_MPI_CHECK(MPI_Type_create_resized(piece.type, 0, static_cast<MPI_Aint>(nbytes),
                                            &strided.type));
    QLORA_MPI_CHECK(MPI_Type_commit(&strided.type));
    QLORA_MPI_CHECK(MPI_Allgather(send ? send + offset : MPI_IN_PLACE,
                                  static_cast<int>(piece_nbytes), MPI_BYTE, recv + offset, 1,
                                  strided.type, comm));
  }
}

// out[0:numel] = sum over ranks q of in_q[rank*numel : (rank+1)*numel].
void reduce_scatter_floats(MPI_Comm comm, int rank, int world_size, const float* in, float* out,
                           int64_t numel, size_t max_nbytes) {
  int64_t max_numel = std::max<int64_t>(1, static_cast<int64_t>(max_nbytes / sizeof(float)));
  if (numel <= max_numel) {
    QLORA_MPI_CHECK(MPI_Reduce_scatter_block(in, out, static_cast<int>(numel), MPI_FLOAT, MPI_SUM,
                                             comm));
    return;
  }
  // Too large for one call: one reduce per destination rank and piece.
  for (int root = 0; root < world_size; ++root) {
    for (int64_t offset = 0; offset < numel; offset += max_numel) {
      int count = static_cast<int>(std::min(max_numel, numel - offset));
      QLORA_MPI_CHECK(MPI_Reduce(in + root * numel + offset, root == rank ? out + offset : nullptr,
                                 count, MPI_FLOAT, MPI_SUM, root, comm));
    }
  }
}

MPI_Datatype mpi_type_of(at::ScalarType type) {
  if (type == at::kFloat) {
    return MPI_FLOAT;
  } else if (type == at::kDouble) {
    return MPI_DOUBLE;
  } else if (type == at::kLong) {
    return MPI_INT64_T;
  } else {
    throw std::invalid_argument(std::string("all_reduce: dtype ") + c10::toString(type) +
                                " is not supported; use float32, float64 or int64");
  }
}

MPI_Op mpi_op_of(ReduceOp op) {
  if (op == ReduceOp::sum) {
    return MPI_SUM;
  } else if (op == ReduceOp::max) {
    return MPI_MAX;
  } else {
    throw std::invalid_argument("all_reduce: unknown ReduceOp " +
                                std::to_string(static_cast<int>(op)));
  }
}

at::Tensor host_empty_like(const at::Tensor& t) {
  return at::empty(t.sizes(), DeviceContext::host_options(t.scalar_type()));
}

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(const RankEnv& env, size_t max_message_nbytes)
      : max_nbytes_(max_message_nbytes),
        queue_(std::make_shared<Queue>()),
        uncaught_at_start_(std::uncaught_exceptions()) {
    if (max_message_nbytes == 0 || max_message_nbytes > static_cast<size_t>(INT_MAX)) {
      throw std::invalid_argument("communicator_mpi: max_message_nbytes " +
                                  std::to_string(max_message_nbytes) + " must be in [1, INT_MAX]");
    }
    QLORA_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &queue_->comm));
    // Errors on this communicator become exceptions (rethrown by Work::wait) instead of
    // Open MPI's default abort, so the message says which collective failed.
    QLORA_MPI_CHECK(MPI_Comm_set_errhandler(queue_->comm, MPI_ERRORS_RETURN));
    QLORA_MPI_CHECK(MPI_Comm_rank(queue_->comm, &rank_));
    QLORA_MPI_CHECK(MPI_Comm_size(queue_->comm, &world_size_));
    if (rank_ != env.rank || world_size_ != env.world_size) {
      throw std::invalid_argument("communicator_mpi: RankEnv says rank " +
                                  std::to_string(env.rank) + " of " +
                                  std::to_string(env.world_size) + ", MPI_COMM_WORLD rank " +
                                  std::to_string(rank_) + " of " + std::to_string(world_size_));
    }
    thread_ = std::thread(queue_run, queue_);
  }

  // Normally: run what is queued, stop and join the thread, free the communicator. While an
  // exception unwinds (the job is about to end through job_abort) the queued collectives are
  // dropped and a thread blocked in MPI is left behind, so that this rank reaches MPI_Abort even
  // when the other ranks will never join that collective.
  ~MpiCommunicator() override {
    bool unwinding = std::uncaught_exceptions() > uncaught_at_start_;
    std::deque<Task> dropped;
    bool leave_thread = false;
    {
      std::lock_guard<std::mutex> lock(queue_->mu);
      queue_->stop = true;
      if (unwinding) {
        dropped.swap(queue_->tasks);
        leave_thread = queue_->busy;
      }
    }
    queue_->cv.notify_all();
    for (Task& task : dropped) {
      task.work->finish(std::make_exception_ptr(std::runtime_error(
          "collective not run: its communicator was destroyed while an exception propagated")));
    }
    if (leave_thread) {
      thread_.detach();  // it holds queue_; MPI_Abort or exit ends it
      return;
    }
    thread_.join();
    int err = MPI_Comm_free(&queue_->comm);
    if (err != MPI_SUCCESS) std::cerr << "communicator_mpi: MPI_Comm_free failed (" << err << ")\n";
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  std::string backend_name() const override { return "mpi"; }

  Work all_gather_start(const at::Tensor& shard, const at::Tensor& out) override {
    bool in_place = check_all_gather(shard, out);
    size_t nbytes = shard.nbytes();
    bool staged = !out.device().is_cpu();
    int rank = rank_;
    size_t max_nbytes = max_nbytes_;
    return enqueue([=](MPI_Comm comm) {
      at::Tensor host_out = staged ? host_empty_like(out) : out;
      at::Tensor host_shard;
      if (in_place && staged) {
        host_out.view({-1}).narrow(0, rank * shard.numel(), shard.numel()).copy_(shard.view({-1}));
      } else if (!in_place) {
        host_shard = staged ? DeviceContext::to_host(shard) : shard;
      }
      all_gather_bytes(comm, in_place ? nullptr : static_cast<const char*>(host_shard.data_ptr()),
                       static_cast<char*>(host_out.data_ptr()), nbytes, max_nbytes);
      if (staged) out.copy_(host_out);
    });
  }

  Work reduce_scatter_start(const at::Tensor& in, const at::Tensor& out) override {
    check_reduce_scatter(in, out);
    bool staged = !out.device().is_cpu();
    int rank = rank_;
    int world_size = world_size_;
    size_t max_nbytes = max_nbytes_;
    return enqueue([=](MPI_Comm comm) {
      at::Tensor host_in = staged ? DeviceContext::to_host(in) : in;
      at::Tensor host_out = staged ? host_empty_like(out) : out;
      reduce_scatter_floats(comm, rank, world_size, host_in.data_ptr<float>(),
                            host_out.data_ptr<float>(), out.numel(), max_nbytes);
      if (staged) out.copy_(host_out);
    });
  }

  Work all_reduce_start(const at::Tensor& t, ReduceOp op) override {
    check_all_reduce(t);
    MPI_Datatype type = mpi_type_of(t.scalar_type());
    MPI_Op mpi_op = mpi_op_of(op);
    bool staged = !t.device().is_cpu();
    int64_t max_numel = std::max<int64_t>(1, static_cast<int64_t>(max_nbytes_ / t.element_size()));
    return enqueue([=](MPI_Comm comm) {
      at::Tensor host = staged ? DeviceContext::to_host(t) : t;
      auto* data = static_cast<char*>(host.data_ptr());
      int64_t numel = host.numel();
      for (int64_t offset = 0; offset == 0 || offset < numel; offset += max_numel) {
        int count = static_cast<int>(std::min(max_numel, numel - offset));  // 0 for numel 0
        QLORA_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, data + offset * host.element_size(), count,
                                      type, mpi_op, comm));
      }
      if (staged) t.copy_(host);
    });
  }

  Work broadcast_start(const at::Tensor& t, int root) override {
    check_broadcast(t, root);
    bool staged = !t.device().is_cpu();
    bool receives = root != rank_;
    size_t max_nbytes = max_nbytes_;
    return enqueue([=](MPI_Comm comm) {
      at::Tensor host = staged ? DeviceContext::to_host(t) : t;
      auto* data = static_cast<char*>(host.data_ptr());
      size_t nbytes = host.nbytes();
      for (size_t offset = 0; offset == 0 || offset < nbytes; offset += max_nbytes) {
        int count = static_cast<int>(std::min(max_nbytes, nbytes - offset));  // 0 for nbytes 0
        QLORA_MPI_CHECK(MPI_Bcast(data + offset, count, MPI_BYTE, root, comm));
      }
      if (staged && receives) t.copy_(host);
    });
  }

  Work barrier_start() override {
    return enqueue([](MPI_Comm comm) { QLORA_MPI_CHECK(MPI_Barrier(comm)); });
  }

 private:
  Work enqueue(std::function<void(MPI_Comm)> run) {
    auto work = std::make_shared<MpiWork>();
    work->wait_ns = wait_ns_;
    {
      std::lock_guard<std::mutex> lock(queue_->mu);
      queue_->tasks.push_back(Task{std::move(run), work});
    }
    queue_->cv.notify_one();
    return Work(work);
  }

  int rank_ = 0;
  int world_size_ = 1;
  size_t max_nbytes_;
  std::shared_ptr<Queue> queue_;
  int uncaught_at_start_;
  std::thread thread_;
};

}  // namespace

std::unique_ptr<Communicator> communicator_mpi(const RankEnv& env) {
  return communicator_mpi(env, kDefaultMaxMessageBytes);
}

std::unique_ptr<Communicator> communicator_mpi(const RankEnv& env, size_t max_message_nbytes) {
  return std::make_unique<MpiCommunicator>(env, max_message_nbytes);
}

}  // namespace qlora::dist
