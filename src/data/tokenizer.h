// A Hugging Face `tokenizer.json` read and run in C++, token for token as the `tokenizers`
// package: byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM) and SentencePiece-style BPE (Llama 2,
// Mistral: byte_fallback, Metaspace / Prepend+Replace), added and special tokens, NFC/NFKC
// normalizers, and the matching decoders. Anything else is refused naming the component.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace qlora::data {

class Tokenizer {
 public:
  // Reads and checks tokenizer.json. A component we do not implement (WordPiece, Unigram,
  // another normalizer, ...) is std::invalid_argument "PATH: <where in the json>: <what> is not
  // supported (supported: ...)"; a malformed file names what is malformed.
  static Tokenizer from_file(const std::string& path);
  // The same from the text of a tokenizer.json; `where` names it in messages.
  static Tokenizer from_json_text(const std::string& text, const std::string& where);

  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // tokenizers' `encode(text, add_special_tokens=...)`.ids: added tokens are split out first,
  // then normalizer, pre-tokenizer, model; with add_special_tokens the post-processor's
  // template (e.g. BOS) is applied. Invalid UTF-8 in `text` is handled as the Python package
  // would see it after `bytes.decode("utf-8", errors="replace")` (each bad sequence -> U+FFFD).
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = false) const;
  // tokenizers' `decode(ids, skip_special_tokens=...)`.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens = false) const;

  std::optional<int32_t> token_to_id(std::string_view token) const;  // vocab or added token
  std::optional<std::string> id_to_token(int32_t id) const;
  int64_t vocab_size() const;  // max id + 1 over the model vocabulary and the added tokens
  // 16 hex digits of the FNV-1a 64 hash of the file's bytes (keys cached token files).
  const std::string& content_hash() const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace qlora::data
