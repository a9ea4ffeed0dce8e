// The prep command: see prep_command.h.
#include "app/prep_command.h"

#include <cstdio>
#include <filesystem>
#include <iostream>
#include <stdexcept>

#include "app/config.h"
#include "app/job_options.h"
#include "app/train_command.h"
#include "app/usage_error.h"
#include "data/prepare.h"

namespace fs = std::filesystem;

namespace qlora::app {

namespace {

int prep_run(const std::vector<std::string>& args) {
  std::string ini;
  bool help = false;
  std::vector<std::pair<std::string, std::string>> own;
  const auto overrides = parse_overrides(args, ini, help, &own);
  if (help) {
    std::cout << "usage: qlora_dist prep config.ini --out FILE.h5 [--section.key=value ...]\n"
                 "  tokenizes data.dataset (and data.eval_dataset, or the data.val_size split "
                 "into FILE.eval.h5)\n  with the tokenizer of model.model_name_or_path; the data "
                 "keys are those of train (qlora_dist train --help)\n";
    return 0;
  }
  std::string out;
  for (const auto& [key, value] : own) {
    if (key != "out") throw UsageError("unknown option --" + key + " (expected --out FILE.h5)");
    out = value;
  }
  if (ini.empty()) throw UsageError("no configuration (usage: qlora_dist prep config.ini --out FILE.h5)");
  if (out.empty()) throw UsageError("--out FILE.h5 is required");
  if (!fs::is_regular_file(ini))
    throw std::invalid_argument(ini + ": configuration file does not exist");
  const TrainConfig c = config_read(ini, overrides);
  if (c.dataset.empty() && c.eval_dataset.empty())
    throw std::invalid_argument(ini + ": data.dataset is not set: nothing to prepare");
  const data::PrepareOptions options = prepare_options(c);
  const bool has_eval = !options.eval_dataset.empty() || options.val_size > 0;
  fs::path eval_out = out;
  eval_out.replace_extension(".eval.h5");
  for (const fs::path& f : {fs::path(out), eval_out}) {
    if (f == eval_out && !has_eval) continue;
    if (fs::exists(f))
      throw std::invalid_argument(f.string() + " exists; prep never overwrites (remove it or "
                                  "choose another --out)");
  }
  const data::PrepareReport report =
      data::prepare_write(options, out, has_eval ? eval_out.string() : "");
  std::printf("prep: %s%s\n%s", out.c_str(), has_eval ? (" and " + eval_out.string()).c_str() : "",
              report.summary().c_str());
  return 0;
}

}  // namespace

int prep_command_main(const std::vector<std::string>& args) {
  try {
    return prep_run(args);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "qlora_dist prep: error: %s\n", error_line(e.what()).c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qlora_dist prep: error: %s\n", error_line(e.what()).c_str());
    return 1;
  }
}

}  // namespace qlora::app
