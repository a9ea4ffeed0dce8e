// Packed rows through the decoder. Neat packing (position ids restarting at 0 per sample, the
// block-diagonal causal mask) gives every sample of a row the logits and the summed loss it has
// when run alone; plain packing (no position ids: one causal sequence) leaves the first sample as
// it is and changes the later ones, which shows that the mask and positions matter. Also the
// mask itself on a hand-written row, with and without a sliding window. Equality with
// transformers given the same position ids and LLaMA-Factory's 4-D mask: tests/reference.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "expect_error.h"
#include "model/decoder.h"
#include "model_test_util.h"
#include "temp_dir.h"

namespace qlora::model {
namespace {

using io::testing::TempDir;
using namespace qlora::model::testing;

// The same tokens in a row of 19 and alone (5 to 7 tokens): the GEMMs and the attention kernel
// (SDPA with an explicit mask vs is_causal) sum in other orders and groupings, so fp32 results
// differ by rounding only: measured max logit deviation 5e-7 of max |logit|, a sample's loss
// 1e-7 and the summed loss 6e-8 relative (printed by the tests). Bounds 1e-5 (logits, relative to max |logit|) and 1e-5 (summed loss,
// relative) leave ~10x margin and are far below what a wrong position or mask moves (>1e-2).
constexpr double kLogitTol = 1e-5;
constexpr double kLossTol = 1e-5;

struct Packed {
  at::Tensor ids, labels, positions;  // [B, T] int64 each
  // per row: (start, length) of each sample
  std::vector<std::vector<std::pair<int64_t, int64_t>>> spans;
};

// Rows of samples of the given lengths, padded with id 0 / label -100 / position 0 to `width`.
// Sample tokens random in [1, vocab); labels -100 on the first two tokens (a prompt: the first
// label is never a target, so no loss crosses from one sample into the next), the ids after.
Packed pack_rows(const std::vector<std::vector<int64_t>>& rows, int64_t width, int64_t vocab,
                 uint64_t seed) {
  const auto b = static_cast<int64_t>(rows.size());
  Packed p;
  const auto opts = at::TensorOptions().dtype(at::kLong);
  p.ids = at::zeros({b, width}, opts);
  p.labels = at::full({b, width}, -100, opts);
  p.positions = at::zeros({b, width}, opts);
  at::Generator gen = test_gen(seed);
  for (int64_t r = 0; r < b; ++r) {
    int64_t at_col = 0;
    p.spans.emplace_back();
    for (int64_t len : rows[static_cast<size_t>(r)]) {
      const at::Tensor tok = at::randint(1, vocab, {len}, gen, opts);
      p.ids[r].narrow(0, at_col, len).copy_(tok);
      p.labels[r].narrow(0, at_col + 2, len - 2).copy_(tok.narrow(0, 2, len - 2));
      p.positions[r].narrow(0, at_col, len).copy_(at::arange(len, opts));
      p.spans.back().emplace_back(at_col, len);
      at_col += len;
    }
  }
  return p;
}

// Summed token loss (normalizer 1) of hidden states x [B, T, H] against labels.
double loss_sum(const DecoderModel& m, const at::Tensor& x, const at::Tensor& labels) {
  return m.loss(m.final_norm(x), labels, 1024, 1.0).loss.item<double>();
}

at::Tensor hidden(const DecoderModel& m, const at::Tensor& ids, const at::Tensor& positions) {
  at::Tensor x = m.embed(ids);
  for (int64_t i = 0; i < m.num_blocks(); ++i)
    x = m.block_forward(i, x, false, std::nullopt, positions);
  return x;
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// A tiny model with weights N(0, 0.1) instead of init_model's 0.02, so that attention is far
// from uniform and a wrong mask or position shows clearly; biases (Qwen2) random.
DecoderModel tiny_model(const TempDir& tmp, const ModelConfig& c) {
  const std::string dir = tmp.file("m");
  init_model_write(c, 3, dir);
  weights_edit(dir, [](TensorMap& w) {
    for (auto& [name, t] : w)
      if (t.dim() == 2) t = t * 5.0;
  });
  biases_randomize(dir, 4);  // Qwen2's q/k/v biases (written as zeros) non-zero
  return DecoderModel::load(dir, LoadOptions{});
}

void expect_neat_equals_alone(const ModelConfig& c, const std::string& what) {
  TempDir tmp;
  const DecoderModel m = tiny_model(tmp, c);
  // Two rows (B = 2) of width 19: 5 + 7 + 4 tokens and 3 pads; 6 + 3 + 8 and 2 pads.
  const Packed p = pack_rows({{5, 7, 4}, {6, 3, 8}}, 19, c.vocab_size, 21);
  const at::Tensor x = hidden(m, p.ids, p.positions);
  const at::Tensor logits = m.logits(m.final_norm(x));  // [2, 19, V]
  double alone_total = 0.0, worst_logit = 0.0, worst_loss = 0.0;  // relative, printed
  for (int64_t r = 0; r < 2; ++r)
    for (const auto& [start, len] : p.spans[static_cast<size_t>(r)]) {
      const at::Tensor ids = p.ids[r].narrow(0, start, len).unsqueeze(0);
      const at::Tensor labels = p.labels[r].narrow(0, start, len).unsqueeze(0);
      const at::Tensor xa = hidden(m, ids, at::Tensor());  // the sample alone, no position ids
      const at::Tensor la = m.logits(m.final_norm(xa));
      const double scale = la.abs().max().item<double>();
      const double diff = max_abs_diff(logits[r].narrow(0, start, len), la[0]);
      worst_logit = std::max(worst_logit, diff / scale);
      EXPECT_LE(diff, kLogitTol * scale)
          << what << ": row " << r << ", sample at " << start << " (" << len << " tokens)";
      const double alone = loss_sum(m, xa, labels);
      alone_total += alone;
      // The sample's own targets within the row (labels elsewhere -100).
      at::Tensor only = at::full_like(p.labels, -100);
      only[r].narrow(0, start, len).copy_(p.labels[r].narrow(0, start, len));
      const double in_row = loss_sum(m, x, only);
      worst_loss = std::max(worst_loss, std::abs(in_row - alone) / std::abs(alone));
      EXPECT_NEAR(in_row, alone, kLossTol * std::abs(alone))
          << what << ": row " << r << ", sample at " << start;
    }
  const double packed_total = loss_sum(m, x, p.labels);
  std::printf("%s: logits max diff %.3g of max |logit|, sample losses %.3g, summed loss %.3g "
              "(relative)\n",
              what.c_str(), worst_logit, worst_loss,
              std::abs(packed_total - alone_total) / alone_total);
  EXPECT_NEAR(packed_total, alone_total, kLossTol * alone_total)
      << what << ": summed loss of the packed rows vs the samples one by one";
}

TEST(PackedAttention, NeatPackedRowEqualsSamplesAlone) {
  expect_neat_equals_alone(tiny_config(), "llama (GQA 4/2)");
}

TEST(PackedAttention, NeatPackedRowEqualsSamplesAloneWithSlidingWindow) {
  // Window 3 < every sample but one: the window applies inside each sample as it does alone.
  expect_neat_equals_alone(as_mistral(tiny_config(), 3), "mistral, window 3");
  expect_neat_equals_alone(as_qwen2(tiny_config()), "qwen2 (biases)");
}

TEST(PackedAttention, PlainPackingChangesOnlyLaterSamples) {
  TempDir tmp;
  const ModelConfig c = tiny_config();
  const DecoderModel m = tiny_model(tmp, c);
  const Packed p = pack_rows({{6, 5, 7}}, 19, c.vocab_size, 22);
  const at::Tensor x = hidden(m, p.ids, at::Tensor());  // one causal sequence, positions 0..18
  for (size_t s = 0; s < p.spans[0].size(); ++s) {
    const auto [start, len] = p.spans[0][s];
    const at::Tensor labels = p.labels[0].narrow(0, start, len).unsqueeze(0);
    const double alone = loss_sum(m, hidden(m, p.ids[0].narrow(0, start, len).unsqueeze(0),
                                            at::Tensor()),
                                  labels);
    at::Tensor only = at::full_like(p.labels, -100);
    only[0].narrow(0, start, len).copy_(p.labels[0].narrow(0, start, len));
    const double in_row = loss_sum(m, x, only);
    std::printf("plain packing, sample %zu: loss %.7g in the row, %.7g alone (%.3g relative)\n", s,
                in_row, alone, std::abs(in_row - alone) / std::abs(alone));
    if (s == 0)
      EXPECT_NEAR(in_row, alone, kLossTol * std::abs(alone)) << "the first sample sees nothing else";
    else  // measured: 18% and 22% apart
      EXPECT_GT(std::abs(in_row - alone), 1e-3 * std::abs(alone))
          << "sample " << s << " sees the samples before it and sits at other positions";
  }
}

TEST(PackedAttention, MaskOfAHandWrittenRow) {
  // Samples of 3 and 2 tokens, then two pads (position 0 each: a segment of one token).
  const at::Tensor pos = at::tensor({0, 1, 2, 0, 1, 0, 0}, at::kLong).unsqueeze(0);
  const int expected[7][7] = {{1, 0, 0, 0, 0, 0, 0}, {1, 1, 0, 0, 0, 0, 0}, {1, 1, 1, 0, 0, 0, 0},
                              {0, 0, 0, 1, 0, 0, 0}, {0, 0, 0, 1, 1, 0, 0}, {0, 0, 0, 0, 0, 1, 0},
                              {0, 0, 0, 0, 0, 0, 1}};
  const at::Tensor mask = packed_causal_mask(pos, 0);
  ASSERT_EQ(mask.sizes(), (at::IntArrayRef{1, 1, 7, 7}));
  for (int q = 0; q < 7; ++q)
    for (int k = 0; k < 7; ++k)
      EXPECT_EQ(mask[0][0][q][k].item<bool>(), expected[q][k] == 1) << "query " << q << " key " << k;
  // Window 2: query 2 no longer sees key 0.
  const at::Tensor w = packed_causal_mask(pos, 2);
  EXPECT_FALSE(w[0][0][2][0].item<bool>());
  EXPECT_TRUE(w[0][0][2][1].item<bool>());
  EXPECT_TRUE(w[0][0][4][3].item<bool>());
}

TEST(PackedAttention, PositionIdsOfTheWrongShapeAreErrors) {
  TempDir tmp;
  const ModelConfig c = tiny_config(1);
  const DecoderModel m = tiny_model(tmp, c);
  const at::Tensor x = m.embed(at::ones({2, 5}, at::kLong));
  const std::string msg = qlora::testing::invalid_argument_message(
      [&] { m.block_forward(0, x, false, std::nullopt, at::zeros({2, 4}, at::kLong)); });
  EXPECT_TRUE(qlora::testing::contains(msg, "position_ids must be an integer tensor [2, 5]"))
      << msg;
}

}  // namespace
}  // namespace qlora::model
