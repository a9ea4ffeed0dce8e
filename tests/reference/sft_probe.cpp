// Test driver for test_sft_reference.py: a model directory's tokenizer + a chat template + a
// JSON dataset -> one JSON line per sample {"input_ids": [...], "labels": [...]} on stdout,
// then one line {"report": {...}}. With --encode-only the dataset is a JSON list of
// conversations [{"system": S, "messages": [{"role", "content"}, ...]}] and each line is
// {"pairs": [[prompt_ids, answer_ids], ...]} from template_encode_multiturn.
//   sft_probe MODEL_DIR DATASET --template NAME [--formatting F] [--cutoff-len N]
//             [--train-on-prompt] [--mask-history] [--max-samples N] [--skip-bad] [--encode-only]
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <string>

#include <nlohmann/json.hpp>

#include "data/chat_template.h"
#include "data/sft_dataset.h"
#include "data/tokenizer.h"
#include "data/tokenizer_config.h"
#include "io/json_file.h"

using namespace qlora::data;

namespace {

Role role_from_name(const std::string& r) {
  if (r == "user") return Role::user;
  else if (r == "assistant") return Role::assistant;
  else if (r == "observation") return Role::observation;
  else if (r == "system") return Role::system;
  else if (r == "function") return Role::function;
  else throw std::invalid_argument("sft_probe: unknown role '" + r + "'");
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 5) {
      std::fprintf(stderr, "usage: sft_probe MODEL_DIR DATASET --template NAME [--formatting F] "
                           "[--cutoff-len N] [--train-on-prompt] [--mask-history] [--max-samples N] "
                           "[--skip-bad] [--encode-only]\n");
      return 2;
    }
    const std::string model_dir = argv[1], dataset = argv[2];
    std::string template_name;
    SftOptions options;
    bool encode_only = false;
    for (int i = 3; i < argc; ++i) {
      const std::string a = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
        return argv[++i];
      };
      if (a == "--template") template_name = value();
      else if (a == "--formatting") options.formatting = formatting_from_name(value());
      else if (a == "--cutoff-len") options.cutoff_len = std::stoll(value());
      else if (a == "--max-samples") options.max_samples = std::stoll(value());
      else if (a == "--train-on-prompt") options.train_on_prompt = true;
      else if (a == "--mask-history") options.mask_history = true;
      else if (a == "--skip-bad") options.skip_bad = true;
      else if (a == "--encode-only") encode_only = true;
      else throw std::invalid_argument("sft_probe: unknown option " + a);
    }
    const Tokenizer tokenizer = Tokenizer::from_file((std::filesystem::path(model_dir) / "tokenizer.json").string());
    const TokenizerConfig config = TokenizerConfig::from_dir(model_dir);
    const ChatTemplate& chat_template = chat_template_by_name(template_name);
    const TemplateTokenizer tok(
        [&](std::string_view text) { return tokenizer.encode(text, false); },
        [&](std::string_view token) { return tokenizer.token_to_id(token); }, tokenizer.vocab_size(),
        config, chat_template);

    if (encode_only) {
      for (const auto& conv : qlora::io::json_file_read(dataset)) {
        std::vector<Message> messages;
        for (const auto& m : conv["messages"])
          messages.push_back({role_from_name(m["role"].get<std::string>()), m["content"].get<std::string>()});
        const auto pairs = template_encode_multiturn(tok, chat_template, messages, conv.value("system", ""));
        nlohmann::json out = {{"pairs", nlohmann::json::array()}};
        for (const auto& [p, a] : pairs) out["pairs"].push_back({p, a});
        std::cout << out.dump() << "\n";
      }
      return 0;
    }
    SftReport report;
    const auto samples = sft_dataset_load(dataset, tok, chat_template, options, &report);
    for (const Sample& s : samples)
      std::cout << nlohmann::json{{"input_ids", s.input_ids}, {"labels", s.labels}}.dump() << "\n";
    std::cout << nlohmann::json{{"report",
                                 {{"formatting", formatting_name(report.formatting)},
                                  {"rows_read", report.rows_read}, {"samples", report.samples},
                                  {"skipped", report.skipped}, {"truncated", report.truncated},
                                  {"tokens", report.tokens}, {"target_tokens", report.target_tokens},
                                  {"first_bad", report.first_bad}}}}
                     .dump()
              << "\n";
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sft_probe: %s\n", e.what());
    return 1;
  }
}
