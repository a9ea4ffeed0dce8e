// Gather + dequantize of one sharded unit, the work the trainer does before every block runs:
// all_gather the ranks' shards of a LLaMA-7B-sized block unit (hidden 4096, intermediate 11008:
// 202M 4-bit weights, NF4 blocksize 64 with double quantization, ~101 MB) over MPI, then
// dequantize its seven linears to fp32 one after another into one reused buffer.
// Run under mpirun; rank 0 prints one row. Rates: gather = bytes each rank receives per second;
// dequantize = fp32 bytes written per second; memcpy of the unit's bytes on one rank for scale.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

#include "dist/communicator.h"
#include "dist/rank_env.h"
#include "dist/sharded_unit.h"
#include "lora/lora_linear.h"
#include "model/init_model.h"
#include "quant/quantize.h"
#include "train/sharded_model.h"

namespace {
using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }
}  // namespace

int main(int argc, char** argv) {
  qlora::dist::RankEnv env = qlora::dist::rank_env_init(&argc, &argv);
  {
    at::set_num_threads(1);
    const int reps = argc > 1 ? std::atoi(argv[1]) : 5;
    qlora::train::UnitsSpec spec;
    spec.config = qlora::model::preset_config("tiny");
    auto& c = spec.config;
    c.hidden_size = 4096;
    c.intermediate_size = 11008;
    c.num_attention_heads = 32;
    c.num_key_value_heads = 32;
    c.head_dim = 128;
    c.num_hidden_layers = 1;
    c.vocab_size = 32;
    spec.quant.double_quant = true;
    const qlora::dist::UnitLayout layout = qlora::train::base_units(spec)[1];

    // The same pseudo-random unit on every rank (codes and scale codes uniform; fp32 pieces sane).
    at::Tensor whole = at::randint(0, 256, {static_cast<int64_t>(layout.nbytes)},
                                   at::TensorOptions().dtype(at::kByte));
    for (const auto& s : layout.segments) {
      if (s.kind == qlora::dist::SegmentKind::nested_absmax ||
          s.kind == qlora::dist::SegmentKind::tensor || s.kind == qlora::dist::SegmentKind::nested_offset)
        qlora::dist::byte_view(whole, s.offset, s.nbytes, at::kFloat, {-1}).fill_(0.01f);
    }
    auto comm = qlora::dist::communicator_mpi(env);
    qlora::dist::ShardStats stats;
    qlora::dist::BufferPool pool;
    qlora::dist::DeviceContext device(qlora::dist::Device::cpu, at::kFloat, *comm);
    qlora::dist::ShardedUnit unit(layout, at::kFloat, device, true, &stats, true, &pool);
    const std::vector<float> offsets = qlora::train::block_nested_offsets(
        spec, layout, [&](size_t b, size_t e, uint8_t* out) {
          std::memcpy(out, whole.data_ptr<uint8_t>() + b, e - b);
        });
    const auto [b, e] = unit.owned_bytes();
    std::memcpy(unit.shard_bytes().data_ptr<uint8_t>(), whole.data_ptr<uint8_t>() + b, e - b);

    at::Tensor out = at::empty({c.intermediate_size * c.hidden_size}, at::kFloat);
    double t_gather = 1e30, t_deq = 1e30;
    size_t deq_bytes = 0;
    for (int r = 0; r < reps; ++r) {
      comm->barrier();
      auto t0 = Clock::now();
      auto g = unit.gather_start();
      g.work.wait();
      t_gather = std::min(t_gather, since(t0));
      qlora::model::DecoderModel m = qlora::model::DecoderModel::skeleton(c, {});
      qlora::train::bind_block(m, 0, spec, unit, g.buffer, offsets, nullptr, at::Tensor(), {});
      t0 = Clock::now();
      deq_bytes = 0;
      for (auto& l : m.block(0).linears) {
        const int64_t n = l.out_features() * l.in_features();
        qlora::quant::dequantize_4bit_into(l.base().packed, l.base().state, out.narrow(0, 0, n));
        deq_bytes += static_cast<size_t>(n) * 4;
      }
      t_deq = std::min(t_deq, since(t0));
      unit.release(g);
    }
    // memcpy of the whole unit on one rank: the local bandwidth scale.
    std::vector<uint8_t> dst(layout.nbytes);
    double t_copy = 1e30;
    for (int r = 0; r < reps; ++r) {
      auto t0 = Clock::now();
      std::memcpy(dst.data(), whole.data_ptr<uint8_t>(), layout.nbytes);
      t_copy = std::min(t_copy, since(t0));
    }
    const double received = static_cast<double>(unit.padded_numel() - unit.shard_numel()) * 4;
    if (env.rank == 0) {
      std::printf("np %d  unit %.1f MB  gather %.1f ms (%.2f GB/s received per rank)  "
                  "dequantize %.1f ms (%.2f GB/s fp32 written)  gather+dequantize %.1f ms  "
                  "memcpy of the unit %.1f ms (%.2f GB/s)\n",
                  env.world_size, layout.nbytes / 1e6, t_gather * 1e3,
                  env.world_size > 1 ? received / t_gather / 1e9 : 0.0, t_deq * 1e3,
                  deq_bytes / t_deq / 1e9, (t_gather + t_deq) * 1e3, t_copy * 1e3,
                  layout.nbytes / t_copy / 1e9);
    }
  }
  qlora::dist::rank_env_finalize();
  return 0;
}
