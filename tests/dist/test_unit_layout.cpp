// Unit layout tables (alignment, padding to the world size, owned byte ranges, JSON round trip),
// the model's units, and the data-parallel sampler, without MPI.
#include <gtest/gtest.h>

#include <set>

#include "dist/sampler.h"
#include "dist/unit_layout.h"
#include "expect_error.h"
#include "lora/lora_linear.h"
#include "model/init_model.h"
#include "train/sharded_model.h"

namespace {

using qlora::dist::SegmentKind;
using qlora::dist::UnitLayout;

UnitLayout odd_unit() {
  UnitLayout u;
  u.name = "block.0";
  u.add("norm", SegmentKind::tensor, qlora::io::DType::BF16, {7});
  qlora::dist::unit_add_quantized(u, "w.weight", {13, 5}, 64, true);  // 65 codes: 33 bytes
  u.add("bias", SegmentKind::tensor, qlora::io::DType::F32, {3});
  return u;
}

TEST(UnitLayout, SegmentsAreAlignedAndSized) {
  const UnitLayout u = odd_unit();
  ASSERT_EQ(u.segments.size(), 6u);
  size_t end = 0;
  for (const auto& s : u.segments) {
    EXPECT_EQ(s.offset % qlora::dist::kSegmentAlign, 0u) << s.name;
    EXPECT_GE(s.offset, end) << s.name;
    end = s.offset + s.nbytes;
  }
  EXPECT_EQ(u.segment("norm").nbytes, 14u);
  EXPECT_EQ(u.segment("w.weight").nbytes, 33u);  // (65 + 1) / 2
  EXPECT_EQ(u.segment("w.weight.absmax").nbytes, 2u);  // 2 blocks of 64, uint8 codes
  EXPECT_EQ(u.segment("w.weight.nested_absmax").nbytes, 4u);
  EXPECT_EQ(u.segment("w.weight.nested_offset").nbytes, 4u);
  EXPECT_EQ(u.segment("bias").nbytes, 12u);
  EXPECT_EQ(u.nbytes, 6 * qlora::dist::kSegmentAlign);
  EXPECT_TRUE(qlora::testing::contains(qlora::testing::invalid_argument_message([&] {
                                UnitLayout v = u;
                                v.add("norm", SegmentKind::tensor, qlora::io::DType::F32, {1});
                              }),
                              "already has a segment 'norm'"));
}

TEST(UnitLayout, OwnedRangesPartitionTheUnitAtEveryWorldSize) {
  const UnitLayout u = odd_unit();
  for (size_t item : {1u, 2u, 4u})
    for (int n = 1; n <= 7; ++n) {
      const int64_t padded = u.padded_numel(item, n);
      EXPECT_EQ(padded % n, 0) << "itemsize " << item << " world " << n;
      EXPECT_GE(padded, u.numel(item));
      EXPECT_LT(padded - u.numel(item), n);
      size_t covered = 0;
      for (int r = 0; r < n; ++r) {
        const auto [b, e] = u.owned_bytes(item, r, n);
        EXPECT_EQ(b, covered) << "itemsize " << item << " world " << n << " rank " << r;
        covered = e;
      }
      EXPECT_EQ(covered, u.nbytes) << "itemsize " << item << " world " << n;
      EXPECT_EQ(qlora::dist::units_owned_bytes({u, u}, item, 0, n),
                2 * u.owned_bytes(item, 0, n).second);
    }
}

TEST(UnitLayout, JsonRoundTripAndErrors) {
  const std::vector<UnitLayout> units = {odd_unit(), odd_unit()};
  const std::string json = qlora::dist::units_to_json(units);
  EXPECT_EQ(qlora::dist::units_from_json(json, "x.h5"), units);
  std::string bad = json;
  bad.replace(bad.find("\"offset\":64"), 11, "\"offset\":65");
  EXPECT_TRUE(qlora::testing::contains(
      qlora::testing::invalid_argument_message([&] { qlora::dist::units_from_json(bad, "x.h5"); }),
      "x.h5: unit layout table: segment 'w.weight' of unit 'block.0' has offset/nbytes 65/33"));
  EXPECT_TRUE(qlora::testing::contains(
      qlora::testing::invalid_argument_message([&] { qlora::dist::units_from_json("{", "x.h5"); }),
      "x.h5: malformed unit layout table"));
}

TEST(ModelUnits, TinyModelUnitsCoverEveryWeight) {
  qlora::train::UnitsSpec spec;
  spec.config = qlora::model::preset_config("tiny");
  spec.quant.double_quant = true;
  const auto units = qlora::train::base_units(spec);
  ASSERT_EQ(units.size(), static_cast<size_t>(spec.config.num_hidden_layers + 2));
  EXPECT_EQ(units.front().name, "embed");
  EXPECT_EQ(units.back().name, "head");
  // Every weight of the config is a segment of exactly one unit.
  std::set<std::string> names;
  for (const auto& u : units)
    for (const auto& s : u.segments)
      if (s.kind == SegmentKind::tensor || s.kind == SegmentKind::packed) {
        EXPECT_TRUE(names.insert(s.name).second) << s.name;
      }
  for (const auto& [name, shape] : qlora::model::expected_weight_shapes(spec.config))
    EXPECT_TRUE(names.count(name)) << name;
  const auto lora = qlora::train::lora_units(spec.config, 8, qlora::lora::lora_target_parse("all"));
  ASSERT_EQ(lora.size(), static_cast<size_t>(spec.config.num_hidden_layers));
  EXPECT_EQ(lora[0].segments.size(), 14u);
  EXPECT_EQ(lora[0].segment("model.layers.0.self_attn.q_proj.lora_A.weight").shape,
            (std::vector<int64_t>{8, 256}));
}

TEST(Sampler, GlobalBatchDoesNotDependOnWorldSize) {
  const int64_t rows = 100, global = 12;
  for (int n : {1, 2, 3, 4, 6}) {
    for (int64_t accum : {1, 2}) {
      if (global % (n * accum) != 0) continue;
      const int64_t micro = global / (n * accum);
      for (int64_t step : {0, 7, 8, 9, 20}) {
        std::vector<int64_t> all;
        for (int r = 0; r < n; ++r) {
          qlora::dist::DistributedSampler s(rows, micro, accum, r, n, 5);
          for (int64_t k = 0; k < accum; ++k) {
            const auto part = s.rows(step, k);
            all.insert(all.end(), part.begin(), part.end());
          }
        }
        qlora::dist::DistributedSampler one(rows, global, 1, 0, 1, 5);
        EXPECT_EQ(all, one.rows(step, 0)) << "world " << n << " accum " << accum << " step " << step;
        EXPECT_EQ(std::set<int64_t>(all.begin(), all.end()).size(), all.size());
      }
    }
  }
  // Epochs differ, the same seed repeats, another seed does not.
  qlora::dist::DistributedSampler a(rows, 12, 1, 0, 1, 5), b(rows, 12, 1, 0, 1, 6);
  EXPECT_EQ(a.steps_per_epoch(), 8);
  EXPECT_NE(a.rows(0, 0), a.rows(8, 0));
  EXPECT_NE(a.rows(0, 0), b.rows(0, 0));
  EXPECT_TRUE(qlora::testing::contains(qlora::testing::invalid_argument_message([] {
                                qlora::dist::DistributedSampler(10, 4, 2, 0, 2, 1);
                              }),
                              "10 rows, fewer than one global batch of 16"));
}

}  // namespace
