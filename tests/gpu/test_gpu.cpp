// GPU tests (ctest label gpu). Each test skips with one line where no GPU is visible (a CPU
// machine, a build without CUDA), and never fails for that reason. Run on a GPU machine through
// scripts/gpu_check.sh.
//   - CUDA dequantize is byte-identical to the CPU reference: NF4 and FP4, every blocksize,
//     double quantization on and off, fp32 / bf16 / fp16 output.
//   - A QLoRA linear and a whole decoder block (forward and LoRA gradients, fp32) on the GPU
//     against the same on the CPU.
//   - The NCCL communicator on one rank: all_gather of bytes, reduce_scatter, all_reduce,
//     broadcast, barrier, and the host all-reduce of the step loop.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "dist/communicator.h"
#include "dist/device_context.h"
#include "dist/rank_env.h"
#include "lora/lora_linear.h"
#include "model/decoder.h"
#include "model/init_model.h"
#include "model_test_util.h"
#include "quant/quantize.h"
#include "temp_dir.h"

namespace qlora {
namespace {

#define QLORA_REQUIRE_GPU()                                                  \
  do {                                                                       \
    const dist::GpuVisibility v = dist::gpus_visible();                      \
    if (v.count == 0) GTEST_SKIP() << "no GPU visible: " << v.reason;        \
  } while (0)

const at::Device kGpu(at::kCUDA, 0);

quant::QuantState state_to(const quant::QuantState& s, at::Device d) {
  quant::QuantState out = s;
  out.absmax = s.absmax.to(d);
  out.code = s.code.to(d);
  if (s.nested) {
    out.nested->absmax = s.nested->absmax.to(d);
    out.nested->code = s.nested->code.to(d);
  }
  return out;
}

quant::Quantized quantized_to(const quant::Quantized& q, at::Device d) {
  return {q.packed.to(d), state_to(q.state, d)};
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kCPU, at::kDouble) - b.to(at::kCPU, at::kDouble)).abs().max().item<double>();
}
double max_abs(const at::Tensor& a) { return a.to(at::kCPU, at::kDouble).abs().max().item<double>(); }

TEST(GpuDequantize, ByteIdenticalToTheCpuReference) {
  QLORA_REQUIRE_GPU();
  at::manual_seed(0);
  // 37 x 129 = 4773 elements: not a multiple of any blocksize, so the last block is partial.
  const at::Tensor w = at::randn({37, 129}) * 0.05;
  int checked = 0;
  for (const char* type : {"nf4", "fp4"}) {
    for (int32_t bs = 32; bs <= 4096; bs *= 2) {
      for (bool dq : {false, true}) {
        quant::QuantizeOptions o;
        o.quant_type = quant::quant_type_from_name(type);
        o.blocksize = bs;
        o.double_quant = dq;
        const quant::Quantized q = quant::quantize_4bit(w, o);
        const quant::Quantized g = quantized_to(q, kGpu);
        for (at::ScalarType dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
          const at::Tensor cpu = quant::dequantize_4bit(q.packed, q.state, dt);
          const at::Tensor gpu = quant::dequantize_4bit(g.packed, g.state, dt);
          ASSERT_TRUE(gpu.is_cuda());
          EXPECT_TRUE(at::equal(cpu.view(at::kByte), gpu.cpu().view(at::kByte)))
              << type << " blocksize " << bs << " double_quant " << dq << " " << dt;
          ++checked;
        }
      }
    }
  }
  EXPECT_EQ(checked, 2 * 8 * 2 * 3);
}

// fp32 on both sides: the products differ only in summation order (cuBLAS vs MKL; TF32 is off
// for matmuls by default in libtorch), ~1e-6 relative for sums of a few hundred terms.
constexpr double kRelTol = 2e-5;

