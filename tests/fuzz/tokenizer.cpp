// Fuzzes a model directory's tokenizer files: tokenizer.json (data::Tokenizer: model, vocab,
// merges, added tokens, normalizer, pre-tokenizer, post-processor, decoder) and, when given,
// tokenizer_config.json through data::ModelTokenizer::open (special tokens, chat template, the
// template fix-up). Input: tokenizer.json, optionally a line "--", tokenizer_config.json, a
// line "--" and a text that the accepted tokenizer then encodes and decodes (with and without
// special tokens, and through the chat template's tokenizer). Bad input must be
// std::invalid_argument, which Tokenizer and ModelTokenizer document for a bad file.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "data/chat_template.h"
#include "data/model_tokenizer.h"
#include "data/tokenizer.h"
#include "fuzz_util.h"

namespace {

void exercise(const qlora::data::Tokenizer& tokenizer, std::string_view text) {
  for (const bool special : {false, true}) {
    const std::vector<int32_t> ids = tokenizer.encode(text, special);
    for (const int32_t id : ids) {
      if (id < 0 || id >= tokenizer.vocab_size()) {
        std::fprintf(stderr, "tokenizer fuzz: encode gave id %d outside [0, %lld)\n", id,
                     static_cast<long long>(tokenizer.vocab_size()));
        std::abort();
      }
      if (const auto token = tokenizer.id_to_token(id)) (void)tokenizer.token_to_id(*token);
    }
    (void)tokenizer.decode(ids, special);
  }
  // Ids the vocabulary may not hold: decode must skip or refuse them, never read out of bounds.
  try {
    (void)tokenizer.decode({-1, 0, 1, static_cast<int32_t>(tokenizer.vocab_size()), 1 << 30});
  } catch (const std::invalid_argument& e) {
    qlora::fuzz::refused(e);
  }
  (void)tokenizer.content_hash();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qlora;
  const std::vector<std::string_view> parts =
      fuzz::split_parts({reinterpret_cast<const char*>(data), size}, "--", 3);
  const std::string_view json_text = parts[0];
  const std::string_view text = parts.size() > 1 ? parts.back() : std::string_view();
  if (parts.size() < 3) {
    try {
      const data::Tokenizer tokenizer =
          data::Tokenizer::from_json_text(std::string(json_text), "tokenizer.json");
      exercise(tokenizer, text);
    } catch (const std::invalid_argument& e) {
      fuzz::refused(e);
    }
    return 0;
  }
  fuzz::scratch_write("tokenizer.json", json_text);
  fuzz::scratch_write("tokenizer_config.json", parts[1]);
  const std::vector<std::string> names = data::chat_template_names();
  const std::string& name = names[text.size() % names.size()];
  try {
    const auto model = data::ModelTokenizer::open(fuzz::scratch_dir().string(), name, "fuzz");
    exercise(model->tokenizer(), text);
    (void)model->templated().encode(text);
    (void)model->stop_ids();
  } catch (const std::invalid_argument& e) {
    fuzz::refused(e);
  }
  return 0;
}
