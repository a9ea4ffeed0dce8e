// The MPI communicator under mpirun -np 1..4: every collective against what each rank can compute
// locally from the known per-rank inputs (bytes and small integers compared exactly), odd shard
// sizes, the split path for large messages, overlap with compute, argument errors, the rank
// environment, and strict mode (outputs NaN until wait(), then equal to normal mode's). Every
// rank runs every test; a failing check must not skip a collective (EXPECT, not ASSERT, once
// collectives have started), or the ranks fall out of step.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "dist/communicator.h"
#include "dist/mpi_main.h"
#include "expect_error.h"

namespace qlora::dist {
namespace {

using qlora::testing::contains;
using qlora::testing::invalid_argument_message;
using qlora::testing::mpi_env;

constexpr int64_t kOddSizes[] = {1, 5, 7, 13};
constexpr int64_t kPadBytes = 64;  // sentinel bytes on each side of every output
constexpr uint8_t kSentinel = 0xA5;

// Rank `rank`'s shard: different bytes for every rank and index, the same on every process.
at::Tensor shard_of(int rank, int64_t numel, at::ScalarType type) {
  at::Tensor i = at::arange(numel, at::kLong);
  if (type == at::kByte) return i.mul(7).add(rank * 31 + 1).remainder(256).to(at::kByte);
  if (type == at::kLong) return i.mul(1000003).add(int64_t{rank} << 40);
  return at::sin(i.to(at::kDouble).mul(0.37).add(rank * 1.5 + 0.1)).mul(100.0).to(type);
}

// A flat uint8 buffer [pad | nbytes | pad], all sentinel bytes; `out` views its middle as `type`.
struct Guarded {
  at::Tensor buffer;
  at::Tensor out;
  Guarded(int64_t numel, at::ScalarType type) {
    int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(type));
    buffer = at::full({nbytes + 2 * kPadBytes}, kSentinel, at::kByte);
    out = buffer.narrow(0, kPadBytes, nbytes).view(type);
  }
  bool pads_intact() const {
    const uint8_t* p = buffer.data_ptr<uint8_t>();
    int64_t total = buffer.numel();
    for (int64_t k = 0; k < kPadBytes; ++k) {
      if (p[k] != kSentinel || p[total - 1 - k] != kSentinel) return false;
    }
    return true;
  }
};

// "" when equal, else the first differing byte.
std::string bytes_diff(const at::Tensor& got, const at::Tensor& want) {
  if (got.nbytes() != want.nbytes()) {
    return "nbytes " + std::to_string(got.nbytes()) + " vs " + std::to_string(want.nbytes());
  }
  auto* a = static_cast<const uint8_t*>(got.data_ptr());
  auto* b = static_cast<const uint8_t*>(want.data_ptr());
  for (size_t k = 0; k < got.nbytes(); ++k) {
    if (a[k] != b[k]) {
      return "byte " + std::to_string(k) + ": got " + std::to_string(a[k]) + ", want " +
             std::to_string(b[k]);
    }
  }
  return "";
}

// Every rank's shard at its offset, byte for byte.
void expect_gathered(const at::Tensor& out, int world_size, int64_t numel, at::ScalarType type) {
  for (int r = 0; r < world_size; ++r) {
    EXPECT_EQ(bytes_diff(out.narrow(0, r * numel, numel), shard_of(r, numel, type)), "")
        << "slot of rank " << r << ", dtype " << type << ", S " << numel;
  }
}

// Rank q's reduce_scatter input, small integers (exact in fp32 sums).
at::Tensor reduce_input_of(int q, int64_t numel) {
  at::Tensor j = at::arange(numel, at::kLong);
  return j.mul(5).add(3).remainder(11).mul(q + 1).sub(7 * q).to(at::kFloat);
}

// Rank q's all_reduce input: small integers (scaled by 2^40 for int64, to need 64 bits).
at::Tensor reduce_value_of(int q, int64_t numel, at::ScalarType type) {
  at::Tensor i = at::arange(numel, at::kLong);
  at::Tensor v = i.mul(3).add(q * 7).remainder(11).sub(5);
  if (type == at::kLong) return v.mul(int64_t{1} << 40).add(q);
  return v.to(type);
}

class CommunicatorTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { comm_ = communicator_mpi(mpi_env()); }
  static void TearDownTestSuite() { comm_.reset(); }
  static Communicator& comm() { return *comm_; }
  static int rank() { return mpi_env().rank; }
  static int world() { return mpi_env().world_size; }

