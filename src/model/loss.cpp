// Causal-LM cross-entropy in row chunks through lm_head, never holding the full logits:
//   loss = sum_r -log_softmax(h_r @ W^T)[t_r] / normalizer        (rows r with a target)
//   dL/dh_r = g / normalizer * (softmax(h_r @ W^T) - onehot(t_r)) @ W
// and the per-token log-probabilities of preference training the same way (row_logps).
// Backward recomputes each chunk's logits. W (lm_head) is frozen and gets no gradient.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <functional>
#include <stdexcept>

#include "model/decoder.h"

namespace qlora::model {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Logits of one chunk in fp32, as transformers' loss upcasts them: [n, V].
at::Tensor chunk_log_softmax(const at::Tensor& hidden, const at::Tensor& weight) {
  return at::log_softmax(at::linear(hidden, weight).to(at::kFloat), -1);
}

// The log-probability of each target, chunk by chunk: each(begin, len, logp [len] fp32).
void for_each_chunk_logp(const at::Tensor& hidden, const at::Tensor& weight,
                         const at::Tensor& targets, int64_t chunk,
                         const std::function<void(int64_t, int64_t, const at::Tensor&)>& each) {
  const int64_t n = hidden.size(0);
  for (int64_t begin = 0; begin < n; begin += chunk) {
    const int64_t len = std::min(chunk, n - begin);
    const at::Tensor logp = chunk_log_softmax(hidden.narrow(0, begin, len), weight);  // [len, V]
    each(begin, len, logp.gather(1, targets.narrow(0, begin, len).unsqueeze(1)).squeeze(1));
  }
}

// d/d hidden of sum_n w_n * -log p(t_n | h_n): ((softmax - onehot(t_n)) * w_n) @ W per chunk,
// with w of a chunk from scale(begin, len) ([len, 1] or a 0-dim tensor), recomputing the logits.
at::Tensor chunked_grad_hidden(const at::Tensor& hidden, const at::Tensor& weight,
                               const at::Tensor& targets, int64_t chunk,
                               const std::function<at::Tensor(int64_t, int64_t)>& scale) {
  at::Tensor grad_hidden = at::empty_like(hidden);  // [N, H]
  const int64_t n = hidden.size(0);
  for (int64_t begin = 0; begin < n; begin += chunk) {
    const int64_t len = std::min(chunk, n - begin);
    // exp(log_softmax) rather than softmax: what autograd's log_softmax backward uses.
    at::Tensor grad_logits = chunk_log_softmax(hidden.narrow(0, begin, len), weight).exp_();
    const at::Tensor t = targets.narrow(0, begin, len).unsqueeze(1);
    grad_logits.scatter_add_(1, t, at::full({len, 1}, -1.0f, grad_logits.options()));
    grad_logits.mul_(scale(begin, len));  // [len, V]
    grad_hidden.narrow(0, begin, len)
        .copy_(at::matmul(grad_logits.to(hidden.scalar_type()), weight));  // [len, H]
  }
  return grad_hidden;
}

struct ChunkedLmLoss : public torch::autograd::Function<ChunkedLmLoss> {
  // hidden [N, H] (the rows that have a target), weight [V, H], targets [N] int64 in [0, V).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden,
                            const at::Tensor& weight, const at::Tensor& targets, int64_t chunk,
                            double normalizer) {
    ctx->save_for_backward({hidden, weight, targets});
    ctx->saved_data["chunk"] = chunk;
    ctx->saved_data["normalizer"] = normalizer;
    // Chunk sums accumulate in fp64 so that the result does not depend on the chunk size.
    at::Tensor total = at::zeros({}, hidden.options().dtype(at::kDouble));
    for_each_chunk_logp(hidden, weight, targets, chunk,
                        [&](int64_t, int64_t, const at::Tensor& logp) {
                          total -= logp.sum(at::kDouble);
                        });
    return (total / normalizer).to(at::kFloat);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_hidden;
    if (ctx->needs_input_grad(0)) {
      const double normalizer = ctx->saved_data["normalizer"].toDouble();
      const at::Tensor scale = grad_outputs[0].to(at::kFloat) / normalizer;  // 0-dim
      grad_hidden = chunked_grad_hidden(saved[0], saved[1], saved[2],
                                        ctx->saved_data["chunk"].toInt(),
                                        [&](int64_t, int64_t) { return scale; });
    }
    return {grad_hidden, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// log p(t_n | h_n) of each target: [N] fp32 (d logp_n / d logits_n = onehot(t_n) - softmax).
struct ChunkedTokenLogps : public torch::autograd::Function<ChunkedTokenLogps> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden,
                            const at::Tensor& weight, const at::Tensor& targets, int64_t chunk) {
    ctx->save_for_backward({hidden, weight, targets});
    ctx->saved_data["chunk"] = chunk;
    at::Tensor out = at::empty({hidden.size(0)}, hidden.options().dtype(at::kFloat));
    for_each_chunk_logp(hidden, weight, targets, chunk,
                        [&](int64_t begin, int64_t len, const at::Tensor& logp) {
                          out.narrow(0, begin, len).copy_(logp);
                        });
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_hidden;
    if (ctx->needs_input_grad(0)) {
      const at::Tensor g = grad_outputs[0].to(at::kFloat);  // [N]
      grad_hidden = chunked_grad_hidden(saved[0], saved[1], saved[2],
                                        ctx->saved_data["chunk"].toInt(),
                                        [&](int64_t begin, int64_t len) {
                                          return g.narrow(0, begin, len).neg().unsqueeze(1);
                                        });
    }
    return {grad_hidden, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The shifted target rows of normed [B, T, H] / labels [B, T], checked: hidden [N, H], targets
// [N] and each target's row.
struct Targets {
  at::Tensor hidden, targets, rows;
};

Targets targets_select(const ModelConfig& config, const at::Tensor& normed,
                       const at::Tensor& labels, int64_t chunk_tokens, const char* who) {
  const int64_t h = config.hidden_size, v = config.vocab_size;
  if (normed.dim() != 3 || normed.size(2) != h)
    throw std::invalid_argument(std::string(who) + ": hidden states must be [batch, seq, " +
                                std::to_string(h) + "], not " + shape_str(normed.sizes().vec()));
  if (labels.dim() != 2 || labels.size(0) != normed.size(0) || labels.size(1) != normed.size(1) ||
      !at::isIntegralType(labels.scalar_type(), /*includeBool=*/false))
    throw std::invalid_argument(std::string(who) + ": labels must be integers [" +
                                std::to_string(normed.size(0)) + ", " +
                                std::to_string(normed.size(1)) + "], not " +
                                shape_str(labels.sizes().vec()) + " " +
                                c10::toString(labels.scalar_type()));
  if (chunk_tokens < 1)
    throw std::invalid_argument(std::string(who) + ": chunk_tokens " +
                                std::to_string(chunk_tokens) + " must be >= 1");
  // Position t predicts label t + 1 (transformers' ForCausalLMLoss shift).
  const int64_t shifted = std::max<int64_t>(normed.size(1) - 1, 0);
  Targets out;
  out.hidden = normed.narrow(1, 0, shifted).reshape({-1, h});  // [B*(T-1), H]
  out.targets = labels.narrow(1, std::min<int64_t>(1, labels.size(1)), shifted)
                    .reshape({-1})
                    .to(at::kLong);  // [B*(T-1)]
  const at::Tensor keep = (out.targets != -100).nonzero().squeeze(1);
  out.targets = out.targets.index_select(0, keep);
  out.hidden = out.hidden.index_select(0, keep);  // [N, H]
  out.rows = shifted > 0 ? at::floor_divide(keep, shifted) : keep;
  if (out.targets.numel() > 0 && out.targets.device().is_cpu()) {  // device: checked on the host
    const int64_t lo = out.targets.min().item<int64_t>(), hi = out.targets.max().item<int64_t>();
    if (lo < 0 || hi >= v)
      throw std::invalid_argument(std::string(who) + ": label " +
                                  std::to_string(lo < 0 ? lo : hi) + " is out of range [0, " +
                                  std::to_string(v) +
                                  ") (-100 marks a position without a target)");
  }
  return out;
}

// Rows per chunk: chunk_tokens, fewer where the vocabulary is large, so that one chunk's logits
// stay within kChunkLogits elements (128 MiB in fp32; each of the few [rows, V] buffers a chunk
// holds at once). A 262k vocabulary (Gemma 3) then takes 128 rows per chunk instead of the 1024
// that would need 1 GiB per buffer; 32k vocabularies keep 1024. The result does not depend on
// the chunking (per-row math, chunk sums in fp64).
constexpr int64_t kChunkLogits = int64_t{1} << 25;
int64_t chunk_rows(int64_t chunk_tokens, int64_t vocab) {
  return std::max<int64_t>(1, std::min<int64_t>(chunk_tokens, kChunkLogits / std::max<int64_t>(vocab, 1)));
}

}  // namespace

at::Tensor DecoderModel::row_logps(const at::Tensor& normed, const at::Tensor& labels,
                                   int64_t chunk_tokens) const {
  const Targets t = targets_select(config_, normed, labels, chunk_tokens, "row_logps");
  const at::Tensor logps = ChunkedTokenLogps::apply(
      t.hidden, lm_head_, t.targets, chunk_rows(chunk_tokens, config_.vocab_size));
  return at::zeros({normed.size(0)}, logps.options()).index_add(0, t.rows, logps);
}

LossResult DecoderModel::loss(const at::Tensor& normed, const at::Tensor& labels,
                              int64_t chunk_tokens, double normalizer) const {
  const Targets t = targets_select(config_, normed, labels, chunk_tokens, "loss");
  const at::Tensor& targets = t.targets;
  const at::Tensor& hidden = t.hidden;
  LossResult result;
  result.num_targets = targets.numel();
  double norm = normalizer > 0.0 ? normalizer : static_cast<double>(result.num_targets);
  if (norm <= 0.0) norm = 1.0;  // no targets: the sum is 0, and so is the loss
  result.loss = ChunkedLmLoss::apply(hidden, lm_head_, targets,
                                     chunk_rows(chunk_tokens, config_.vocab_size), norm);
  return result;
}

}  // namespace qlora::model
