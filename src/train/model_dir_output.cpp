// See model_dir_output.h.
#include "train/model_dir_output.h"

#include <stdexcept>
#include <system_error>
#include <unistd.h>

namespace fs = std::filesystem;

namespace qlora::train {

fs::path output_dir_check(const std::string& out_dir) {
  // With the trailing separator kept, q itself would be taken for the parent of "q/".
  fs::path out = fs::absolute(out_dir).lexically_normal();
  if (!out.has_filename()) out = out.parent_path();
  if (fs::exists(out) && !(fs::is_directory(out) && fs::is_empty(out)))
    throw std::invalid_argument(out_dir +
                                ": output directory exists and is not empty (choose a new path)");
  return out;
}

void output_dir_commit(const fs::path& out, const std::function<void(const fs::path&)>& fill) {
  const fs::path parent = out.parent_path();
  fs::create_directories(parent);
  const fs::path tmp = parent / ("." + out.filename().string() + ".tmp-" + std::to_string(getpid()));
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  try {
    fill(tmp);
    if (fs::exists(out)) fs::remove(out);  // only ever an empty directory (output_dir_check)
    fs::rename(tmp, out);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
}

void copy_side_files(const fs::path& from, const fs::path& to) {
  for (const auto& entry : fs::directory_iterator(from)) {
    const std::string name = entry.path().filename().string();
    if (!entry.is_regular_file() || name == "config.json" ||
        name.find(".safetensors") != std::string::npos || name.rfind(".", 0) == 0)
      continue;
    fs::copy_file(entry.path(), to / name);
  }
}

}  // namespace qlora::train