  static std::unique_ptr<Communicator> comm_;
};
std::unique_ptr<Communicator> CommunicatorTest::comm_;

TEST_F(CommunicatorTest, KnowsItsRankAndBackend) {
  EXPECT_EQ(comm().rank(), rank());
  EXPECT_EQ(comm().world_size(), world());
  EXPECT_EQ(comm().backend_name(), "mpi");
}

TEST_F(CommunicatorTest, AllGatherPutsEveryShardAtItsOffset) {
  for (at::ScalarType type : {at::kByte, at::kBFloat16, at::kFloat}) {
    for (int64_t numel : kOddSizes) {
      SCOPED_TRACE(::testing::Message() << "dtype " << type << ", S " << numel);
      at::Tensor shard = shard_of(rank(), numel, type);
      Guarded out(world() * numel, type);
      Work work = comm().all_gather_start(shard, out.out);
      work.wait();
      EXPECT_TRUE(work.done());
      expect_gathered(out.out, world(), numel, type);
      EXPECT_TRUE(out.pads_intact());
    }
  }
}

TEST_F(CommunicatorTest, AllGatherOfAnEmptyShard) {
  at::Tensor shard = at::empty({0}, at::kFloat);
  at::Tensor out = at::empty({0}, at::kFloat);
  comm().all_gather(shard, out);
}

// The flat-buffer case: the shard is this rank's own slot of out.
TEST_F(CommunicatorTest, AllGatherInPlace) {
  for (int64_t numel : kOddSizes) {
    SCOPED_TRACE(::testing::Message() << "S " << numel);
    Guarded out(world() * numel, at::kBFloat16);
    at::Tensor own = out.out.narrow(0, rank() * numel, numel);
    own.copy_(shard_of(rank(), numel, at::kBFloat16));
    comm().all_gather(own, out.out);
    expect_gathered(out.out, world(), numel, at::kBFloat16);
    EXPECT_TRUE(out.pads_intact());
  }
}

TEST_F(CommunicatorTest, ReduceScatterSumsOverRanks) {
  for (int64_t numel : kOddSizes) {
    SCOPED_TRACE(::testing::Message() << "S " << numel);
    at::Tensor in = reduce_input_of(rank(), world() * numel);
    Guarded out(numel, at::kFloat);
    comm().reduce_scatter(in, out.out);
    at::Tensor want = at::zeros({numel}, at::kFloat);
    for (int q = 0; q < world(); ++q) {
      want.add_(reduce_input_of(q, world() * numel).narrow(0, rank() * numel, numel));
    }
    EXPECT_TRUE(at::equal(out.out, want)) << "got " << out.out << "\nwant " << want;
    EXPECT_TRUE(out.pads_intact());
  }
}

TEST_F(CommunicatorTest, AllReduceSumAndMax) {
  const int64_t numel = 13;
  for (at::ScalarType type : {at::kFloat, at::kDouble, at::kLong}) {
    for (ReduceOp op : {ReduceOp::sum, ReduceOp::max}) {
      SCOPED_TRACE(::testing::Message() << "dtype " << type << ", op "
                                        << (op == ReduceOp::sum ? "sum" : "max"));
      at::Tensor t = reduce_value_of(rank(), numel, type);
      comm().all_reduce(t, op);
      at::Tensor want = reduce_value_of(0, numel, type);
      for (int q = 1; q < world(); ++q) {
        at::Tensor v = reduce_value_of(q, numel, type);
        want = op == ReduceOp::sum ? want.add(v) : at::maximum(want, v);
      }
      EXPECT_TRUE(at::equal(t, want)) << "got " << t << "\nwant " << want;
    }
  }
}

TEST_F(CommunicatorTest, BroadcastFromEveryRoot) {
  for (at::ScalarType type : {at::kByte, at::kBFloat16, at::kFloat, at::kDouble}) {
    for (int root = 0; root < world(); ++root) {
      SCOPED_TRACE(::testing::Message() << "dtype " << type << ", root " << root);
      at::Tensor t = shard_of(rank(), 13, type);
      comm().broadcast(t, root);
      EXPECT_EQ(bytes_diff(t, shard_of(root, 13, type)), "");
    }
  }
}

