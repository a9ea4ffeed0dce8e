// What transformers reads next to tokenizer.json: tokenizer_config.json (special tokens as strings
// or AddedToken dicts, add_bos_token, chat_template), special_tokens_map.json and the
// chat_template.jinja file that transformers 5 writes, merged in transformers 5's order.
#pragma once

#include <optional>
#include <string>

namespace qlora::data {

struct TokenizerConfig {
  std::optional<std::string> bos_token;  // token strings ("<|im_start|>"), not ids
  std::optional<std::string> eos_token;
  std::optional<std::string> pad_token;
  std::optional<std::string> unk_token;
  std::optional<std::string> chat_template;  // the jinja text of the default template
  bool add_bos_token = false;                // absent in the file: false (TokenizersBackend)

  // Reads MODEL_DIR/tokenizer_config.json (required) and, when present, special_tokens_map.json
  // and chat_template.jinja. As transformers 5 does: special_tokens_map.json overrides the config's
  // tokens only when the config has no "added_tokens_decoder"; chat_template.jinja overrides the
  // config's "chat_template"; a list of named templates yields the one named "default".
  // std::invalid_argument naming the file and key when something is unreadable or mistyped.
  static TokenizerConfig from_dir(const std::string& model_dir);
};

}  // namespace qlora::data
