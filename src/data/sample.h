// One tokenized training sample (or preference pair) before it becomes a row: ids and labels of the same length,
// labels in Hugging Face convention (unshifted; -100 = no loss on this position).
#pragma once

#include <cstdint>
#include <vector>

namespace qlora::data {

inline constexpr int32_t kIgnoreLabel = -100;

struct Sample {
  std::vector<int32_t> input_ids;  // [len]
  std::vector<int32_t> labels;     // [len], kIgnoreLabel where no loss
};

// One preference pair (train.stage = dpo): the same prompt followed by the chosen answer and by
// the rejected one; labels kIgnoreLabel on the prompt.
struct PairSample {
  Sample chosen, rejected;
};

}  // namespace qlora::data