TEST_F(CommunicatorTest, StartedBackToBackWaitedInReverse) {
  const int64_t numel = 7;
  const int root = world() - 1;
  at::Tensor gathered = at::empty({world() * numel}, at::kBFloat16);
  at::Tensor scattered = at::empty({numel}, at::kFloat);
  at::Tensor reduced = reduce_value_of(rank(), numel, at::kDouble);
  at::Tensor broadcast = shard_of(rank(), numel, at::kByte);
  at::Tensor gathered2 = at::empty({world() * 5}, at::kFloat);

  std::vector<Work> works;
  works.push_back(comm().all_gather_start(shard_of(rank(), numel, at::kBFloat16), gathered));
  works.push_back(comm().reduce_scatter_start(reduce_input_of(rank(), world() * numel), scattered));
  works.push_back(comm().all_reduce_start(reduced, ReduceOp::max));
  works.push_back(comm().broadcast_start(broadcast, root));
  works.push_back(comm().barrier_start());
  works.push_back(comm().all_gather_start(shard_of(rank(), 5, at::kFloat), gathered2));
  for (auto it = works.rbegin(); it != works.rend(); ++it) it->wait();
  for (const Work& work : works) EXPECT_TRUE(work.done());

  expect_gathered(gathered, world(), numel, at::kBFloat16);
  expect_gathered(gathered2, world(), 5, at::kFloat);
  at::Tensor want_scattered = at::zeros({numel}, at::kFloat);
  at::Tensor want_reduced = reduce_value_of(0, numel, at::kDouble);
  for (int q = 0; q < world(); ++q) {
    want_scattered.add_(reduce_input_of(q, world() * numel).narrow(0, rank() * numel, numel));
    want_reduced = at::maximum(want_reduced, reduce_value_of(q, numel, at::kDouble));
  }
  EXPECT_TRUE(at::equal(scattered, want_scattered));
  EXPECT_TRUE(at::equal(reduced, want_reduced));
  EXPECT_EQ(bytes_diff(broadcast, shard_of(root, numel, at::kByte)), "");
}

// The communication thread progresses a started collective on its own: the caller computes and
// only polls done(), never wait(), until the 64 MiB gather is complete.
TEST_F(CommunicatorTest, AllGatherProgressesWhileCallerComputes) {
  const int64_t total_nbytes = int64_t{64} << 20;
  const int64_t numel = total_nbytes / world();
  auto fill_of = [](int r) { return static_cast<uint8_t>(r * 37 + 11); };  // per-rank byte
  at::Tensor shard = at::full({numel}, fill_of(rank()), at::kByte);
  at::Tensor out = at::empty({world() * numel}, at::kByte);
  at::Tensor a = at::rand({64, 64});

  Work work = comm().all_gather_start(shard, out);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  int64_t compute_rounds = 0;
  bool finished = work.done();
  while (!finished && std::chrono::steady_clock::now() < deadline) {
    a = at::tanh(at::mm(a, a));  // the "compute" the gather overlaps with
    ++compute_rounds;
    std::this_thread::yield();  // 2 cores for up to 4 ranks and their communication threads
    finished = work.done();
  }
  EXPECT_TRUE(finished) << "the all_gather did not complete within 60 s without wait() ("
                        << compute_rounds << " compute rounds)";
  work.wait();
  EXPECT_TRUE(at::isfinite(a).all().item<bool>());
  for (int r = 0; r < world(); ++r) {
    EXPECT_TRUE(out.narrow(0, r * numel, numel).eq(fill_of(r)).all().item<bool>())
        << "slot of rank " << r;
  }
}

