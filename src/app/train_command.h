// `qlora_dist [train] config.ini [--section.key=value ...]` and `qlora_dist eval config.ini`: the
// application around the engine (train/job.h). Phase 1, on every rank before any heavy work:
// configuration, guards, the model's quantization method, the data files, the output directory
// rules; every rank learns whether any failed (one all-reduce), so a failure never leaves
// another rank waiting. Phase 2: threads, communicator, device context, then train::job_run.
#pragma once

#include <string>
#include <vector>

namespace qlora::app {

// Runs the command; MPI is initialized inside. Returns the process exit status (0, 1 for errors
// in what the user handed us, 2 for usage errors, train::kExitPreempted after a stop signal).
// `command` is "train" or "eval".
int train_command_main(const std::string& command, const std::vector<std::string>& args,
                       int* argc, char*** argv);

}  // namespace qlora::app
