// `qlora_dist prep config.ini --out FILE.h5 [--section.key=value ...]`: the data keys of a training
// configuration (data.dataset, data.template, ...) turned into our token HDF5 file(s) without
// training: FILE.h5, and FILE.eval.h5 beside it when there is evaluation data (eval_dataset or
// val_size). Prints the counts. One process, no MPI.
#pragma once

#include <string>
#include <vector>

namespace qlora::app {

// Returns the exit status: 0, 1 for errors in what the user handed us, 2 for usage errors.
int prep_command_main(const std::vector<std::string>& args);

}  // namespace qlora::app
