// Fuzzes the training configuration: app::config_read on an INI file plus command-line
// overrides, then config_guards, and the promise of config_to_ini that reading its text back
// gives the same configuration. Input: the INI text, then optionally a line "--" and one
// override per line as "section.key=value" (what main.cpp hands config_read after splitting
// "--section.key=value"). Bad input must be std::invalid_argument, which config_read and
// config_guards document (main.cpp turns it into a usage error line).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "app/config.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qlora;
  const auto [ini, rest] = fuzz::split_at_line({reinterpret_cast<const char*>(data), size}, "--");
  std::vector<std::pair<std::string, std::string>> overrides;
  for (size_t pos = 0; pos < rest.size();) {
    size_t end = rest.find('\n', pos);
    if (end == std::string_view::npos) end = rest.size();
    const std::string_view line = rest.substr(pos, end - pos);
    const size_t eq = line.find('=');
    overrides.emplace_back(std::string(line.substr(0, eq)),
                           eq == std::string_view::npos ? "" : std::string(line.substr(eq + 1)));
    pos = end + 1;
  }
  const std::string path = fuzz::scratch_write("train.ini", ini);
  app::TrainConfig config;
  try {
    config = app::config_read(path, overrides);
  } catch (const std::invalid_argument& e) {
    fuzz::refused(e);
    if (!overrides.empty()) (void)app::config_nearest_key(overrides.front().first);
    return 0;
  }
  for (int world = 1; world <= 4; world *= 2) {
    try {
      (void)app::config_guards(config, world);
    } catch (const std::invalid_argument& e) {
      fuzz::refused(e);
    }
  }
  (void)app::config_device(config);
  (void)app::config_compute_dtype(config);
  const std::string text = app::config_to_ini(config);
  const std::string again_path = fuzz::scratch_write("again.ini", text);
  std::string again;
  try {
    again = app::config_to_ini(app::config_read(again_path, {}));
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "train_config fuzz: config_to_ini wrote text config_read refuses: %s\n",
                 e.what());
    std::abort();
  }
  // config_path differs (the file it was read from); config_to_ini does not print it.
  if (again != text) {
    std::fprintf(stderr, "train_config fuzz: config_to_ini round trip differs:\n%s\n---\n%s\n",
                 text.c_str(), again.c_str());
    std::abort();
  }
  return 0;
}
