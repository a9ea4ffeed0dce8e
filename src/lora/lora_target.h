// The linears of a decoder block that LoRA can target, and [finetuning] lora_target parsing.
// Torch-free, so that the configuration reader can check lora_target without ATen.
#pragma once

#include <string>
#include <vector>

namespace qlora::lora {

const std::vector<std::string>& block_linear_names();  // q_proj, k_proj, ..., down_proj
// "all" or a comma list of those names; an unknown name is std::invalid_argument listing the
// valid ones. Duplicates are dropped; the order is the list's.
std::vector<std::string> lora_target_parse(const std::string& spec);

}  // namespace qlora::lora