// Bad calls throw on the calling thread and queue nothing, so the ranks stay matched.
TEST_F(CommunicatorTest, ArgumentErrorsThrowInvalidArgument) {
  const int64_t n = 5;
  at::Tensor shard = at::zeros({n}, at::kFloat);
  at::Tensor out = at::zeros({world() * n}, at::kFloat);
  Communicator& c = comm();

  EXPECT_TRUE(contains(invalid_argument_message([&] {
    c.all_gather_start(shard, at::zeros({world() * n + 1}, at::kFloat));
  }), "expected world_size"));
  EXPECT_TRUE(contains(invalid_argument_message([&] {
    c.all_gather_start(shard, at::zeros({world() * n}, at::kBFloat16));
  }), "same dtype"));
  EXPECT_TRUE(contains(invalid_argument_message([&] {
    c.all_gather_start(at::zeros({n, 2}, at::kFloat).select(1, 0), out);
  }), "contiguous"));
  EXPECT_TRUE(contains(invalid_argument_message([&] {
    c.all_gather_start(at::Tensor(), out);
  }), "undefined"));
  if (world() > 1) {  // a shard overlapping out somewhere other than its own slot
    int other = (rank() + 1) % world();
    EXPECT_TRUE(contains(invalid_argument_message([&] {
      c.all_gather_start(out.narrow(0, other * n, n), out);
    }), "own slot"));
  }
  EXPECT_TRUE(contains(invalid_argument_message([&] {
    c.reduce_scatter_start(at::zeros({world() * n}, at::kBFloat16), at::zeros({n}, at::kBFloat16));
  }), "float32"));
  EXPECT_TRUE(contains(invalid_argument_message([&] {
    c.reduce_scatter_start(at::zeros({world() * n + 2}, at::kFloat), shard);
  }), "expected world_size"));
  EXPECT_TRUE(contains(invalid_argument_message([&] {
    c.reduce_scatter_start(out, out.narrow(0, 0, n));
  }), "overlap"));
  EXPECT_TRUE(contains(invalid_argument_message([&] {
    c.all_reduce_start(at::zeros({n}, at::kByte), ReduceOp::sum);
  }), "float32, float64 or int64"));
  EXPECT_TRUE(contains(invalid_argument_message([&] {
    c.all_reduce_start(at::zeros({n, 2}, at::kFloat).t(), ReduceOp::max);
  }), "contiguous"));
  EXPECT_TRUE(contains(invalid_argument_message([&] {
    c.broadcast_start(shard, world());
  }), "root"));
  EXPECT_TRUE(contains(invalid_argument_message([&] {
    c.broadcast_start(shard, -1);
  }), "root"));
  EXPECT_TRUE(contains(invalid_argument_message([&] {
    MpiOptions options;
    options.max_message_nbytes = 0;
    communicator_mpi(mpi_env(), options);
  }), "max_message_nbytes"));
  // Still in step: a collective after the rejected calls matches on every rank.
  at::Tensor one = at::ones({1}, at::kLong);
  c.all_reduce(one, ReduceOp::sum);
  EXPECT_EQ(one.item<int64_t>(), world());
}

TEST_F(CommunicatorTest, WorkHandlesAndWaitTime) {
  Work none;
  EXPECT_TRUE(none.done());
  none.wait();

  comm().wait_seconds_reset();
  EXPECT_EQ(comm().wait_seconds(), 0.0);
  // Rank 0 arrives late, so every other rank blocks in wait() for about that long.
  const double late_seconds = 0.3;
  if (rank() == 0) std::this_thread::sleep_for(std::chrono::duration<double>(late_seconds));
  comm().barrier();
  double waited = comm().wait_seconds();
  EXPECT_GE(waited, 0.0);
  if (rank() != 0) {
    EXPECT_GE(waited, 0.5 * late_seconds);  // a lower bound from the sleep only
  }
  comm().wait_seconds_reset();
  EXPECT_EQ(comm().wait_seconds(), 0.0);
}

// A communicator destroyed with collectives still queued runs them first; the handles outlive it.
TEST_F(CommunicatorTest, DestructionDrainsTheQueue) {
  const int64_t numel = 13;
  auto local = communicator_mpi(mpi_env());
  at::Tensor gathered = at::empty({world() * numel}, at::kFloat);
  at::Tensor summed = reduce_value_of(rank(), numel, at::kLong);
  Work w1 = local->all_gather_start(shard_of(rank(), numel, at::kFloat), gathered);
  Work w2 = local->all_reduce_start(summed, ReduceOp::sum);
  Work w3 = local->barrier_start();
  local.reset();
  EXPECT_TRUE(w1.done() && w2.done() && w3.done());
  w1.wait();
  w2.wait();
  w3.wait();
  expect_gathered(gathered, world(), numel, at::kFloat);
  at::Tensor want = at::zeros({numel}, at::kLong);
  for (int q = 0; q < world(); ++q) want.add_(reduce_value_of(q, numel, at::kLong));
  EXPECT_TRUE(at::equal(summed, want));
}

