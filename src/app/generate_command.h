// `qlora_dist generate`: text from a model (+ PEFT adapter) on the CPU, one process, no MPI.
// The model loads as training loads it (4-bit block linears, quantized on load from a
// full-precision Hugging Face directory, dequantized per matmul; fp32 compute); the prompt is
// encoded with the model's tokenizer.json through a LLaMA-Factory chat template (prompt ids of
// [user prompt] + an empty answer); generation runs with the KV cache (model/generate.h).
#pragma once

#include <string>
#include <vector>

namespace qlora::app {

// args: everything after `generate`. Returns the exit status: 0, 1 for errors in what the user
// handed us (files), 2 for usage errors; errors are one line on stderr.
int generate_command_main(const std::vector<std::string>& args);

}  // namespace qlora::app
