// Generation loop and token choice: see generate.h. The top-p filter follows transformers'
// TopPLogitsWarper: sort ascending, cumulative softmax, drop tokens whose cumulative mass is
// <= 1 - top_p (never the most likely one), then softmax over the rest and one multinomial draw.
#include "model/generate.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>
#include <string>

namespace qlora::model {

int32_t next_token(const at::Tensor& logits, double temperature, double top_p, at::Generator& gen) {
  if (logits.dim() != 1 || logits.size(0) == 0)
    throw std::invalid_argument("next_token: logits must be [vocab], not " +
                                shape_str(logits.sizes().vec()));
  if (!(temperature >= 0.0) || !std::isfinite(temperature))
    throw std::invalid_argument("temperature " + std::to_string(temperature) +
                                " is not allowed (expected 0 for greedy, or > 0)");
  if (!(top_p > 0.0 && top_p <= 1.0))
    throw std::invalid_argument("top_p " + std::to_string(top_p) +
                                " is not allowed (expected 0 < top_p <= 1)");
  if (temperature == 0.0) return static_cast<int32_t>(logits.argmax().item<int64_t>());
  at::Tensor scores = logits.to(at::kFloat) / temperature;  // [V]
  if (top_p < 1.0) {
    const auto [sorted, order] = scores.sort(/*dim=*/-1, /*descending=*/false);
    const at::Tensor cumulative = sorted.softmax(-1).cumsum(-1);
    at::Tensor remove = cumulative <= (1.0 - top_p);  // [V] in ascending order
    remove.index_put_({-1}, false);                   // the most likely token stays
    scores = scores.masked_fill(remove.scatter(0, order, remove), -INFINITY);
  }
  const at::Tensor probs = scores.softmax(-1);
  return static_cast<int32_t>(at::multinomial(probs, 1, /*replacement=*/false, gen).item<int64_t>());
}

GenerateResult generate(const DecoderModel& model, const std::vector<int32_t>& prompt,
                        const GenerateOptions& o) {
  if (prompt.empty()) throw std::invalid_argument("generate: the prompt has no tokens");
  if (o.max_new_tokens < 0)
    throw std::invalid_argument("max_new_tokens " + std::to_string(o.max_new_tokens) +
                                " is negative (expected 0 or more)");
  c10::AutoGradMode no_grad(false);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  const auto is_stop = [&](int32_t id) {
    return std::find(o.stop_ids.begin(), o.stop_ids.end(), id) != o.stop_ids.end();
  };
  using clock = std::chrono::steady_clock;
  GenerateResult r;
  if (o.max_new_tokens == 0) return r;
  KvCache cache;
  at::Tensor tokens =
      at::tensor(std::vector<int64_t>(prompt.begin(), prompt.end()), at::kLong).unsqueeze(0);
  auto t0 = clock::now();
  at::Tensor logits = model.forward_step(tokens, cache, /*last_only=*/true);  // [1, 1, V]
  int32_t id = next_token(logits[0][0], o.temperature, o.top_p, gen);
  r.prefill_seconds = std::chrono::duration<double>(clock::now() - t0).count();
  r.ids.push_back(id);
  t0 = clock::now();
  while (!is_stop(id) && static_cast<int64_t>(r.ids.size()) < o.max_new_tokens) {
    tokens = at::full({1, 1}, static_cast<int64_t>(id), at::kLong);
    logits = model.forward_step(tokens, cache, /*last_only=*/true);
    id = next_token(logits[0][0], o.temperature, o.top_p, gen);
    r.ids.push_back(id);
    ++r.decode_steps;
  }
  r.decode_seconds = std::chrono::duration<double>(clock::now() - t0).count();
  r.stopped = is_stop(id);
  return r;
}

}  // namespace qlora::model
