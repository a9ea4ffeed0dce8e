// Text generation with the KV cache (DecoderModel::forward_step): the prompt in one call, then one
// token per call. Next token: greedy argmax (lowest id on ties, as torch.argmax), or with
// temperature T > 0 transformers' sampling: p = softmax(top_p_filter(logits / T)), one draw of
// multinomial(p) from a CPU generator seeded by the caller, so a seed gives the same text.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "model/decoder.h"

namespace qlora::model {

struct GenerateOptions {
  int64_t max_new_tokens = 128;
  double temperature = 0.0;       // 0: greedy; > 0: sampling
  double top_p = 1.0;             // nucleus: keep the most likely tokens holding >= top_p mass
  uint64_t seed = 0;              // of the sampling generator
  std::vector<int32_t> stop_ids;  // the answer ends with the first of these it produces
};

struct GenerateResult {
  std::vector<int32_t> ids;     // the new tokens, a stop id that ended them included
  bool stopped = false;         // ended at a stop id (else after max_new_tokens)
  double prefill_seconds = 0;   // the prompt's forward (it gives the first new token)
  double decode_seconds = 0;    // every later step
  int64_t decode_steps = 0;     // forward_step calls after the prompt's
};

// The next token from logits [V] (any float dtype): argmax for temperature 0, else a draw as
// above (top_p in (0, 1]; transformers' TopPLogitsWarper keeps at least one token). Throws
// std::invalid_argument for temperature < 0 or top_p outside (0, 1].
int32_t next_token(const at::Tensor& logits, double temperature, double top_p, at::Generator& gen);

// Continues `prompt` (ids < vocab_size, at least one) on batch 1 until a stop id or
// max_new_tokens. No autograd.
GenerateResult generate(const DecoderModel& model, const std::vector<int32_t>& prompt,
                        const GenerateOptions& options);

}  // namespace qlora::model
