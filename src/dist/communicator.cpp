// Backend-independent parts of the communicator: Work handles (done / wait, with the time the
// caller spends blocked added to the communicator's counter), the argument checks every backend
// runs before queueing, the watchdog's deadline on waits, and, in builds without CUDA, the NCCL
// entry points that say so.
#include "dist/communicator.h"

#include <ATen/ops/from_blob.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <thread>

#include "quant/tensor_io.h"

namespace qlora::dist {
namespace {

std::string describe(const at::Tensor& t) {
  return std::string(c10::toString(t.scalar_type())) + " " + quant::shape_str(t.sizes()) + " on " +
         t.device().str();
}

void require_defined_contiguous(const char* op, const char* name, const at::Tensor& t) {
  if (!t.defined()) throw std::invalid_argument(std::string(op) + ": " + name + " is undefined");
  if (!t.is_contiguous()) {
    throw std::invalid_argument(std::string(op) + ": " + name + " (" + describe(t) + ", strides " +
                                quant::shape_str(t.strides()) + ") must be contiguous");
  }
}

// True when a and b share bytes.
bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (a.nbytes() == 0 || b.nbytes() == 0 || a.device() != b.device()) return false;
  auto a0 = reinterpret_cast<uintptr_t>(a.data_ptr());
  auto b0 = reinterpret_cast<uintptr_t>(b.data_ptr());
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

}  // namespace

bool Work::done() const { return !state_ || state_->done(); }

bool Work::State::block_until(Clock::time_point deadline) {
  auto pause = std::chrono::microseconds(50);
  while (!done()) {
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(pause);
    pause = std::min<std::chrono::microseconds>(2 * pause, std::chrono::milliseconds(2));
  }
  block();  // done: returns at once, or rethrows the collective's error
  return true;
}

std::string Work::State::describe() const {
  std::string s = std::string(kind) + " #" + std::to_string(seq);
  const std::string ctx = context ? *context : std::string();
  if (!ctx.empty() || !detail.empty())
    s += " (" + ctx + (!ctx.empty() && !detail.empty() ? ", " : "") + detail + ")";
  return s;
}

namespace {

std::string seconds_text(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", s);
  return buf;
}

}  // namespace

void Work::wait() {
  if (!state_) return;
  const auto start = State::Clock::now();
  auto account = [&] {
    if (!state_->wait_ns) return;
    auto blocked = State::Clock::now() - start;
    state_->wait_ns->fetch_add(
        std::chrono::duration_cast<std::chrono::nanoseconds>(blocked).count(),
        std::memory_order_relaxed);
  };
  const Watchdog* watchdog = state_->watchdog.get();
  try {
    if (watchdog && watchdog->timeout_s > 0.0) {
      const auto deadline =
          start + std::chrono::duration_cast<State::Clock::duration>(
                      std::chrono::duration<double>(watchdog->timeout_s));
      if (!state_->block_until(deadline)) {
        const double waited = std::chrono::duration<double>(State::Clock::now() - start).count();
        if (watchdog->expired) watchdog->expired(*state_, waited);
        throw std::runtime_error("watchdog: " + state_->describe() + " waited " +
                                 seconds_text(waited) + " s, longer than dist.timeout_s = " +
                                 seconds_text(watchdog->timeout_s));
      }
    } else {
      state_->block();
    }
  } catch (...) {
    account();
    throw;
  }
  account();
}

void Communicator::timeout_set(double seconds) {
  auto next = std::make_shared<Watchdog>(*watchdog_);
  next->timeout_s = seconds;
  watchdog_ = std::move(next);  // handles started earlier keep the deadline they started with
}

void Communicator::watchdog_expired_set(std::function<void(const Work::State&, double)> expired) {
  auto next = std::make_shared<Watchdog>(*watchdog_);
  next->expired = std::move(expired);
  watchdog_ = std::move(next);
}

void Communicator::context_set(std::string context) {
  context_ = std::make_shared<const std::string>(std::move(context));
}

void Communicator::stamp(Work::State& state, const char* kind) {
  state.wait_ns = wait_ns_;
  if (watchdog_->timeout_s > 0.0) state.watchdog = watchdog_;
  state.kind = kind;
  state.seq = ++seq_;
  state.context = context_;
  state.detail = std::move(detail_);
  detail_.clear();
}

void Communicator::all_reduce_host(double* values, int64_t n, ReduceOp op) {
  all_reduce(at::from_blob(values, {n}, at::TensorOptions().dtype(at::kDouble)), op);
}

double Communicator::wait_seconds() const {
  return static_cast<double>(wait_ns_->load(std::memory_order_relaxed)) * 1e-9;
}

void Communicator::wait_seconds_reset() { wait_ns_->store(0, std::memory_order_relaxed); }

bool Communicator::check_all_gather(const at::Tensor& shard, const at::Tensor& out) const {
  require_defined_contiguous("all_gather", "shard", shard);
  require_defined_contiguous("all_gather", "out", out);
  if (shard.scalar_type() != out.scalar_type() || shard.device() != out.device()) {
    throw std::invalid_argument("all_gather: shard (" + describe(shard) + ") and out (" +
                                describe(out) + ") must have the same dtype and device");
  }
  int64_t expected = world_size() * shard.numel();
  if (out.numel() != expected) {
    throw std::invalid_argument("all_gather: out " + describe(out) + " has " +
                                std::to_string(out.numel()) + " elements, expected world_size " +
                                std::to_string(world_size()) + " x shard " +
                                std::to_string(shard.numel()) + " = " + std::to_string(expected));
  }
  // In place: the shard is this rank's own slot of out (how a flat sharded buffer gathers).
  size_t nbytes = shard.nbytes();
  bool in_place = nbytes > 0 && static_cast<const char*>(shard.data_ptr()) ==
                                    static_cast<const char*>(out.data_ptr()) + rank() * nbytes;
  if (!in_place && overlaps(shard, out)) {
    throw std::invalid_argument("all_gather: shard overlaps out but is not rank " +
                                std::to_string(rank()) + "'s own slot out[" +
                                std::to_string(rank()) + "*S : " + std::to_string(rank() + 1) +
                                "*S]");
  }
  return in_place;
}

void Communicator::check_reduce_scatter(const at::Tensor& in, const at::Tensor& out) const {
  require_defined_contiguous("reduce_scatter", "in", in);
  require_defined_contiguous("reduce_scatter", "out", out);
  if (in.scalar_type() != at::kFloat || out.scalar_type() != at::kFloat ||
      in.device() != out.device()) {
    throw std::invalid_argument("reduce_scatter: in (" + describe(in) + ") and out (" +
                                describe(out) + ") must both be float32 on the same device");
  }
  int64_t expected = world_size() * out.numel();
  if (in.numel() != expected) {
    throw std::invalid_argument("reduce_scatter: in " + describe(in) + " has " +
                                std::to_string(in.numel()) + " elements, expected world_size " +
                                std::to_string(world_size()) + " x out " +
                                std::to_string(out.numel()) + " = " + std::to_string(expected));
  }
  if (overlaps(in, out)) throw std::invalid_argument("reduce_scatter: out must not overlap in");
}

void Communicator::check_all_reduce(const at::Tensor& t) const {
  require_defined_contiguous("all_reduce", "t", t);
  at::ScalarType type = t.scalar_type();
  if (type != at::kFloat && type != at::kDouble && type != at::kLong) {
    throw std::invalid_argument("all_reduce: t (" + describe(t) +
                                ") must be float32, float64 or int64");
  }
}

void Communicator::check_broadcast(const at::Tensor& t, int root) const {
  require_defined_contiguous("broadcast", "t", t);
  if (root < 0 || root >= world_size()) {
    throw std::invalid_argument("broadcast: root " + std::to_string(root) +
                                " is not a rank in [0, " + std::to_string(world_size()) + ")");
  }
}

#ifndef QLORA_HAVE_NCCL
std::unique_ptr<Communicator> communicator_nccl(const RankEnv& env, int device) {
  (void)env;
  (void)device;
  throw std::runtime_error("communicator_nccl: this build has no NCCL; use backend = mpi");
}

bool communicator_nccl_available() { return false; }
#endif

}  // namespace qlora::dist
