// Fuzzes adapter_config.json of a PEFT LoRA adapter (lora::peft_config_read: the part of
// peft_adapter_read that reads the config; the adapter's weights file is the safetensors
// harness's). The input is the file. Bad input must be std::invalid_argument, which
// peft_config_read documents ("PATH: key 'K' ...").
#include <cstdint>

#include "fuzz_util.h"
#include "lora/peft_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qlora;
  const std::string path =
      fuzz::scratch_write("adapter_config.json", {reinterpret_cast<const char*>(data), size});
  try {
    const lora::PeftConfigFile config = lora::peft_config_read(path);
    if (config.target_modules)
      for (const std::string& name : *config.target_modules) (void)name.find('.');
  } catch (const std::invalid_argument& e) {
    fuzz::refused(e);
  }
  return 0;
}
