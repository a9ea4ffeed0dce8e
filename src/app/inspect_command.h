// `qlora_dist inspect`: what a Hugging Face model directory holds (architecture, quantization
// method, and for a bitsandbytes 4-bit checkpoint every quantized weight, each read and
// cross-checked: quant_state JSON against its tensors). A checkpoint that would fail to load
// fails here with the same message.
#pragma once

#include <string>

namespace qlora::app {

// Returns the report text; throws with a one-line message on the first inconsistency.
std::string inspect_model_dir(const std::string& model_dir);

}  // namespace qlora::app
