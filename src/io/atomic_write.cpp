// Atomic file and directory writes: see atomic_write.h.
#include "io/atomic_write.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <system_error>
#include <vector>

namespace fs = std::filesystem;

namespace qlora::io {

void path_sync(const fs::path& p) {
  const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    throw std::runtime_error(p.string() + ": cannot be opened to sync (" + std::strerror(errno) + ")");
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0)
    throw std::runtime_error(p.string() + ": cannot be synced to disk (" + std::strerror(err) + ")");
}

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
      // Files first, then the directories holding their names, innermost last-listed first.
      std::vector<fs::path> dirs{tmp};
      for (const auto& e : fs::recursive_directory_iterator(tmp)) {
        if (e.is_regular_file()) path_sync(e.path());
        else if (e.is_directory()) dirs.push_back(e.path());
      }
      for (auto it = dirs.rbegin(); it != dirs.rend(); ++it) path_sync(*it);
    } else {
      path_sync(tmp);
    }
    if (directory && fs::is_directory(target)) fs::remove_all(target);
    fs::rename(tmp, target);
    const fs::path parent = target.parent_path().empty() ? fs::path(".") : target.parent_path();
    path_sync(parent);
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
    if (!f)
      throw std::runtime_error(path.string() + ": cannot be written (" + std::strerror(errno) + ")");
  });
}

}  // namespace qlora::io