// Messages split at 7 bytes (so every piece boundary cuts through elements) give the same
// results as whole messages: the path taken above INT_MAX bytes, on small tensors.
TEST_F(CommunicatorTest, LargeMessagePathInPieces) {
  const size_t max_message_nbytes = 7;
  MpiOptions options;
  options.max_message_nbytes = max_message_nbytes;
  auto split = communicator_mpi(mpi_env(), options);
  for (at::ScalarType type : {at::kByte, at::kBFloat16, at::kFloat}) {
    for (int64_t numel : kOddSizes) {
      SCOPED_TRACE(::testing::Message() << "dtype " << type << ", S " << numel);
      Guarded out(world() * numel, type);
      split->all_gather(shard_of(rank(), numel, type), out.out);
      expect_gathered(out.out, world(), numel, type);
      EXPECT_TRUE(out.pads_intact());

      Guarded in_place(world() * numel, type);
      at::Tensor own = in_place.out.narrow(0, rank() * numel, numel);
      own.copy_(shard_of(rank(), numel, type));
      split->all_gather(own, in_place.out);
      expect_gathered(in_place.out, world(), numel, type);
      EXPECT_TRUE(in_place.pads_intact());
    }
  }
  for (int64_t numel : kOddSizes) {
    SCOPED_TRACE(::testing::Message() << "S " << numel);
    Guarded out(numel, at::kFloat);
    split->reduce_scatter(reduce_input_of(rank(), world() * numel), out.out);
    at::Tensor want = at::zeros({numel}, at::kFloat);
    for (int q = 0; q < world(); ++q) {
      want.add_(reduce_input_of(q, world() * numel).narrow(0, rank() * numel, numel));
    }
    EXPECT_TRUE(at::equal(out.out, want));
    EXPECT_TRUE(out.pads_intact());

    at::Tensor t = reduce_value_of(rank(), numel, at::kDouble);
    split->all_reduce(t, ReduceOp::sum);
    at::Tensor want_sum = at::zeros({numel}, at::kDouble);
    for (int q = 0; q < world(); ++q) want_sum.add_(reduce_value_of(q, numel, at::kDouble));
    EXPECT_TRUE(at::equal(t, want_sum));

    const int root = world() - 1;
    at::Tensor b = shard_of(rank(), numel, at::kFloat);
    split->broadcast(b, root);
    EXPECT_EQ(bytes_diff(b, shard_of(root, numel, at::kFloat)), "");
  }
}

TEST_F(CommunicatorTest, RankEnvIsConsistent) {
  const RankEnv& env = mpi_env();
  EXPECT_GE(env.rank, 0);
  EXPECT_LT(env.rank, env.world_size);
  EXPECT_GE(env.local_rank, 0);
  EXPECT_LT(env.local_rank, env.local_world_size);
  EXPECT_LE(env.local_world_size, env.world_size);
  EXPECT_GE(env.thread_level, MPI_THREAD_SERIALIZED);

  // [rank, local_rank, local_world_size] of every rank.
  at::Tensor mine = at::tensor({int64_t{env.rank}, int64_t{env.local_rank},
                                int64_t{env.local_world_size}}, at::kLong);
  at::Tensor all = at::empty({3 * world()}, at::kLong).view({world(), 3});
  comm().all_gather(mine, all.view({-1}));
  std::set<int64_t> local_ranks;
  for (int r = 0; r < world(); ++r) {
    EXPECT_EQ(all[r][0].item<int64_t>(), r) << "ranks are not distinct";
    if (all[r][2].item<int64_t>() == world()) local_ranks.insert(all[r][1].item<int64_t>());
  }
  if (env.local_world_size == world()) {  // one node: local ranks are a permutation of ranks
    EXPECT_EQ(local_ranks.size(), static_cast<size_t>(world()));
  }

  if (std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr) {
    EXPECT_EQ(env.launcher, "mpirun");
    std::vector<std::string> vars = rank_env_launcher_vars();
    std::string want = "OMPI_COMM_WORLD_RANK=" + std::to_string(env.rank);
    bool found = false;
    for (const std::string& v : vars) found = found || v == want;
    EXPECT_TRUE(found) << "rank_env_launcher_vars() lacks " << want;
  }
}

