// `qlora_dist [train] config.ini [--section.key=value ...]` and `qlora_dist eval config.ini`: the
// application around the engine (train/job.h). Phase 1, on every rank before any heavy work:
// configuration, guards, the model's quantization method, the data files, the output directory
// rules; every rank learns whether any failed (one all-reduce), so a failure never leaves
// another rank waiting. Phase 2: threads, communicator, device context, then train::job_run.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace qlora::app {

// Runs the command; MPI is initialized inside. Returns the process exit status (0, 1 for errors
// in what the user handed us, 2 for usage errors, train::kExitPreempted after a stop signal).
// `command` is "train" or "eval".
int train_command_main(const std::string& command, const std::vector<std::string>& args,
                       int* argc, char*** argv);

// The command line of a configuration command: one INI path, then "--section.key=value" or
// "--section.key value" overrides ({"section.key", "value"}), and --help. With `own_options`,
// options without a section ("--out FILE") are the command's own and go there; without, they
// are overrides too (and config_read names them as unknown keys). Throws UsageError.
std::vector<std::pair<std::string, std::string>> parse_overrides(
    const std::vector<std::string>& args, std::string& ini, bool& help,
    std::vector<std::pair<std::string, std::string>>* own_options);

}  // namespace qlora::app
