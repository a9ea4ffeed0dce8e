// The MPI communicator: a duplicate of MPI_COMM_WORLD and one communication thread that runs the
// queued collectives with blocking MPI calls, strictly in the order they were started. Every rank
// starts the same collectives in the same order, so FIFO order keeps the ranks matched, and the
// caller computes while the thread sits in MPI. Device tensors go through host copies.
//   all_gather:     MPI_Allgather of bytes           reduce_scatter: MPI_Reduce_scatter_block (fp32)
//   all_reduce:     MPI_Allreduce, in place          broadcast:      MPI_Bcast of bytes
// MPI counts are int: a message above max_message_nbytes runs in pieces (all_gather with a
// datatype whose extent is the whole shard, so piece k of every rank lands at its own offset).
// Watchdog side channel (see communicator.h): an MPI window of two int64 per rank, opened for
// passive access once (MPI_Win_lock_all): [0] the number of the collective the communication
// thread last entered, [1] a heartbeat a small thread bumps every 100 ms. A rank whose wait
// passes the deadline reads every rank's pair twice, 0.5 s apart (MPI_Rget, itself bounded): a
// rank behind the stuck collective had not arrived; a rank whose heartbeat stood still is not
// running (stopped, or its node stalled); a rank whose read never completed did not answer.
// Nothing of this costs the step: a local store per collective, no MPI call until a deadline.
// Without MPI_THREAD_MULTIPLE, or where the window cannot be made, the message says so.
// Strict mode (communicator.h): at start, on the caller's thread, the output is copied away where
// it is also an input (in-place gather, all_reduce, broadcast), then filled with 0xFF bytes; the
// thread runs the same code on a private buffer; the first wait() copies it into the output.
#include <ATen/ATen.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdio>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <exception>
#include <functional>
#include <iostream>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "dist/communicator.h"
#include "dist/device_context.h"

namespace qlora::dist {
namespace {

// Completed by the communication thread; waited on by the caller.
class MpiWork final : public Work::State {
 public:
  bool done() override {
    std::lock_guard<std::mutex> lock(mu_);
    return finished_;
  }
  // block() and block_until() run on the waiting thread (Work::wait): the strict delivery too.
  void block() override {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return finished_; });
    if (error_) std::rethrow_exception(error_);
    deliver_locked();
  }
  bool block_until(Clock::time_point deadline) override {
    std::unique_lock<std::mutex> lock(mu_);
    if (!cv_.wait_until(lock, deadline, [&] { return finished_; })) return false;
    if (error_) std::rethrow_exception(error_);
    deliver_locked();
    return true;
  }
  // Strict mode: the first wait copies `result` (written by the communication thread) into
  // `output` (filled with 0xFF bytes at start). Set before the task is queued.
  void delivery_set(at::Tensor result, at::Tensor output) {
    result_ = std::move(result);
    output_ = std::move(output);
  }
  // A handle dropped unwaited leaves its output NaN: say which, once per process, unless an
  // exception is unwinding (the job is ending anyway).
  ~MpiWork() override {
    if (!result_.defined() || !finished_ || error_ || std::uncaught_exceptions() > 0) return;
    static std::atomic<bool> reported{false};
    if (reported.exchange(true)) return;
    std::cerr << "communicator_mpi (strict): " + describe() +
                     " was dropped without wait(); its output stays NaN\n";
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
  at::Tensor result_;  // strict mode: [same as output] private, until delivered
  at::Tensor output_;  // the caller's output tensor

  void deliver_locked() {
    if (!result_.defined()) return;
    output_.copy_(result_);
    result_ = at::Tensor();
    output_ = at::Tensor();
  }
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
  std::shared_ptr<MpiWork> running;  // guarded by mu: the task the thread is inside
  MPI_Comm comm = MPI_COMM_NULL;
  // The watchdog's window (MPI_WIN_NULL: none): slots[0] entered, slots[1] heartbeat.
  MPI_Win win = MPI_WIN_NULL;
  int64_t* slots = nullptr;
  std::condition_variable heartbeat_cv;
  bool heartbeat_stop = false;  // guarded by mu
};

// Bumps slots[1] every 100 ms until stopped: other ranks' watchdogs see this process run.
void heartbeat_run(const std::shared_ptr<Queue>& queue) {
  pthread_setname_np(pthread_self(), "qlora-heartbeat");
  std::unique_lock<std::mutex> lock(queue->mu);
  while (!queue->heartbeat_cv.wait_for(lock, std::chrono::milliseconds(100),
                                       [&] { return queue->heartbeat_stop; }))
    __atomic_fetch_add(&queue->slots[1], 1, __ATOMIC_RELAXED);
}

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
      queue->running = task.work;
    }
    if (queue->slots) __atomic_store_n(&queue->slots[0], task.work->seq, __ATOMIC_RELAXED);
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
      queue->running = nullptr;
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