// ------------------------------------------------------------------------------------------
// Strict mode (communicator.h): outputs read 0xFF bytes (NaN) from start until the first wait(),
// which delivers exactly what normal mode gives, into the same storage.

bool all_ff(const at::Tensor& t) {
  return t.numel() == 0 || t.reshape({-1}).view(at::kByte).eq(0xFF).all().item<bool>();
}

// Polls done() (never wait()) until the collective has finished: done() must not deliver.
bool done_within(const Work& work, std::chrono::seconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!work.done()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return true;
}

class StrictCommunicatorTest : public CommunicatorTest {
 protected:
  static void SetUpTestSuite() {
    MpiOptions strict;
    strict.strict = true;
    strict_ = communicator_mpi(mpi_env(), strict);
    MpiOptions normal;
    normal_ = communicator_mpi(mpi_env(), normal);
  }
  static void TearDownTestSuite() {
    strict_.reset();
    normal_.reset();
  }
  static std::unique_ptr<Communicator> strict_;
  static std::unique_ptr<Communicator> normal_;  // strict off whatever QLORA_STRICT_COMM says

  // Starts `start` on the strict communicator with `output` (a view the caller holds); checks
  // that `output` is all 0xFF after start (when `poisoned`), still after done() turned true, and
  // equals `want` byte for byte after wait(), in the same storage.
  static void expect_strict(const char* what, const at::Tensor& output, const at::Tensor& want,
                            bool poisoned, const std::function<Work()>& start) {
    SCOPED_TRACE(what);
    const void* data = output.data_ptr();
    const at::Tensor before = output.clone();
    Work work = start();
    if (poisoned) {
      EXPECT_TRUE(all_ff(output)) << "output before wait(): " << output;
    } else {
      EXPECT_EQ(bytes_diff(output, before), "") << "the root's own tensor changed";
    }
    EXPECT_TRUE(done_within(work, std::chrono::seconds(30))) << "not done within 30 s";
    if (poisoned) {
      EXPECT_TRUE(all_ff(output)) << "done() delivered: " << output;
    }
    work.wait();
    EXPECT_EQ(output.data_ptr(), data);
    EXPECT_EQ(bytes_diff(output, want), "") << "strict: " << output << "\nnormal: " << want;
  }
};
std::unique_ptr<Communicator> StrictCommunicatorTest::strict_;
std::unique_ptr<Communicator> StrictCommunicatorTest::normal_;

TEST_F(StrictCommunicatorTest, AllGatherReadsNaNUntilWait) {
  for (at::ScalarType type : {at::kByte, at::kBFloat16, at::kFloat}) {
    for (int64_t numel : kOddSizes) {
      SCOPED_TRACE(::testing::Message() << "dtype " << type << ", S " << numel);
      at::Tensor shard = shard_of(rank(), numel, type);
      at::Tensor want = at::empty({world() * numel}, type);
      normal_->all_gather(shard, want);
      expect_gathered(want, world(), numel, type);
      Guarded out(world() * numel, type);
      expect_strict("all_gather", out.out, want, true,
                    [&] { return strict_->all_gather_start(shard, out.out); });
      EXPECT_TRUE(out.pads_intact());
      EXPECT_EQ(bytes_diff(shard, shard_of(rank(), numel, type)), "") << "the input changed";
    }
  }
}

// The shard is this rank's slot of out: strict mode copies it away before filling out.
TEST_F(StrictCommunicatorTest, InPlaceAllGatherReadsNaNUntilWait) {
  for (at::ScalarType type : {at::kByte, at::kBFloat16, at::kFloat}) {
    for (int64_t numel : kOddSizes) {
      SCOPED_TRACE(::testing::Message() << "dtype " << type << ", S " << numel);
      at::Tensor want = at::empty({world() * numel}, type);
      want.narrow(0, rank() * numel, numel).copy_(shard_of(rank(), numel, type));
      normal_->all_gather(want.narrow(0, rank() * numel, numel), want);
      expect_gathered(want, world(), numel, type);
      Guarded out(world() * numel, type);
      at::Tensor own = out.out.narrow(0, rank() * numel, numel);
      own.copy_(shard_of(rank(), numel, type));
      expect_strict("in-place all_gather", out.out, want, true,
                    [&] { return strict_->all_gather_start(own, out.out); });
      EXPECT_TRUE(out.pads_intact());
    }
  }
}

