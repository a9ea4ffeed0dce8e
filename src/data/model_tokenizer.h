// The tokenizer of a model directory as training and generation both use it: tokenizer.json run
// by our Tokenizer, tokenizer_config.json (+ special_tokens_map.json, chat_template.jinja), and
// the chat template fixed as LLaMA-Factory's get_template_and_fix_tokenizer does
// (TemplateTokenizer), with the stop ids its generation uses (get_stop_token_ids).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "data/chat_template.h"
#include "data/tokenizer.h"
#include "data/tokenizer_config.h"

namespace qlora::data {

class ModelTokenizer {
 public:
  // Reads DIR/tokenizer.json and DIR/tokenizer_config.json; the template by name. A missing
  // tokenizer.json is std::invalid_argument "DIR: no tokenizer.json (<why_needed>)".
  static std::unique_ptr<ModelTokenizer> open(const std::string& dir,
                                              const std::string& template_name,
                                              const std::string& why_needed);

  const Tokenizer& tokenizer() const { return tokenizer_; }
  const TokenizerConfig& config() const { return config_; }
  const ChatTemplate& chat_template() const { return chat_template_; }
  const TemplateTokenizer& templated() const { return *templated_; }
  // The template-fixed EOS, then the template's stop words (LLaMA-Factory's get_stop_token_ids).
  std::vector<int32_t> stop_ids() const;
  const std::string& dir() const { return dir_; }

 private:
  ModelTokenizer(std::string dir, Tokenizer tokenizer, TokenizerConfig config,
                 const ChatTemplate& chat_template);
  std::string dir_;
  Tokenizer tokenizer_;
  TokenizerConfig config_;
  const ChatTemplate& chat_template_;
  std::unique_ptr<TemplateTokenizer> templated_;  // encodes through tokenizer_ (stable address)
};

}  // namespace qlora::data
