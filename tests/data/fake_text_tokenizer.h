// A hand-made tokenizer for the data unit tests: every byte is its own id (0..255) and a few
// special token strings are split out first ("<s>" 256, "</s>" 257, "<|im_end|>" 258), so the
// expected ids of a template can be written down by hand.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "data/chat_template.h"

namespace qlora::testing {

inline const std::vector<std::pair<std::string, int32_t>>& fake_specials() {
  static const std::vector<std::pair<std::string, int32_t>> s = {{"<s>", 256}, {"</s>", 257}, {"<|im_end|>", 258}};
  return s;
}
inline constexpr int64_t kFakeVocab = 259;

inline std::vector<int32_t> fake_encode(std::string_view text) {
  std::vector<int32_t> ids;
  size_t pos = 0;
  while (pos < text.size()) {
    bool matched = false;
    for (const auto& [s, id] : fake_specials()) {
      if (text.substr(pos, s.size()) == s) {
        ids.push_back(id);
        pos += s.size();
        matched = true;
        break;
      }
    }
    if (!matched) ids.push_back(static_cast<unsigned char>(text[pos++]));
  }
  return ids;
}

inline std::optional<int32_t> fake_token_to_id(std::string_view token) {
  for (const auto& [s, id] : fake_specials()) {
    if (token == s) return id;
  }
  if (token.size() == 1) return static_cast<unsigned char>(token[0]);
  return std::nullopt;
}

inline data::TokenizerConfig fake_config(bool add_bos = false) {
  data::TokenizerConfig c;
  c.bos_token = "<s>";
  c.eos_token = "</s>";
  c.add_bos_token = add_bos;
  return c;
}

inline data::TemplateTokenizer fake_tokenizer(const data::ChatTemplate& t,
                                              const data::TokenizerConfig& c = fake_config()) {
  return data::TemplateTokenizer(fake_encode, fake_token_to_id, kFakeVocab, c, t);
}

// Ids of a string with the fake tokenizer's plain bytes (no specials).
inline std::vector<int32_t> bytes(std::string_view s) {
  std::vector<int32_t> ids;
  for (char ch : s) ids.push_back(static_cast<unsigned char>(ch));
  return ids;
}

inline std::vector<int32_t> cat(std::initializer_list<std::vector<int32_t>> parts) {
  std::vector<int32_t> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

}  // namespace qlora::testing