std::string seconds_text(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", s);
  return buf;
}

std::string ranks_text(const std::vector<int>& ranks) {
  std::string s = ranks.size() == 1 ? "rank " : "ranks ";
  for (size_t i = 0; i < ranks.size(); ++i) s += (i ? ", " : "") + std::to_string(ranks[i]);
  return s;
}

// Every rank's two watchdog slots into `out` [2 * world_size]; answered[q] is false where the
// read did not complete within `limit` (a rank whose MPI cannot serve it: stopped, or MPI
// emulates one-sided access with messages the target must progress).
void slots_read(const Queue& q, int rank, int world_size, std::vector<int64_t>& out,
                std::vector<char>& answered, std::chrono::duration<double> limit) {
  using Clock = std::chrono::steady_clock;
  out.assign(2 * static_cast<size_t>(world_size), -1);
  answered.assign(static_cast<size_t>(world_size), 0);
  std::vector<MPI_Request> reqs(static_cast<size_t>(world_size), MPI_REQUEST_NULL);
  for (int r = 0; r < world_size; ++r) {
    if (r == rank) {
      out[2 * r] = __atomic_load_n(&q.slots[0], __ATOMIC_RELAXED);
      out[2 * r + 1] = __atomic_load_n(&q.slots[1], __ATOMIC_RELAXED);
      answered[r] = 1;
    } else if (MPI_Rget(&out[2 * r], 2, MPI_INT64_T, r, 0, 2, MPI_INT64_T, q.win, &reqs[r]) !=
               MPI_SUCCESS) {
      reqs[r] = MPI_REQUEST_NULL;
    }
  }
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(limit);
  for (;;) {
    bool pending = false;
    for (int r = 0; r < world_size; ++r) {
      if (reqs[r] == MPI_REQUEST_NULL) continue;
      int done = 0;
      if (MPI_Test(&reqs[r], &done, MPI_STATUS_IGNORE) != MPI_SUCCESS) {
        reqs[r] = MPI_REQUEST_NULL;  // an error: counts as no answer
      } else if (done) {
        answered[r] = 1;
      } else {
        pending = true;
      }
    }
    if (!pending || Clock::now() >= deadline) return;  // unfinished reads are left: we abort
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

// Which ranks had not arrived at collective `stuck`, which are not running, which did not
// answer; "" when every rank arrived and runs.
std::string arrivals_text(const Queue& q, int rank, int world_size, int64_t stuck) {
  if (q.win == MPI_WIN_NULL)
    return "which ranks had not arrived is unknown (the watchdog window needs "
           "MPI_THREAD_MULTIPLE and MPI one-sided communication)";
  constexpr double kGap = 0.5;  // seconds between the two reads (5 heartbeats)
  std::vector<int64_t> first, second;
  std::vector<char> answered1, answered2;
  const auto t0 = std::chrono::steady_clock::now();
  slots_read(q, rank, world_size, first, answered1, std::chrono::duration<double>(1.0));
  std::this_thread::sleep_until(t0 + std::chrono::milliseconds(static_cast<int>(kGap * 1000)));
  slots_read(q, rank, world_size, second, answered2, std::chrono::duration<double>(1.0));
  std::vector<int> behind, behind_stopped, stopped, silent;
  for (int r = 0; r < world_size; ++r) {
    if (!answered1[r] || !answered2[r]) {
      silent.push_back(r);
      continue;
    }
    const bool running = second[2 * r + 1] != first[2 * r + 1];
    if (second[2 * r] < stuck) {
      (running ? behind : behind_stopped).push_back(r);
    } else if (!running) {
      stopped.push_back(r);
    }
  }
  std::vector<std::string> parts;
  if (!behind_stopped.empty())
    parts.push_back(ranks_text(behind_stopped) +
                    " had not arrived and is not running (no heartbeat for " +
                    seconds_text(kGap) + " s: stopped, or its node stalled)");
  if (!behind.empty())
    parts.push_back(ranks_text(behind) + " had not arrived (still running: busy elsewhere)");
  if (!stopped.empty())
    parts.push_back(ranks_text(stopped) + " arrived but is not running (no heartbeat for " +
                    seconds_text(kGap) + " s: stopped, or its node stalled)");
  if (!silent.empty())
    parts.push_back(ranks_text(silent) + " did not answer the watchdog's read (stopped or "
                                         "unreachable)");
  std::string text;
  for (size_t i = 0; i < parts.size(); ++i) text += (i ? "; " : "") + parts[i];
  return text;
}

// The watchdog's end: one line on stderr, then the whole job ends (MPI_Abort via job_abort).
[[noreturn]] void watchdog_abort(Queue& q, int rank, int world_size,
                                 const Work::State& waited, double waited_s, double timeout_s) {
  std::string stuck = waited.describe();
  int64_t stuck_seq = waited.seq;
  {
    std::lock_guard<std::mutex> lock(q.mu);
    if (q.running && q.running->seq != waited.seq) {  // the queue is behind: an earlier one hangs
      stuck = q.running->describe() + " (this rank waits on " + waited.describe() + ")";
      stuck_seq = q.running->seq;
    }
  }
  std::string arrivals = arrivals_text(q, rank, world_size, stuck_seq);
  if (arrivals.empty())
    arrivals = "every rank arrived and is running (stuck inside MPI or the network?)";
  job_abort("watchdog: " + stuck + " did not complete within dist.timeout_s = " +
                seconds_text(timeout_s) + " s (waited " + seconds_text(waited_s) + " s); " +
                arrivals + "; ending the job",
            1);
}

at::Tensor host_empty_like(const at::Tensor& t) {
  return at::empty(t.sizes(), DeviceContext::host_options(t.scalar_type()));
}

// Strict mode: every byte 0xFF (a quiet NaN in fp32, bf16, fp16 and fp64; -1 in integers).
void poison(const at::Tensor& t) {
  if (t.numel() > 0) t.reshape({-1}).view(at::kByte).fill_(0xFF);
}

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(const RankEnv& env, const MpiOptions& options)
      : max_nbytes_(options.max_message_nbytes),
        strict_(options.strict),
        queue_(std::make_shared<Queue>()),
        uncaught_at_start_(std::uncaught_exceptions()) {
    if (max_nbytes_ == 0 || max_nbytes_ > static_cast<size_t>(INT_MAX)) {
      throw std::invalid_argument("communicator_mpi: max_message_nbytes " +
                                  std::to_string(max_nbytes_) + " must be in [1, INT_MAX]");
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
    watchdog_window_open(env);
    thread_ = std::thread(queue_run, queue_);
    if (queue_->win != MPI_WIN_NULL) heartbeat_ = std::thread(heartbeat_run, queue_);
    std::shared_ptr<Queue> queue = queue_;
    const int rank = rank_, world_size = world_size_;
    watchdog_expired_set([queue, rank, world_size](const Work::State& waited, double waited_s) {
      const double timeout_s = waited.watchdog ? waited.watchdog->timeout_s : 0.0;
      watchdog_abort(*queue, rank, world_size, waited, waited_s, timeout_s);
    });
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
      queue_->heartbeat_stop = true;
      if (unwinding) {
        dropped.swap(queue_->tasks);
        leave_thread = queue_->busy;
      }
    }
    queue_->cv.notify_all();
    queue_->heartbeat_cv.notify_all();
    if (heartbeat_.joinable()) heartbeat_.join();
    for (Task& task : dropped) {
      task.work->finish(std::make_exception_ptr(std::runtime_error(
          "collective not run: its communicator was destroyed while an exception propagated")));
    }
    if (leave_thread) {
      thread_.detach();  // it holds queue_; MPI_Abort or exit ends it
      return;
    }
    thread_.join();
    // MPI_Win_free synchronizes the ranks: while unwinding the others may sit in a collective,
    // so the window is left to MPI_Abort then.
    if (queue_->win != MPI_WIN_NULL && !unwinding) {
      MPI_Win_unlock_all(queue_->win);
      MPI_Win_free(&queue_->win);
    }
    int err = MPI_Comm_free(&queue_->comm);
    if (err != MPI_SUCCESS) std::cerr << "communicator_mpi: MPI_Comm_free failed (" << err << ")\n";
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  std::string backend_name() const override { return "mpi"; }

  Work all_gather_start(const at::Tensor& shard_arg, const at::Tensor& out_arg) override {
    bool in_place = check_all_gather(shard_arg, out_arg);
    size_t nbytes = shard_arg.nbytes();
    bool staged = !out_arg.device().is_cpu();
    int rank = rank_;
    size_t max_nbytes = max_nbytes_;
    at::Tensor shard = shard_arg, out = out_arg;  // what the thread reads and writes
    if (strict_) {
      out = at::empty_like(out_arg);
      if (in_place) {  // the shard is a slot of out_arg: move it to the same slot of ours
        shard = out.view({-1}).narrow(0, rank * shard_arg.numel(), shard_arg.numel());
        shard.copy_(shard_arg.view({-1}));
      }
      poison(out_arg);
    }
    return enqueue("all_gather", out, out_arg, [=](MPI_Comm comm) {
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

  Work reduce_scatter_start(const at::Tensor& in, const at::Tensor& out_arg) override {
    check_reduce_scatter(in, out_arg);
    bool staged = !out_arg.device().is_cpu();
    int rank = rank_;
    int world_size = world_size_;
    size_t max_nbytes = max_nbytes_;
    at::Tensor out = out_arg;  // what the thread writes
    if (strict_) {
      out = at::empty_like(out_arg);
      poison(out_arg);
    }
    return enqueue("reduce_scatter", out, out_arg, [=](MPI_Comm comm) {
      at::Tensor host_in = staged ? DeviceContext::to_host(in) : in;
      at::Tensor host_out = staged ? host_empty_like(out) : out;
      reduce_scatter_floats(comm, rank, world_size, host_in.data_ptr<float>(),
                            host_out.data_ptr<float>(), out.numel(), max_nbytes);
      if (staged) out.copy_(host_out);
    });
  }

  Work all_reduce_start(const at::Tensor& t_arg, ReduceOp op) override {
    check_all_reduce(t_arg);
    MPI_Datatype type = mpi_type_of(t_arg.scalar_type());
    MPI_Op mpi_op = mpi_op_of(op);
    bool staged = !t_arg.device().is_cpu();
    int64_t max_numel =
        std::max<int64_t>(1, static_cast<int64_t>(max_nbytes_ / t_arg.element_size()));
    at::Tensor t = t_arg;  // what the thread reduces in place
    if (strict_) {
      t = t_arg.clone(at::MemoryFormat::Contiguous);
      poison(t_arg);
    }
    return enqueue("all_reduce", t, t_arg, [=](MPI_Comm comm) {
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

  Work broadcast_start(const at::Tensor& t_arg, int root) override {
    check_broadcast(t_arg, root);
    bool staged = !t_arg.device().is_cpu();
    bool receives = root != rank_;
    size_t max_nbytes = max_nbytes_;
    at::Tensor t = t_arg;  // what the thread sends or receives; an output on receiving ranks only
    if (strict_ && receives) {
      t = at::empty_like(t_arg);
      poison(t_arg);
    }
    return enqueue("broadcast", t, t_arg, [=](MPI_Comm comm) {
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
    return enqueue("barrier", at::Tensor(), at::Tensor(),
                   [](MPI_Comm comm) { QLORA_MPI_CHECK(MPI_Barrier(comm)); });
  }

 private:
  // The watchdog's window (see the top of this file); left MPI_WIN_NULL when MPI cannot make it.
  void watchdog_window_open(const RankEnv& env) {
    if (world_size_ == 1 || env.thread_level < MPI_THREAD_MULTIPLE) return;
    int64_t* base = nullptr;
    if (MPI_Win_allocate(2 * sizeof(int64_t), sizeof(int64_t), MPI_INFO_NULL, queue_->comm, &base,
                         &queue_->win) != MPI_SUCCESS) {
      queue_->win = MPI_WIN_NULL;
      return;
    }
    base[0] = 0;
    base[1] = 0;
    MPI_Win_set_errhandler(queue_->win, MPI_ERRORS_RETURN);
    if (MPI_Win_lock_all(MPI_MODE_NOCHECK, queue_->win) != MPI_SUCCESS) {
      MPI_Win_free(&queue_->win);
      queue_->win = MPI_WIN_NULL;
      return;
    }
    queue_->slots = base;
  }

  // `result` / `output`: the tensor the thread writes and the caller's output; different only in
  // strict mode, where the first wait() copies one into the other.
  Work enqueue(const char* kind, const at::Tensor& result, const at::Tensor& output,
               std::function<void(MPI_Comm)> run) {
    auto work = std::make_shared<MpiWork>();
    stamp(*work, kind);
    if (result.defined() && !result.is_same(output)) work->delivery_set(result, output);
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
  bool strict_;
  std::shared_ptr<Queue> queue_;
  int uncaught_at_start_;
  std::thread thread_;
  std::thread heartbeat_;
};

}  // namespace

MpiOptions MpiOptions::from_env() {
  MpiOptions options;
  const char* v = std::getenv("QLORA_STRICT_COMM");
  const std::string value = v ? v : "";
  if (value == "1") {
    options.strict = true;
  } else if (!value.empty() && value != "0") {
    throw std::invalid_argument("QLORA_STRICT_COMM=" + value +
                                ": must be 1 (strict communicator) or 0 / unset (normal)");
  }
  return options;
}

std::unique_ptr<Communicator> communicator_mpi(const RankEnv& env) {
  const MpiOptions options = MpiOptions::from_env();
  auto comm = communicator_mpi(env, options);
  if (options.strict && env.rank == 0)
    std::cerr << "communicator_mpi: strict mode (QLORA_STRICT_COMM=1): outputs of collectives "
                 "read NaN until wait()\n";
  return comm;
}

std::unique_ptr<Communicator> communicator_mpi(const RankEnv& env, const MpiOptions& options) {
  return std::make_unique<MpiCommunicator>(env, options);
}

}  // namespace qlora::dist