TEST(GpuQLoraLinear, ForwardAndGradientsMatchTheCpu) {
  QLORA_REQUIRE_GPU();
  at::manual_seed(1);
  const at::Tensor w = at::randn({192, 256}) * 0.05;
  const at::Tensor bias = at::randn({192}) * 0.1;
  const quant::Quantized q = quant::quantize_4bit(w, quant::QuantizeOptions{});
  lora::LoraConfig cfg;
  cfg.rank = 8;
  cfg.alpha = 16;
  const at::Tensor a = at::randn({8, 256}) * 0.1, b = at::randn({192, 8}) * 0.1;
  lora::QLoraLinear cpu("cpu", q, bias);
  cpu.adapter_set(cfg, a, b);
  lora::QLoraLinear gpu("gpu", quantized_to(q, kGpu), bias.to(kGpu));
  gpu.adapter_set(cfg, a, b);
  const at::Tensor x = at::randn({2, 5, 256});
  const at::Tensor xc = x.clone().requires_grad_(true), xg = x.to(kGpu).requires_grad_(true);
  const at::Tensor yc = cpu.forward(xc, true), yg = gpu.forward(xg, true);
  ASSERT_TRUE(yg.is_cuda());
  EXPECT_LE(max_abs_diff(yc, yg), kRelTol * max_abs(yc));
  yc.pow(2).sum().backward();
  yg.pow(2).sum().backward();
  EXPECT_LE(max_abs_diff(xc.grad(), xg.grad()), kRelTol * max_abs(xc.grad()));
  EXPECT_LE(max_abs_diff(cpu.lora_A().grad(), gpu.lora_A().grad()),
            kRelTol * max_abs(cpu.lora_A().grad()));
  EXPECT_LE(max_abs_diff(cpu.lora_B().grad(), gpu.lora_B().grad()),
            kRelTol * max_abs(cpu.lora_B().grad()));
}

TEST(GpuDecoderBlock, ForwardAndLoraGradientsMatchTheCpu) {
  QLORA_REQUIRE_GPU();
  io::testing::TempDir tmp;
  const model::ModelConfig c = model::testing::tiny_config(2);
  const std::string dir = tmp.file("m");
  model::init_model_write(c, 3, dir);
  model::LoadOptions lo;
  lo.compute_dtype = at::kFloat;
  model::DecoderModel cpu = model::DecoderModel::load(dir, lo);
  model::DecoderModel gpu = model::DecoderModel::load(dir, lo);
  lora::LoraConfig cfg;
  cfg.rank = 4;
  cfg.alpha = 8;
  const std::vector<std::string> targets = {"q_proj", "k_proj", "v_proj", "o_proj",
                                            "gate_proj", "up_proj", "down_proj"};
  cpu.adapters_init(cfg, targets, 7);
  gpu.adapters_init(cfg, targets, 7);
  // lora_B starts at zero (peft): give it values so that the gradient of lora_A is not zero.
  for (model::DecoderModel* m : {&cpu, &gpu}) {
    at::manual_seed(5);
    for (lora::QLoraLinear& l : m->block(0).linears)
      l.adapter_set(cfg, l.lora_A().detach(), at::randn(l.lora_B().sizes()) * 0.05);
  }
  // Block 0 of the second model moves to the GPU: norms, quantized weights, biases, adapters.
  model::DecoderBlock& blk = gpu.block(0);
  for (at::Tensor* t : {&blk.input_layernorm, &blk.post_attention_layernorm})
    *t = t->to(kGpu);
  std::vector<lora::QLoraLinear> moved;
  for (const lora::QLoraLinear& l : blk.linears) {
    lora::QLoraLinear m(l.name(), quantized_to(l.base(), kGpu),
                        l.bias().defined() ? l.bias().to(kGpu) : at::Tensor());
    m.adapter_set(cfg, l.lora_A().detach(), l.lora_B().detach());
    moved.push_back(std::move(m));
  }
  blk.linears = std::move(moved);

  at::manual_seed(2);
  const at::Tensor x = at::randn({2, 12, c.hidden_size});
  const at::Tensor yc = cpu.block_forward(0, x, true);
  const at::Tensor yg = gpu.block_forward(0, x.to(kGpu), true);
  ASSERT_TRUE(yg.is_cuda());
  EXPECT_LE(max_abs_diff(yc, yg), kRelTol * max_abs(yc));
  yc.pow(2).sum().backward();
  yg.pow(2).sum().backward();
  for (size_t i = 0; i < blk.linears.size(); ++i) {
    const lora::QLoraLinear& lc = cpu.block(0).linears[i];
    const lora::QLoraLinear& lg = blk.linears[i];
    for (auto [gc, gg] : {std::pair{lc.lora_A().grad(), lg.lora_A().grad()},
                          std::pair{lc.lora_B().grad(), lg.lora_B().grad()}}) {
      ASSERT_TRUE(gc.defined() && gg.defined()) << lc.name();
      EXPECT_LE(max_abs_diff(gc, gg), kRelTol * max_abs(gc) + 1e-7) << lc.name();
    }
  }
}

