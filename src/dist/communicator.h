// Collectives between the ranks of a job, each in a blocking and a non-blocking form: the
// non-blocking one returns a Work handle at once and the collective progresses while the
// caller computes. Every rank must start the same collectives in the same order (as with MPI).
// Between *_start and wait() the caller must not write the inputs nor read the outputs; the
// started collective keeps its tensors alive.
//   all_gather:     out[r*S : (r+1)*S] = shard of rank r            (any dtype, bytes copied)
//   reduce_scatter: out[0:S] = sum over ranks q of in_q[r*S : (r+1)*S]   (fp32)
//   all_reduce:     t = op over ranks of t (in place; fp32, fp64, int64; sum or max)
//   broadcast:      t = t of `root` (in place, any dtype)
// Implementations: MPI (always; a communication thread runs the blocking MPI calls in order, so
// collectives overlap with compute; device tensors are staged through host memory) and NCCL
// (compiled when CUDA is built; one communication stream that waits for libtorch's current
// stream, unique id sent by MPI_Bcast; Work::wait polls the completion event and NCCL's
// asynchronous error; all_reduce_host stays on MPI; see communicator_nccl.cpp).
// Strict mode of the MPI communicator (QLORA_STRICT_COMM=1, or MpiOptions::strict): proves the
// discipline above, on which the NCCL path depends (NCCL writes outputs asynchronously on its own
// stream). Every output (the gather / reduce-scatter destination, the all_reduce tensor, the
// broadcast tensor on the receiving ranks) is filled with 0xFF bytes at start (NaN in fp32, bf16,
// fp16, fp64; packed bytes read as NaN once viewed as floats), the collective writes a private
// buffer, and only the first Work::wait() on the handle, on the waiting thread, copies the result
// in (same tensor and storage: views stay valid). done() never copies, so polling done() and then
// reading reads NaN, as does reading after dropping a handle unwaited. Writes to inputs before
// wait() are not detected.
// Watchdog ([dist] timeout_s): with timeout_set(T > 0) every Work::wait on the communicator's
// handles has the deadline start + T; a wait that passes it never returns: the backend reports
// which collective (kind, number, the caller's context) and which ranks had not arrived, then
// ends the job (MPI_Abort). A blocked MPI call cannot be interrupted, so the waiting side keeps
// the deadline (a condition-variable wait with a timeout: no polling cost while it runs).
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "dist/rank_env.h"

namespace qlora::dist {

enum class ReduceOp { sum, max };

// The completion of one non-blocking collective. wait() blocks until it is done (and rethrows
// an error it met); done() never blocks. Default-constructed handles are already done.
class Work {
 public:
  struct State;  // defined below; each backend derives its own
  Work() = default;
  explicit Work(std::shared_ptr<State> state) : state_(std::move(state)) {}
  bool done() const;
  void wait();

 private:
  std::shared_ptr<State> state_;
};

// The deadline of a communicator's waits: `expired` is called by the waiting thread when a wait
// lasted longer than timeout_s; it reports and ends the job. Should it return, Work::wait throws
// std::runtime_error with the same facts (a unit test does that).
struct Watchdog {
  double timeout_s = 0.0;  // <= 0: no deadline
  std::function<void(const Work::State& state, double waited_s)> expired;
};

// What a backend puts behind a Work handle (MPI: completed by the communication thread; NCCL: a
// CUDA event). Work::wait times block() into the owning communicator's counter.
struct Work::State {
  using Clock = std::chrono::steady_clock;
  virtual ~State() = default;
  virtual bool done() = 0;   // never blocks
  virtual void block() = 0;  // returns once done; rethrows the error the collective met
  // block() with a deadline: false when `deadline` passed before the collective finished. The
  // default polls done() with sleeps growing from 50 us to 2 ms.
  virtual bool block_until(Clock::time_point deadline);
  std::string describe() const;  // "all_gather #57 (step 3, gather of block.2)"
  std::shared_ptr<std::atomic<int64_t>> wait_ns;  // the communicator's counter (may be null)
  std::shared_ptr<const Watchdog> watchdog;       // null: no deadline
  const char* kind = "collective";                // all_gather, reduce_scatter, ...
  int64_t seq = 0;  // 1-based number in the communicator's order (the same on every rank)
  std::shared_ptr<const std::string> context;  // Communicator::context_set when it started
  std::string detail;                          // Communicator::detail_set when it started
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual std::string backend_name() const = 0;  // "mpi" or "nccl"

