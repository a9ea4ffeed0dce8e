// The tokenizer of a model directory: see model_tokenizer.h.
#include "data/model_tokenizer.h"

#include <filesystem>
#include <stdexcept>

namespace fs = std::filesystem;

namespace qlora::data {

ModelTokenizer::ModelTokenizer(std::string dir, Tokenizer tokenizer, TokenizerConfig config,
                               const ChatTemplate& chat_template)
    : dir_(std::move(dir)),
      tokenizer_(std::move(tokenizer)),
      config_(std::move(config)),
      chat_template_(chat_template) {
  templated_ = std::make_unique<TemplateTokenizer>(
      [this](std::string_view text) { return tokenizer_.encode(text, false); },
      [this](std::string_view token) { return tokenizer_.token_to_id(token); },
      tokenizer_.vocab_size(), config_, chat_template_);
}

std::unique_ptr<ModelTokenizer> ModelTokenizer::open(const std::string& dir,
                                                     const std::string& template_name,
                                                     const std::string& why_needed) {
  const ChatTemplate& chat_template = chat_template_by_name(template_name);
  const fs::path json = fs::path(dir) / "tokenizer.json";
  if (!fs::is_regular_file(json))
    throw std::invalid_argument(dir + ": no tokenizer.json (" + why_needed + ")");
  Tokenizer tokenizer = Tokenizer::from_file(json.string());
  TokenizerConfig config = TokenizerConfig::from_dir(dir);
  return std::unique_ptr<ModelTokenizer>(
      new ModelTokenizer(dir, std::move(tokenizer), std::move(config), chat_template));
}

std::vector<int32_t> ModelTokenizer::stop_ids() const {
  std::vector<int32_t> ids;
  if (templated_->eos_token_id()) ids.push_back(*templated_->eos_token_id());
  for (const auto& [token, id] : templated_->template_tokens())
    for (const std::string& w : chat_template_.stop_words)
      if (w == token) ids.push_back(id);
  return ids;
}

}  // namespace qlora::data
