// Fuzzes the JSON / JSON Lines dataset readers: data::read_json_rows, format detection, the
// alpaca / sharegpt / openai / text converters and the SFT and preference (pairwise) encoders,
// through data::sft_dataset_load and data::pair_dataset_load, then the train/validation split.
// Input: one options line, then the dataset file. The options line holds words, any order:
// a formatting (auto alpaca sharegpt openai text), a chat template name, a number (cutoff_len),
// "prompt" (train_on_prompt), "history" (mask_history), "skip" (dataset_skip_bad), "pairs"
// (train.stage = dpo), "max=N" (max_samples), "val=X" (val_size). Text is tokenized by the
// byte tokenizer of the data unit tests (fake_text_tokenizer.h): the real tokenizer has its own
// harness. Bad input must be std::invalid_argument, which the readers document ("WHERE: reason").
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>

#include "data/chat_template.h"
#include "data/sft_dataset.h"
#include "fake_text_tokenizer.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qlora;
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t eol = input.find('\n');
  const std::string options_line(input.substr(0, eol));
  const std::string_view file = eol == std::string_view::npos ? "" : input.substr(eol + 1);

  data::SftOptions options;
  std::string template_name = "default";
  bool pairs = false;
  double val_size = 0.0;
  std::istringstream words(options_line);
  for (std::string w; words >> w;) {
    try {
      if (w == "prompt") options.train_on_prompt = true;
      else if (w == "history") options.mask_history = true;
      else if (w == "skip") options.skip_bad = true;
      else if (w == "pairs") pairs = true;
      else if (w.rfind("max=", 0) == 0) options.max_samples = std::stoll(w.substr(4)) % 1000;
      else if (w.rfind("val=", 0) == 0) val_size = std::stod(w.substr(4));
      else if (!w.empty() && std::isdigit(static_cast<unsigned char>(w[0])))
        options.cutoff_len = 2 + std::stoll(w) % 4096;  // config_read: cutoff_len >= 2
      else {
        const auto names = data::chat_template_names();
        if (std::find(names.begin(), names.end(), w) != names.end()) template_name = w;
        else options.formatting = data::formatting_from_name(w);
      }
    } catch (const std::exception& e) {
      fuzz::refused(e);
      // An options word that does not parse (std::stoll, an unknown formatting) is ignored:
      // the options line is the harness's own, not input of the product.
    }
  }
  // config_validate refuses these combinations before any data is read.
  if (options.train_on_prompt && options.mask_history) options.mask_history = false;
  const data::ChatTemplate& chat_template = data::chat_template_by_name(template_name);
  const data::TemplateTokenizer tokenizer = testing::fake_tokenizer(chat_template);
  const std::string path = fuzz::scratch_write("data.json", file);
  try {
    data::SftReport report;
    int64_t n = 0;
    if (pairs) {
      n = static_cast<int64_t>(
          data::pair_dataset_load(path, tokenizer, chat_template, options, &report).size());
    } else {
      n = static_cast<int64_t>(
          data::sft_dataset_load(path, tokenizer, chat_template, options, &report).size());
    }
    if (report.samples != n) std::abort();
    if (n > 0 && std::isfinite(val_size) && val_size > 0.0) {
      const data::TrainValSplit split = data::split_train_val(n, val_size, 42);
      if (static_cast<int64_t>(split.train.size() + split.val.size()) != n) std::abort();
    }
  } catch (const std::invalid_argument& e) {
    fuzz::refused(e);
  }
  return 0;
}