TEST_F(StrictCommunicatorTest, ReduceScatterReadsNaNUntilWait) {
  for (int64_t numel : kOddSizes) {
    SCOPED_TRACE(::testing::Message() << "S " << numel);
    at::Tensor in = reduce_input_of(rank(), world() * numel);
    at::Tensor want = at::empty({numel}, at::kFloat);
    normal_->reduce_scatter(in, want);
    Guarded out(numel, at::kFloat);
    expect_strict("reduce_scatter", out.out, want, true,
                  [&] { return strict_->reduce_scatter_start(in, out.out); });
    EXPECT_TRUE(out.pads_intact());
    EXPECT_TRUE(at::equal(in, reduce_input_of(rank(), world() * numel))) << "the input changed";
  }
}

TEST_F(StrictCommunicatorTest, AllReduceReadsNaNUntilWait) {
  const int64_t numel = 13;
  for (at::ScalarType type : {at::kFloat, at::kDouble, at::kLong}) {
    for (ReduceOp op : {ReduceOp::sum, ReduceOp::max}) {
      SCOPED_TRACE(::testing::Message() << "dtype " << type << ", op "
                                        << (op == ReduceOp::sum ? "sum" : "max"));
      at::Tensor want = reduce_value_of(rank(), numel, type);
      normal_->all_reduce(want, op);
      Guarded t(numel, type);
      t.out.copy_(reduce_value_of(rank(), numel, type));
      expect_strict("all_reduce", t.out, want, true,
                    [&] { return strict_->all_reduce_start(t.out, op); });
      EXPECT_TRUE(t.pads_intact());
    }
  }
}

// Receiving ranks read NaN; the root's tensor is an input only and keeps its values.
TEST_F(StrictCommunicatorTest, BroadcastReadsNaNUntilWaitOnReceivers) {
  for (at::ScalarType type : {at::kByte, at::kBFloat16, at::kFloat, at::kDouble}) {
    for (int root = 0; root < world(); ++root) {
      SCOPED_TRACE(::testing::Message() << "dtype " << type << ", root " << root);
      at::Tensor want = shard_of(rank(), 13, type);
      normal_->broadcast(want, root);
      Guarded t(13, type);
      t.out.copy_(shard_of(rank(), 13, type));
      expect_strict("broadcast", t.out, want, rank() != root,
                    [&] { return strict_->broadcast_start(t.out, root); });
      EXPECT_TRUE(t.pads_intact());
    }
  }
}

// Only the first wait delivers (a copy of the handle shares it); a handle dropped unwaited never
// does, even once later collectives finished.
TEST_F(StrictCommunicatorTest, FirstWaitDeliversOnceDroppedHandleNever) {
  const int64_t numel = 7;
  at::Tensor shard = shard_of(rank(), numel, at::kFloat);
  at::Tensor out = at::empty({world() * numel}, at::kFloat);
  Work work = strict_->all_gather_start(shard, out);
  Work copy = work;
  work.wait();
  expect_gathered(out, world(), numel, at::kFloat);
  out.zero_();
  copy.wait();
  work.wait();
  EXPECT_TRUE(at::equal(out, at::zeros_like(out))) << "a second wait delivered again: " << out;

  at::Tensor dropped = at::empty({world() * numel}, at::kFloat);
  strict_->all_gather_start(shard, dropped);  // handle dropped at once
  strict_->barrier();  // FIFO: the gather has finished on this rank's thread
  EXPECT_TRUE(all_ff(dropped)) << dropped;
}