  // Shapes: shard [S] (contiguous), out [world_size * S], same dtype and device.
  virtual Work all_gather_start(const at::Tensor& shard, const at::Tensor& out) = 0;
  // in [world_size * S] fp32, out [S] fp32 (contiguous, same device).
  virtual Work reduce_scatter_start(const at::Tensor& in, const at::Tensor& out) = 0;
  virtual Work all_reduce_start(const at::Tensor& t, ReduceOp op) = 0;
  virtual Work broadcast_start(const at::Tensor& t, int root) = 0;
  virtual Work barrier_start() = 0;

  void all_gather(const at::Tensor& shard, const at::Tensor& out) {
    all_gather_start(shard, out).wait();
  }
  void reduce_scatter(const at::Tensor& in, const at::Tensor& out) {
    reduce_scatter_start(in, out).wait();
  }
  void all_reduce(const at::Tensor& t, ReduceOp op) { all_reduce_start(t, op).wait(); }
  void broadcast(const at::Tensor& t, int root) { broadcast_start(t, root).wait(); }
  void barrier() { barrier_start().wait(); }
  // all_reduce of `n` host values in place (scalars of the step loop: norms, counts, flags). The
  // MPI backend reduces them directly; a device backend may stage them.
  virtual void all_reduce_host(double* values, int64_t n, ReduceOp op);

  // Seconds the calling thread has spent blocked in Work::wait() on this communicator's handles.
  // Virtual so that a wrapper (e.g. one counting bytes) can report its inner communicator's.
  virtual double wait_seconds() const;
  virtual void wait_seconds_reset();

  // The watchdog's deadline in seconds for every later wait (<= 0: none, the default). Set before
  // starting collectives, from the thread that starts them.
  void timeout_set(double seconds);
  double timeout() const { return watchdog_->timeout_s; }
  // What the caller is doing, named in the watchdog's message: `context` for every collective
  // started from now on ("step 12"), `detail` for the next one only ("gather of block.3").
  // Cheap: a shared string per context_set, a moved string per detail_set.
  void context_set(std::string context);
  void detail_set(std::string detail) { detail_ = std::move(detail); }

 protected:
  // Fills the watchdog fields of a new handle (kind, next number, context, detail); backends call
  // it for every collective they start.
  void stamp(Work::State& state, const char* kind);
  void watchdog_expired_set(std::function<void(const Work::State&, double)> expired);

  // Argument checks shared by the backends, run on the calling thread before anything is queued
  // (so a bad call leaves the ranks matched): std::invalid_argument saying what is wrong.
  // check_all_gather returns true when `shard` is this rank's own slot of `out` (in place).
  bool check_all_gather(const at::Tensor& shard, const at::Tensor& out) const;
  void check_reduce_scatter(const at::Tensor& in, const at::Tensor& out) const;
  void check_all_reduce(const at::Tensor& t) const;  // contiguous; fp32, fp64 or int64
  void check_broadcast(const at::Tensor& t, int root) const;

  // Nanoseconds blocked in Work::wait(); shared with the handles, which may outlive us.
  std::shared_ptr<std::atomic<int64_t>> wait_ns_ = std::make_shared<std::atomic<int64_t>>(0);

 private:
  std::shared_ptr<Watchdog> watchdog_ = std::make_shared<Watchdog>();
  std::shared_ptr<const std::string> context_ = std::make_shared<const std::string>();
  std::string detail_;
  int64_t seq_ = 0;
};

struct MpiOptions {
  // MPI counts are int, so a collective over more bytes than this runs in pieces (tests pass a few
  // bytes to run the split path on small tensors). In [1, INT_MAX].
  size_t max_message_nbytes = size_t{1} << 30;
  bool strict = false;  // strict mode (see the top of this file)
  // The defaults, with strict from QLORA_STRICT_COMM ("1": on; unset, "" or "0": off; anything
  // else: std::invalid_argument naming the variable).
  static MpiOptions from_env();
};

// A duplicate of MPI_COMM_WORLD with its communication thread (stopped and joined on
// destruction, after the queued collectives finish), with MpiOptions::from_env(); rank 0 prints
// one line on stderr when that turns strict mode on.
std::unique_ptr<Communicator> communicator_mpi(const RankEnv& env);
std::unique_ptr<Communicator> communicator_mpi(const RankEnv& env, const MpiOptions& options);

// NCCL on `device` (one GPU per local rank: device = local_rank), bootstrapped over MPI. Only in
// builds with CUDA (QLORA_HAVE_NCCL); elsewhere std::runtime_error saying so.
std::unique_ptr<Communicator> communicator_nccl(const RankEnv& env, int device);
bool communicator_nccl_available();

}  // namespace qlora::dist
