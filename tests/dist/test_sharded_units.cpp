// Sharded units on real MPI ranks (np 1-4): every base unit of the tiny model, loaded shard by
// shard from the HDF5 unit file and all-gathered, equals the unit read whole, byte for byte, for
// storage itemsizes 4, 2 and 1 (fp32, bf16, uint8: different padding at each world size); bytes
// read per rank equal the owned ranges; the pipeline's peak matches 1 + prefetch units; a block
// bound from gathered units computes bit for bit what the model loaded whole computes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include <memory>
#include <set>

#include "dist/communicator.h"
#include "dist/sharded_unit.h"
#include "io/temp_dir.h"
#include "model/decoder.h"
#include "model/init_model.h"
#include "mpi_main.h"
#include "train/sharded_model.h"

namespace {

using qlora::testing::mpi_env;

struct Fixture {
  qlora::io::testing::TempDir dir;
  std::string model_dir, h5;
  Fixture() {
    // Every rank writes its own copy (init is deterministic by seed), so no shared file system
    // is assumed.
    model_dir = dir.file("tiny");
    h5 = dir.file("tiny.h5");
    qlora::model::init_model_write(qlora::model::preset_config("tiny"), 3, model_dir);
    qlora::quant::QuantizeOptions q;
    q.double_quant = true;
    auto source = qlora::train::UnitSource::open(model_dir, q);
    qlora::train::units_h5_write(*source, h5);
  }
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

std::unique_ptr<qlora::dist::Communicator>& comm() {
  static std::unique_ptr<qlora::dist::Communicator> c = qlora::dist::communicator_mpi(mpi_env());
  return c;
}

const qlora::dist::DeviceContext& cpu() {
  static const qlora::dist::DeviceContext d(qlora::dist::Device::cpu, at::kFloat, *comm());
  return d;
}

TEST(ShardedUnits, GatherOfShardsEqualsTheWholeUnit) {
  auto source = qlora::train::UnitSource::open(fixture().h5, {});
  const auto layouts = qlora::train::base_units(source->spec());
  for (at::ScalarType storage : {at::kFloat, at::kBFloat16, at::kByte}) {
    qlora::dist::ShardStats stats;
    auto src = qlora::train::UnitSource::open(fixture().h5, {});
    for (const auto& layout : layouts) {
      qlora::dist::ShardedUnit unit(layout, storage, cpu(), /*sharded=*/true, &stats, true);
      const auto [b, e] = unit.owned_bytes();
      src->read(layout, b, e, unit.shard_bytes().data_ptr<uint8_t>());
      auto g = unit.gather_start();
      g.work.wait();
      std::vector<uint8_t> whole(layout.nbytes);
      source->read(layout, 0, layout.nbytes, whole.data());
      const at::Tensor bytes = g.buffer.view(at::kByte);
      ASSERT_EQ(static_cast<size_t>(bytes.numel()), unit.padded_numel() * unit.itemsize());
      const uint8_t* got = bytes.data_ptr<uint8_t>();
      EXPECT_EQ(std::memcmp(got, whole.data(), layout.nbytes), 0)
          << layout.name << " storage " << c10::toString(storage) << " world "
          << mpi_env().world_size;
      for (size_t i = layout.nbytes; i < static_cast<size_t>(bytes.numel()); ++i)
        ASSERT_EQ(got[i], 0) << "padding byte " << i << " of " << layout.name;
      unit.release(g);
    }
    EXPECT_EQ(src->bytes_read(),
              qlora::dist::units_owned_bytes(layouts, c10::elementSize(storage), mpi_env().rank,
                                             mpi_env().world_size))
        << c10::toString(storage);
    EXPECT_EQ(stats.live_gathered_bytes, 0u);
  }
}

TEST(ShardedUnits, PipelinePeakIsOnePlusPrefetchUnits) {
  auto source = qlora::train::UnitSource::open(fixture().h5, {});
  const auto layouts = qlora::train::base_units(source->spec());
  for (int prefetch : {0, 1, 2}) {
    qlora::dist::ShardStats stats;
    std::vector<std::unique_ptr<qlora::dist::ShardedUnit>> units;
    for (const auto& l : layouts)
      units.push_back(std::make_unique<qlora::dist::ShardedUnit>(l, at::kFloat, cpu(), true,
                                                                 &stats, true));
    std::vector<std::vector<qlora::dist::ShardedUnit*>> schedule;
    for (auto& u : units) schedule.push_back({u.get()});
    for (size_t i = units.size() - 2; i >= 1; --i) schedule.push_back({units[i].get()});
    qlora::dist::UnitPipeline pipe(schedule, prefetch);
    size_t worst_window = 0;  // the largest sum of 1 + prefetch consecutive positions
    for (size_t k = 0; k < schedule.size(); ++k) {
      size_t window = 0;
      for (size_t j = k; j < std::min(schedule.size(), k + 1 + prefetch); ++j)
        window += schedule[j][0]->padded_numel() * 4;
      worst_window = std::max(worst_window, window);
      pipe.acquire(k);
      pipe.release(k);
    }
    pipe.drain();
    if (mpi_env().world_size > 1) {
      EXPECT_EQ(stats.peak_gathered_bytes, worst_window) << "prefetch " << prefetch;
    }
    EXPECT_EQ(stats.live_gathered_bytes, 0u);
    EXPECT_EQ(stats.gathers, schedule.size());
  }
}

// The buffers one step of a model with two large units (embed, head) and small blocks needs
// with prefetch 1: the pool makes one large buffer, not a second one for the head while the
// first holds a block or sits free.
TEST(BufferPool, BlocksDoNotTakeTheLargeBuffer) {
  qlora::dist::BufferPool pool(3);
  const at::Device cpu_device(at::kCPU);
  std::set<const void*> large, small;  // distinct allocations seen
  const auto take = [&](int64_t numel) {
    at::Tensor b = pool.acquire(numel, at::kFloat, cpu_device);
    (numel >= 1000 ? large : small).insert(b.storage().data());
    EXPECT_EQ(b.numel(), numel);
    EXPECT_GE(b.storage().nbytes(), static_cast<size_t>(numel) * 4);
    return b;
  };
  // embed, blocks 0..4, head, blocks 4..0 (backward): acquire k + 1 before releasing k.
  std::vector<int64_t> sizes = {1000, 100, 100, 100, 100, 100, 1001, 100, 100, 100, 100, 100};
  for (int step = 0; step < 2; ++step) {
    at::Tensor current = take(sizes[0]);
    for (size_t k = 1; k < sizes.size(); ++k) {
      at::Tensor next = take(sizes[k]);
      pool.give_back(current);
      current = next;
    }
    pool.give_back(current);
  }
  EXPECT_EQ(large.size(), 1u);
  EXPECT_LE(small.size(), 3u);
  // A free buffer of at most twice the request is reused; a larger one is not. 1000 bytes get
  // the size class 1024 (1/32 of 1024 is below the 64-byte granule).
  qlora::dist::BufferPool p2(3);
  at::Tensor a = p2.acquire(1000, at::kByte, cpu_device);
  EXPECT_EQ(a.storage().nbytes(), 1024u);
  const void* a_data = a.storage().data();
  p2.give_back(a);
  a = at::Tensor();
  at::Tensor b = p2.acquire(511, at::kByte, cpu_device);
  EXPECT_NE(b.storage().data(), a_data);
  at::Tensor c = p2.acquire(512, at::kByte, cpu_device);
  EXPECT_EQ(c.storage().data(), a_data);
}

TEST(ShardedUnits, BoundBlockComputesWhatTheWholeModelComputes) {
  at::set_num_threads(1);
  qlora::model::LoadOptions lo;
  lo.quant.double_quant = true;
  const qlora::model::DecoderModel whole = qlora::model::DecoderModel::load(fixture().model_dir, lo);
  auto source = qlora::train::UnitSource::open(fixture().h5, {});
  qlora::model::DecoderModel m = qlora::model::DecoderModel::skeleton(source->spec().config, lo);
  const auto layouts = qlora::train::base_units(source->spec());
  at::Tensor x = at::randn({2, 5, 256}, at::TensorOptions().dtype(at::kFloat));
  comm()->broadcast(x, 0);
  for (int64_t i = 0; i < m.num_blocks(); ++i) {
    qlora::dist::ShardedUnit unit(layouts[static_cast<size_t>(i + 1)], at::kFloat, cpu(), true,
                                  nullptr, true);
    const auto [b, e] = unit.owned_bytes();
    source->read(unit.layout(), b, e, unit.shard_bytes().data_ptr<uint8_t>());
    const std::vector<float> offsets = qlora::train::block_nested_offsets(
        source->spec(), unit.layout(),
        [&](size_t begin, size_t end, uint8_t* out) { source->read(unit.layout(), begin, end, out); });
    auto g = unit.gather_start();
    g.work.wait();
    qlora::train::bind_block(m, i, source->spec(), unit, g.buffer, offsets, nullptr, at::Tensor(), {});
    at::AutoGradMode no_grad(false);
    EXPECT_TRUE(at::equal(m.block_forward(i, x), whole.block_forward(i, x))) << "block " << i;
    qlora::train::unbind_block(m, i);
    unit.release(g);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int status = [&] {
    try {
      qlora::testing::mpi_env() = qlora::dist::rank_env_init(&argc, &argv);
    } catch (const std::exception& e) {
      qlora::dist::job_abort(e.what(), 2);
    }
    ::testing::InitGoogleTest(&argc, argv);
    if (mpi_env().rank != 0) {
      auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
      delete listeners.Release(listeners.default_result_printer());
    }
    int failed = RUN_ALL_TESTS() != 0 ? 1 : 0, any = 0;
    MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    return any;
  }();
  comm().reset();  // before MPI_Finalize
  qlora::dist::rank_env_finalize();
  return status;
}
