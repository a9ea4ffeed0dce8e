// See model_dir_output.h.
#include "app/model_dir_output.h"
#include "io/atomic_write.h"

#include <stdexcept>
#include <system_error>
#include <unistd.h>

namespace fs = std::filesystem;

namespace qlora::app {

void model_dir_require(const std::string& model_dir) {
  std::error_code ec;
  if (std::filesystem::is_directory(model_dir, ec)) return;
  if (std::filesystem::exists(model_dir, ec))
    throw std::invalid_argument(model_dir +
                                ": is a file, not a directory (expected a Hugging Face model "
                                "directory: config.json and model.safetensors)");
  throw std::invalid_argument(model_dir + ": model directory does not exist");
}

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
  fs::create_directories(out.parent_path());
  // Replaces only ever an empty directory (output_dir_check).
  io::commit_atomic(out, /*directory=*/true, fill);
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

}  // namespace qlora::app