// Several started back to back, waited in reverse: each output NaN until its own wait.
TEST_F(StrictCommunicatorTest, BackToBackEachOutputWaitsForItsOwnWait) {
  const int64_t numel = 5;
  at::Tensor gathered = at::empty({world() * numel}, at::kBFloat16);
  at::Tensor scattered = at::empty({numel}, at::kFloat);
  at::Tensor reduced = reduce_value_of(rank(), numel, at::kDouble);
  Work w1 = strict_->all_gather_start(shard_of(rank(), numel, at::kBFloat16), gathered);
  Work w2 = strict_->reduce_scatter_start(reduce_input_of(rank(), world() * numel), scattered);
  Work w3 = strict_->all_reduce_start(reduced, ReduceOp::sum);
  w3.wait();
  EXPECT_FALSE(all_ff(reduced));
  EXPECT_TRUE(all_ff(gathered) && all_ff(scattered));
  w2.wait();
  EXPECT_FALSE(all_ff(scattered));
  EXPECT_TRUE(all_ff(gathered));
  w1.wait();
  expect_gathered(gathered, world(), numel, at::kBFloat16);
  at::Tensor want_scattered = at::zeros({numel}, at::kFloat);
  at::Tensor want_reduced = at::zeros({numel}, at::kDouble);
  for (int q = 0; q < world(); ++q) {
    want_scattered.add_(reduce_input_of(q, world() * numel).narrow(0, rank() * numel, numel));
    want_reduced.add_(reduce_value_of(q, numel, at::kDouble));
  }
  EXPECT_TRUE(at::equal(scattered, want_scattered));
  EXPECT_TRUE(at::equal(reduced, want_reduced));
}

// QLORA_STRICT_COMM: "1" on, unset / "" / "0" off, anything else refused naming the variable;
// communicator_mpi(env) reads it.
TEST_F(StrictCommunicatorTest, EnvironmentVariable) {
  const char* saved = std::getenv("QLORA_STRICT_COMM");
  const std::string saved_value = saved ? saved : "";
  unsetenv("QLORA_STRICT_COMM");
  EXPECT_FALSE(MpiOptions::from_env().strict);
  for (const char* off : {"", "0"}) {
    setenv("QLORA_STRICT_COMM", off, 1);
    EXPECT_FALSE(MpiOptions::from_env().strict) << "'" << off << "'";
  }
  setenv("QLORA_STRICT_COMM", "yes", 1);
  EXPECT_TRUE(contains(invalid_argument_message([] { MpiOptions::from_env(); }),
                       "QLORA_STRICT_COMM=yes"));
  setenv("QLORA_STRICT_COMM", "1", 1);
  EXPECT_TRUE(MpiOptions::from_env().strict);
  {
    auto from_env = communicator_mpi(mpi_env());
    at::Tensor out = at::empty({world() * 3}, at::kFloat);
    Work work = from_env->all_gather_start(shard_of(rank(), 3, at::kFloat), out);
    EXPECT_TRUE(all_ff(out));
    work.wait();
    expect_gathered(out, world(), 3, at::kFloat);
  }
  if (saved) {
    setenv("QLORA_STRICT_COMM", saved_value.c_str(), 1);
  } else {
    unsetenv("QLORA_STRICT_COMM");
  }
}

// The whole suite also runs with QLORA_STRICT_COMM=1 (ctest dist.test_communicator.strict.*):
// there the suite's communicator is strict, which this checks.
TEST_F(CommunicatorTest, SuiteCommunicatorStrictWhenTheEnvironmentSaysSo) {
  const char* v = std::getenv("QLORA_STRICT_COMM");
  if (!v || std::string(v) != "1") GTEST_SKIP() << "QLORA_STRICT_COMM is not 1";
  at::Tensor out = at::empty({world() * 5}, at::kByte);
  Work work = comm().all_gather_start(shard_of(rank(), 5, at::kByte), out);
  EXPECT_TRUE(all_ff(out));
  work.wait();
  expect_gathered(out, world(), 5, at::kByte);
}

TEST(CommunicatorNccl, AvailableExactlyInCudaBuilds) {
#ifdef QLORA_HAVE_NCCL
  EXPECT_TRUE(communicator_nccl_available());
#else
  EXPECT_FALSE(communicator_nccl_available());
  try {
    communicator_nccl(mpi_env(), 0);
    ADD_FAILURE() << "communicator_nccl did not throw in a build without NCCL";
  } catch (const std::runtime_error& e) {
    EXPECT_TRUE(contains(e.what(), "backend = mpi")) << e.what();
  }
#endif
}

}  // namespace
}  // namespace qlora::dist

QLORA_MPI_GTEST_MAIN()
