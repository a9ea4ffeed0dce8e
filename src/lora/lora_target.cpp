// The block linears LoRA can target, and lora_target parsing: see lora_target.h.
#include "lora/lora_target.h"

#include <algorithm>
#include <stdexcept>

namespace qlora::lora {

const std::vector<std::string>& block_linear_names() {
  static const std::vector<std::string> names = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"};
  return names;
}

std::vector<std::string> lora_target_parse(const std::string& spec) {
  const auto& valid = block_linear_names();
  auto fail = [&](const std::string& what) {
    std::string list = "all";
    for (const auto& n : valid) list += ", " + n;
    throw std::invalid_argument(what + " (valid: " + list + ")");
  };
  auto trim = [](const std::string& s) {
    const size_t b = s.find_first_not_of(" \t");
    if (b == std::string::npos) return std::string();
    return s.substr(b, s.find_last_not_of(" \t") - b + 1);
  };
  if (trim(spec) == "all") return valid;
  std::vector<std::string> out;
  size_t begin = 0;
  while (true) {
    const size_t comma = spec.find(',', begin);
    const std::string item =
        trim(spec.substr(begin, comma == std::string::npos ? std::string::npos : comma - begin));
    if (item.empty()) fail("lora_target '" + spec + "' has an empty name");
    if (item == "all") fail("lora_target '" + spec + "': 'all' cannot be combined with names");
    if (std::find(valid.begin(), valid.end(), item) == valid.end())
      fail("lora_target '" + item + "' is not a linear of the model");
    if (std::find(out.begin(), out.end(), item) == out.end()) out.push_back(item);
    if (comma == std::string::npos) break;
    begin = comma + 1;
  }
  return out;
}

}  // namespace qlora::lora
