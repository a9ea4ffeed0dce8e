// Incremental decoding (DecoderModel::forward_step with a KvCache) against the full forward:
// logits of every step equal forward_logits of the whole sequence at those positions, for GQA,
// Qwen2 biases, a sliding window shorter than the sequence and a non-zero LoRA adapter; the
// prompt's call runs block_forward's operations and is bitwise the same (all logits). And the generation
// loop: greedy ids equal argmax of forward_logits on the growing sequence (no cache), next_token's
// rules (ties, top_p, seeds) and its errors.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "expect_error.h"
#include "model/decoder.h"
#include "model/generate.h"
#include "model_test_util.h"
#include "temp_dir.h"

namespace qlora::model {
namespace {

using io::testing::TempDir;
using qlora::testing::contains;
using qlora::testing::invalid_argument_message;
using namespace qlora::model::testing;

// Cached vs. full forward in fp32: the same math with other matrix shapes (one query row
// instead of T, keys from the cache), so only GEMM blocking and softmax summation order differ.
// Measured max deviation ~1e-7 of max |logit| over 2 layers; 1e-5 leaves a wide margin and is far
// below a wrong position or mask (those move logits by 1e-2 and more with these weights).
constexpr double kStepTol = 1e-5;

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// Weights N(0, 0.1) instead of 0.02 so that attention is far from uniform; random biases.
DecoderModel tiny_model(const TempDir& tmp, const ModelConfig& c, const std::string& name) {
  const std::string dir = tmp.file(name);
  init_model_write(c, 3, dir);
  weights_edit(dir, [](TensorMap& w) {
    for (auto& [n, t] : w)
      if (t.dim() == 2) t = t * 5.0;
  });
  biases_randomize(dir, 4);
  return DecoderModel::load(dir, LoadOptions{});
}

void adapters_add(DecoderModel& m) {
  lora::LoraConfig l;
  l.rank = 4;
  l.alpha = 8.0;
  m.adapters_init(l, lora::block_linear_names(), 5);
  at::Generator gen = test_gen(6);
  at::NoGradGuard no_grad;
  for (int64_t i = 0; i < m.num_blocks(); ++i)
    for (lora::QLoraLinear& lin : m.block(i).linears) lin.lora_B().normal_(0.0, 0.1, gen);
}

// Feeds `tokens` [B, T] in the chunks `chunks` (summing to T) and compares every chunk's logits
// with the full forward's.
void expect_steps_equal_full(const DecoderModel& m, const at::Tensor& tokens,
                             const std::vector<int64_t>& chunks, const std::string& what) {
  at::NoGradGuard no_grad;
  const at::Tensor full = m.forward_logits(tokens);  // [B, T, V]
  const double scale = full.abs().max().item<double>();
  KvCache cache;
  int64_t at_pos = 0;
  double worst = 0.0;
  for (const int64_t n : chunks) {
    const at::Tensor logits = m.forward_step(tokens.narrow(1, at_pos, n), cache);
    ASSERT_EQ(logits.sizes(), (at::IntArrayRef{tokens.size(0), n, full.size(2)})) << what;
    const double diff = max_abs_diff(logits, full.narrow(1, at_pos, n));
    worst = std::max(worst, diff / scale);
    EXPECT_LE(diff, kStepTol * scale) << what << ": chunk of " << n << " at position " << at_pos;
    at_pos += n;
    EXPECT_EQ(cache.length, at_pos) << what;
  }
  ASSERT_EQ(at_pos, tokens.size(1));
  std::printf("%s: max deviation %.3g of max |logit|\n", what.c_str(), worst);
}

at::Tensor random_tokens(int64_t batch, int64_t seq, int64_t vocab, uint64_t seed) {
  at::Generator gen = test_gen(seed);
  return at::randint(0, vocab, {batch, seq}, gen, at::TensorOptions().dtype(at::kLong));
}

TEST(KvCache, StepsEqualTheFullForward) {
  TempDir tmp;
  const ModelConfig c = tiny_config(3);  // GQA 4 query heads on 2 kv heads
  DecoderModel m = tiny_model(tmp, c, "llama");
  const at::Tensor tokens = random_tokens(2, 12, c.vocab_size, 1);
  // Prompt of 5, then one token at a time; and prompt of 3, a chunk of 4 (several new tokens
  // after cached ones: the explicit mask), then single tokens.
  expect_steps_equal_full(m, tokens, {5, 1, 1, 1, 1, 1, 1, 1}, "llama GQA");
  expect_steps_equal_full(m, tokens, {3, 4, 1, 1, 1, 1, 1}, "llama GQA, chunk after cache");
  expect_steps_equal_full(m, tokens.narrow(0, 0, 1), {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1},
                          "llama GQA, one-token prompt");
  adapters_add(m);
  expect_steps_equal_full(m, tokens, {5, 1, 1, 1, 1, 1, 1, 1}, "llama GQA + LoRA");
}

TEST(KvCache, StepsEqualTheFullForwardQwen2AndSlidingWindow) {
  TempDir tmp;
  const ModelConfig q = as_qwen2(tiny_config());
  DecoderModel mq = tiny_model(tmp, q, "qwen2");
  expect_steps_equal_full(mq, random_tokens(1, 9, q.vocab_size, 2), {4, 1, 1, 1, 1, 1},
                          "qwen2 biases");
  // Window 3: the prompt of 5 already exceeds it, and every later step drops a key.
  const ModelConfig w = as_mistral(tiny_config(), 3);
  DecoderModel mw = tiny_model(tmp, w, "mistral");
  adapters_add(mw);
  const at::Tensor tokens = random_tokens(2, 11, w.vocab_size, 3);
  expect_steps_equal_full(mw, tokens, {5, 1, 1, 1, 1, 1, 1}, "sliding window 3 + LoRA");
  expect_steps_equal_full(mw, tokens, {2, 1, 3, 1, 4}, "sliding window 3, chunks");
}

// Qwen3's q/k norms and Gemma 3's norms, local / global layers with their own RoPE and window 3
// (shorter than the prompt), scaled embeddings: the cached steps still equal the full forward.
TEST(KvCache, StepsEqualTheFullForwardQwen3AndGemma3) {
  TempDir tmp;
  const ModelConfig q = as_qwen3(tiny_config());
  DecoderModel mq = tiny_model(tmp, q, "qwen3");
  adapters_add(mq);
  expect_steps_equal_full(mq, random_tokens(2, 9, q.vocab_size, 7), {4, 1, 1, 1, 1, 1},
                          "qwen3 q/k norms + LoRA");
  const ModelConfig g = as_gemma3(tiny_config(3), 3);
  DecoderModel mg = tiny_model(tmp, g, "gemma3");
  adapters_add(mg);
  const at::Tensor tokens = random_tokens(2, 11, g.vocab_size, 8);
  expect_steps_equal_full(mg, tokens, {5, 1, 1, 1, 1, 1, 1}, "gemma3 local/global + LoRA");
  expect_steps_equal_full(mg, tokens, {2, 1, 3, 1, 4}, "gemma3, chunks");
}

TEST(KvCache, PromptCallIsBitwiseTheFullForward) {
  TempDir tmp;
  const ModelConfig c = tiny_config();
  DecoderModel m = tiny_model(tmp, c, "m");
  adapters_add(m);
  at::NoGradGuard no_grad;
  const at::Tensor tokens = random_tokens(1, 7, c.vocab_size, 4);
  KvCache cache;
  EXPECT_TRUE(at::equal(m.forward_step(tokens, cache), m.forward_logits(tokens)));
  KvCache cache2;
  const at::Tensor last = m.forward_step(tokens, cache2, /*last_only=*/true);
  EXPECT_EQ(last.sizes(), (at::IntArrayRef{1, 1, c.vocab_size}));
  // The head on one row instead of seven: another GEMM shape, so equal up to rounding.
  const at::Tensor full_last = m.forward_logits(tokens)[0][6];
  EXPECT_LE(max_abs_diff(last[0][0], full_last), kStepTol * full_last.abs().max().item<double>());
  ASSERT_EQ(cache.keys.size(), 2u);
  EXPECT_EQ(cache.keys[0].sizes(), (at::IntArrayRef{1, 2, 7, 16}));  // [B, kv heads, T, D]
}

TEST(KvCache, Errors) {
  TempDir tmp;
  const ModelConfig c = tiny_config();
  DecoderModel m = tiny_model(tmp, c, "m");
  at::NoGradGuard no_grad;
  KvCache cache;
  m.forward_step(random_tokens(2, 3, c.vocab_size, 1), cache);
  std::string msg = invalid_argument_message(
      [&] { m.forward_step(random_tokens(1, 1, c.vocab_size, 1), cache); });
  EXPECT_TRUE(contains(msg, "cache of block 0 holds [2, 2, 3, 16] keys")) << msg;
  KvCache other;
  other.keys.resize(5);
  other.values.resize(5);
  msg = invalid_argument_message(
      [&] { m.forward_step(random_tokens(1, 1, c.vocab_size, 1), other); });
  EXPECT_TRUE(contains(msg, "the cache has 5 blocks, the model 2")) << msg;
}

// ------------------------------------------------------------------------------------------
// Generation

TEST(Generate, GreedyEqualsArgmaxOfTheFullForwardEachStep) {
  TempDir tmp;
  const ModelConfig c = tiny_config(3);
  DecoderModel m = tiny_model(tmp, c, "m");
  adapters_add(m);
  const std::vector<int32_t> prompt = {3, 17, 42, 5, 99, 0, 64};
  GenerateOptions o;
  o.max_new_tokens = 10;
  const GenerateResult r = generate(m, prompt, o);
  ASSERT_EQ(r.ids.size(), 10u);
  EXPECT_FALSE(r.stopped);
  EXPECT_EQ(r.decode_steps, 9);
  at::NoGradGuard no_grad;
  std::vector<int64_t> seq(prompt.begin(), prompt.end());
  for (size_t s = 0; s < r.ids.size(); ++s) {
    const at::Tensor logits = m.forward_logits(at::tensor(seq, at::kLong).unsqueeze(0));
    const int64_t want = logits[0][static_cast<int64_t>(seq.size()) - 1].argmax().item<int64_t>();
    EXPECT_EQ(r.ids[s], want) << "step " << s;
    seq.push_back(r.ids[s]);
  }
  // A stop id ends the answer and is kept as its last token.
  o.stop_ids = {r.ids[3]};
  const GenerateResult stopped = generate(m, prompt, o);
  EXPECT_TRUE(stopped.stopped);
  const auto first = std::find(r.ids.begin(), r.ids.end(), r.ids[3]);
  EXPECT_EQ(stopped.ids, std::vector<int32_t>(r.ids.begin(), first + 1));
  o.max_new_tokens = 0;
  EXPECT_TRUE(generate(m, prompt, o).ids.empty());
}

TEST(Generate, SamplingIsSeededAndTopPKeepsTheNucleus) {
  TempDir tmp;
  const ModelConfig c = tiny_config();
  DecoderModel m = tiny_model(tmp, c, "m");
  GenerateOptions o;
  o.max_new_tokens = 12;
  o.temperature = 1.5;
  o.seed = 11;
  const std::vector<int32_t> prompt = {1, 2, 3};
  const GenerateResult a = generate(m, prompt, o), b = generate(m, prompt, o);
  EXPECT_EQ(a.ids, b.ids);
  o.seed = 12;
  EXPECT_NE(generate(m, prompt, o).ids, a.ids) << "another seed, other draws (12 of 101 tokens)";
  // A nucleus smaller than the top token's probability leaves only the top token: greedy.
  o.top_p = 1e-6;
  GenerateOptions greedy;
  greedy.max_new_tokens = 12;
  EXPECT_EQ(generate(m, prompt, o).ids, generate(m, prompt, greedy).ids);
}

TEST(Generate, NextTokenRules) {
  at::Generator gen = test_gen(1);
  // Ties: the lowest id, as torch.argmax.
  EXPECT_EQ(next_token(at::tensor({0.5f, 2.0f, 1.0f, 2.0f}), 0.0, 1.0, gen), 1);
  // top_p 0.5 on probabilities {0.1, 0.6, 0.3}: only id 1 holds the nucleus.
  const at::Tensor logits = at::log(at::tensor({0.1f, 0.6f, 0.3f}));
  for (int i = 0; i < 20; ++i) EXPECT_EQ(next_token(logits, 1.0, 0.5, gen), 1);
  // top_p 0.8: ids 1 and 2 (0.6 + 0.3 >= 0.8), never id 0.
  bool saw2 = false;
  for (int i = 0; i < 200; ++i) {
    const int32_t id = next_token(logits, 1.0, 0.8, gen);
    EXPECT_NE(id, 0);
    saw2 = saw2 || id == 2;
  }
  EXPECT_TRUE(saw2);
  std::string msg = invalid_argument_message([&] { next_token(logits, -1.0, 1.0, gen); });
  EXPECT_TRUE(contains(msg, "temperature -1")) << msg;
  msg = invalid_argument_message([&] { next_token(logits, 1.0, 0.0, gen); });
  EXPECT_TRUE(contains(msg, "top_p 0")) << msg;
  msg = invalid_argument_message([&] { next_token(logits, 1.0, 1.5, gen); });
  EXPECT_TRUE(contains(msg, "top_p 1.5")) << msg;
}

}  // namespace
}  // namespace qlora::model
