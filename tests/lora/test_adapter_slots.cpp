// The adapter lifecycle over slots (adapter_slots.h): peft's init (kaiming-uniform A with bound
// 1/sqrt(in), B = 0, one generator in slot order, the same numbers in separate tensors and in
// views of one flat buffer), loading (every check before any change, messages naming the layer
// and shapes) and exporting (copies, target_modules in peft's order).
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <string>
#include <vector>

#include "lora/adapter_slots.h"

#include "expect_error.h"

namespace qlora::lora {
namespace {

using qlora::testing::contains;
using qlora::testing::invalid_argument_message;

at::Generator gen_seeded(uint64_t seed) { return at::detail::createCPUGenerator(seed); }

at::Tensor randn(at::IntArrayRef shape, uint64_t seed) {
  return at::randn(shape, gen_seeded(seed), at::TensorOptions().dtype(at::kFloat));
}

// Slots of separate fp32 tensors (filled with noise, so that init and load must overwrite them):
// q_proj [r, 83] / [37, r] and down_proj [r, 130] / [5, r] of layer 0.
std::vector<AdapterSlot> slots_make(int64_t r, uint64_t seed) {
  return {{"model.layers.0.self_attn.q_proj", randn({r, 83}, seed), randn({37, r}, seed + 1)},
          {"model.layers.0.mlp.down_proj", randn({r, 130}, seed + 2), randn({5, r}, seed + 3)}};
}

PeftAdapter adapter_make(int64_t r, uint64_t seed) {
  PeftAdapter a;
  a.config.rank = r;
  for (const AdapterSlot& s : slots_make(r, seed)) a.weights[s.module] = {s.lora_A, s.lora_B};
  return a;
}

TEST(AdapterInit, AsPeft) {
  const int64_t in = 1000, out = 37, r = 16;
  // Leaves that require grad, as a QLoraLinear's lora_A() / lora_B() are.
  const AdapterSlot s{"l", randn({r, in}, 1).requires_grad_(true),
                      randn({out, r}, 2).requires_grad_(true)};
  adapter_init({s}, gen_seeded(5));
  EXPECT_TRUE(at::equal(s.lora_B, at::zeros_like(s.lora_B)));
  EXPECT_TRUE(s.lora_A.requires_grad() && s.lora_A.is_leaf());

  // kaiming_uniform(a = sqrt 5): U(-1/sqrt(in), 1/sqrt(in)); 16000 draws: the extremes come
  // within 0.1% of the bound, the mean within 4 sigma of 0 (sigma = bound / sqrt(3 * 16000)) and
  // the variance within 3% of bound^2 / 3.
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  const at::Tensor ad = s.lora_A.detach().to(at::kDouble);
  EXPECT_LE(ad.abs().max().item<double>(), bound);
  EXPECT_GE(ad.max().item<double>(), 0.999 * bound);
  EXPECT_LE(ad.min().item<double>(), -0.999 * bound);
  EXPECT_NEAR(ad.mean().item<double>(), 0.0, 4 * bound / std::sqrt(3.0 * r * in));
  EXPECT_NEAR(ad.var().item<double>(), bound * bound / 3, 0.03 * bound * bound / 3);

  // torch's own uniform_ from the same seed: the same numbers.
  const at::Tensor want = at::empty({r, in}).uniform_(-bound, bound, gen_seeded(5));
  EXPECT_TRUE(at::equal(s.lora_A.detach(), want));
  const AdapterSlot other{"l", at::empty({r, in}), at::empty({out, r})};
  adapter_init({other}, gen_seeded(6));
  EXPECT_FALSE(at::equal(other.lora_A, want)) << "another seed, another A";
}

TEST(AdapterInit, FlatBufferViewsDrawWhatSeparateTensorsDraw) {
  // The trainer's slots are views into one flat buffer with padding; the decoder's are tensors of
  // their own. One generator, slot order: the same numbers, and the padding stays untouched.
  const int64_t r = 3;
  const std::vector<AdapterSlot> separate = slots_make(r, 10);
  adapter_init(separate, gen_seeded(42));

  int64_t total = 0;
  for (const AdapterSlot& s : separate) total += s.lora_A.numel() + s.lora_B.numel();
  const at::Tensor flat = at::full({total + 5}, 7.0f);  // 5 padding elements at the end
  std::vector<AdapterSlot> views;
  int64_t offset = 0;
  for (const AdapterSlot& s : separate) {
    const at::Tensor a = flat.narrow(0, offset, s.lora_A.numel()).view(s.lora_A.sizes());
    offset += s.lora_A.numel();
    const at::Tensor b = flat.narrow(0, offset, s.lora_B.numel()).view(s.lora_B.sizes());
    offset += s.lora_B.numel();
    views.push_back({s.module, a, b});
  }
  adapter_init(views, gen_seeded(42));
  for (size_t i = 0; i < views.size(); ++i) {
    EXPECT_TRUE(at::equal(views[i].lora_A, separate[i].lora_A)) << views[i].module;
    EXPECT_TRUE(at::equal(views[i].lora_B, separate[i].lora_B)) << views[i].module;
  }
  EXPECT_TRUE(at::equal(flat.narrow(0, total, 5), at::full({5}, 7.0f))) << "padding";

  // Slot order is draw order.
  const std::vector<AdapterSlot> reversed = {slots_make(r, 20)[1], slots_make(r, 20)[0]};
  adapter_init(reversed, gen_seeded(42));
  EXPECT_FALSE(at::equal(reversed[1].lora_A, separate[0].lora_A));
}

TEST(AdapterLoad, CopiesAndConverts) {
  const std::vector<AdapterSlot> slots = slots_make(4, 1);
  PeftAdapter adapter = adapter_make(4, 30);
  adapter.weights.at("model.layers.0.mlp.down_proj").second =
      adapter.weights.at("model.layers.0.mlp.down_proj").second.to(at::kBFloat16);
  adapter_load(slots, adapter, "");
  for (const AdapterSlot& s : slots) {
    const auto& ab = adapter.weights.at(s.module);
    EXPECT_TRUE(at::equal(s.lora_A, ab.first)) << s.module;
    EXPECT_TRUE(at::equal(s.lora_B, ab.second.to(at::kFloat))) << s.module;
    EXPECT_EQ(s.lora_B.scalar_type(), at::kFloat);
  }
}

TEST(AdapterLoad, EverythingIsCheckedBeforeAnyChange) {
  const std::vector<AdapterSlot> slots = slots_make(4, 1);
  std::vector<AdapterSlot> before;
  for (const AdapterSlot& s : slots)
    before.push_back({s.module, s.lora_A.clone(), s.lora_B.clone()});
  const auto unchanged = [&] {
    for (size_t i = 0; i < slots.size(); ++i)
      if (!at::equal(slots[i].lora_A, before[i].lora_A) ||
          !at::equal(slots[i].lora_B, before[i].lora_B))
        return false;
    return true;
  };
  const std::string q = "model.layers.0.self_attn.q_proj", down = "model.layers.0.mlp.down_proj";

  // The second slot (in order) is wrong: the first must not have been written.
  PeftAdapter wrong = adapter_make(4, 30);
  wrong.weights.at(down).first = randn({4, 129}, 3);
  std::string msg = invalid_argument_message([&] { adapter_load(slots, wrong, ""); });
  EXPECT_TRUE(contains(msg, "adapter layer '" + down + "': lora_A [4, 129] and lora_B [5, 4] do "
                       "not fit; rank 4 on this layer needs lora_A [4, 130] and lora_B [5, 4]"))
      << msg;
  EXPECT_TRUE(unchanged());

  PeftAdapter rank = adapter_make(8, 30);
  msg = invalid_argument_message([&] { adapter_load(slots, rank, ""); });
  EXPECT_TRUE(contains(msg, "lora_A [8, 83]") && contains(msg, "needs lora_A [4, 83]")) << msg;
  EXPECT_TRUE(unchanged());

  PeftAdapter integer = adapter_make(4, 30);
  integer.weights.at(q).second = at::zeros({37, 4}, at::kInt);
  msg = invalid_argument_message([&] { adapter_load(slots, integer, ""); });
  EXPECT_TRUE(contains(msg, q) && contains(msg, "Int") && contains(msg, "float")) << msg;
  EXPECT_TRUE(unchanged());

  PeftAdapter missing = adapter_make(4, 30);
  missing.weights.erase(q);
  msg = invalid_argument_message([&] { adapter_load(slots, missing, "set lora_target"); });
  EXPECT_TRUE(contains(msg, "adapter layer '" + q + "' is missing from the adapter (2 layers to "
                       "load, the adapter has 1); set lora_target")) << msg;
  EXPECT_TRUE(unchanged());

  PeftAdapter extra = adapter_make(4, 30);
  extra.weights["model.layers.1.self_attn.q_proj"] = extra.weights.at(q);
  msg = invalid_argument_message([&] { adapter_load(slots, extra, ""); });
  EXPECT_TRUE(contains(msg, "adapter layer 'model.layers.1.self_attn.q_proj' is not one of the "
                       "layers to load (2 layers to load, the adapter has 3)")) << msg;
  EXPECT_TRUE(unchanged());
}

TEST(AdapterExport, CopiesInPeftOrder) {
  const std::vector<AdapterSlot> slots = slots_make(4, 1);
  PeftAdapter out;
  out.config.rank = 4;
  adapter_export({slots[1]}, out);  // down_proj first, as a unit at a time would add it
  adapter_export({slots[0]}, out);
  EXPECT_EQ(out.target_modules, (std::vector<std::string>{"q_proj", "down_proj"}));
  ASSERT_EQ(out.weights.size(), 2u);
  for (const AdapterSlot& s : slots) {
    const auto& ab = out.weights.at(s.module);
    EXPECT_TRUE(at::equal(ab.first, s.lora_A) && at::equal(ab.second, s.lora_B)) << s.module;
    EXPECT_NE(ab.first.data_ptr(), s.lora_A.data_ptr()) << "a copy";
  }
  // Round trip: what export wrote, load reads.
  const std::vector<AdapterSlot> fresh = slots_make(4, 50);
  adapter_load(fresh, out, "");
  EXPECT_TRUE(at::equal(fresh[1].lora_B, slots[1].lora_B));
}

}  // namespace
}  // namespace qlora::lora