TEST(GpuNccl, OneRankRoundTrip) {
  QLORA_REQUIRE_GPU();
  dist::RankEnv env;  // MPI is up (main): one rank
  env.rank = 0;
  env.world_size = 1;
  std::unique_ptr<dist::Communicator> comm = dist::communicator_nccl(env, 0);
  comm->timeout_set(60);
  EXPECT_EQ(comm->backend_name(), "nccl");
  // Gathers copy bytes: NaN payloads with non-canonical bit patterns survive (the corruption
  // of bitsandbytes issue 1945 came from a float op on packed bf16 storage).
  at::Tensor shard = at::randint(0, 256, {4099}, at::TensorOptions().dtype(at::kByte));
  shard.narrow(0, 0, 4).copy_(at::tensor({0xC1, 0xFF, 0x81, 0x7F}, at::kByte));
  const at::Tensor shard_bf16 = shard.narrow(0, 0, 4098).view(at::kBFloat16).to(kGpu);
  at::Tensor out = at::empty({2049}, at::TensorOptions().dtype(at::kBFloat16).device(kGpu));
  comm->all_gather(shard_bf16, out);
  EXPECT_TRUE(at::equal(out.cpu().view(at::kByte), shard.narrow(0, 0, 4098)));
  const at::Tensor in = at::randn({1000}).to(kGpu);
  at::Tensor rs = at::empty({1000}, in.options());
  comm->reduce_scatter(in, rs);
  EXPECT_TRUE(at::equal(rs.cpu(), in.cpu()));
  at::Tensor ar = at::arange(10, at::TensorOptions().dtype(at::kDouble)).to(kGpu);
  comm->all_reduce(ar, dist::ReduceOp::max);
  EXPECT_TRUE(at::equal(ar.cpu(), at::arange(10, at::TensorOptions().dtype(at::kDouble))));
  at::Tensor bc = at::full({17}, 3, at::TensorOptions().dtype(at::kLong).device(kGpu));
  comm->broadcast(bc, 0);
  EXPECT_EQ(bc.sum().item<int64_t>(), 51);
  comm->barrier();
  double host[3] = {1.5, -2.0, 7.0};
  comm->all_reduce_host(host, 3, dist::ReduceOp::sum);
  EXPECT_EQ(host[0], 1.5);
  EXPECT_EQ(host[2], 7.0);
  // Tensors on the wrong device are refused before anything is queued.
  EXPECT_THROW(comm->all_reduce(at::zeros({3}), dist::ReduceOp::sum), std::invalid_argument);
}

TEST(GpuDevice, ContextAllocatesOnTheGpuAndReportsItsPeak) {
  QLORA_REQUIRE_GPU();
  dist::RankEnv env;
  env.world_size = 1;
  std::unique_ptr<dist::Communicator> comm = dist::communicator_mpi(env);
  dist::DeviceContext device(dist::Device::cuda, at::kBFloat16, *comm, 0);
  const at::Tensor t = device.zeros({1 << 20}, at::kFloat);
  EXPECT_TRUE(t.is_cuda());
  EXPECT_GE(device.peak_memory_bytes(), 4 << 20);
  // The same seed gives the same stream on the device (Philox) and on the host.
  EXPECT_TRUE(at::equal(at::rand({8}, device.generator(3), device.options(at::kFloat)),
                        at::rand({8}, device.generator(3), device.options(at::kFloat))));
}

}  // namespace
}  // namespace qlora

int main(int argc, char** argv) {
  bool listing = false;
  for (int i = 1; i < argc; ++i) listing |= std::string(argv[i]) == "--gtest_list_tests";
  ::testing::InitGoogleTest(&argc, argv);
  // MPI up (the NCCL bootstrap broadcasts its id over MPI), except for a listing.
  if (listing) return RUN_ALL_TESTS();
  qlora::dist::rank_env_init(&argc, &argv);
  const int rc = RUN_ALL_TESTS();
  qlora::dist::rank_env_finalize();
  return rc;
}
