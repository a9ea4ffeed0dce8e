// Atomic file and directory writes: see atomic_write.h.
#include "io/atomic_write.h"

#include <fcntl.h>
#include <unistd.h>

#include <fstream>
#include <stdexcept>
#include <system_error>

namespace fs = std::filesystem;

namespace qlora::io {

namespace {

void fsync_path(const fs::path& p) {
  const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error(p.string() + ": cannot be opened to sync");
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) throw std::runtime_error(p.string() + ": cannot be synced to disk");
}

}  // namespace

fs::path temp_sibling(const fs::path& target) {
  fs::path t = target;
  if (!t.has_filename()) t = t.parent_path();
  return t.parent_path() / ("." + t.filename().string() + ".tmp-" + std::to_string(::getpid()));
}

void commit_atomic(const fs::path& target, bool directory,
                   const std::function<void(const fs::path&)>& fill) {
  const fs::path tmp = temp_sibling(target);
  std::error_code ec;
  // Something already there is not ours (or a crashed run's of the same pid): left alone.
  if (fs::exists(fs::symlink_status(tmp, ec)))
    throw std::runtime_error(tmp.string() + ": temporary path exists; remove it to write " +
                             target.string());
  try {
    if (directory) fs::create_directories(tmp);
    fill(tmp);
    if (directory) {
      for (const auto& e : fs::recursive_directory_iterator(tmp))
        if (e.is_regular_file()) fsync_path(e.path());
    } else {
      fsync_path(tmp);
    }
    if (directory && fs::is_directory(target)) fs::remove_all(target);
    fs::rename(tmp, target);
    const fs::path parent = target.parent_path().empty() ? fs::path(".") : target.parent_path();
    fsync_path(parent);
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
}

void file_write_atomic(const fs::path& path, const std::string& bytes) {
  commit_atomic(path, /*directory=*/false, [&](const fs::path& tmp) {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f << bytes;
    f.flush();
    if (!f) throw std::runtime_error(path.string() + ": cannot be written");
  });
}

}  // namespace qlora::io
