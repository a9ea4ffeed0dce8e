// Writing files and directories so that a reader never sees a half-written one and a failure
// never damages what was there: write a hidden sibling (".<name>.tmp-<pid>"), flush it to disk
// (fsync), then rename it over the target (atomic within one file system).
#pragma once

#include <filesystem>
#include <functional>
#include <string>

namespace qlora::io {

// The hidden temporary sibling of `target`: <dir>/.<name>.tmp-<pid>.
std::filesystem::path temp_sibling(const std::filesystem::path& target);

// fsync of a file or a directory (a directory's entries: files created or renamed in it). Throws
// std::runtime_error naming the path.
void path_sync(const std::filesystem::path& path);

// Writes `bytes` to `path` through its temporary sibling, fsync and rename. Throws
// std::runtime_error naming the file when it cannot be written.
void file_write_atomic(const std::filesystem::path& path, const std::string& bytes);

// Calls fill(tmp) with the temporary sibling of `target` (a fresh empty directory when
// `directory`, else a path to create a file at), fsyncs what fill wrote (the file, or every
// file and directory in the directory) and renames tmp to `target`: a file or directory already there
// is replaced (callers check first what they may replace). On any exception tmp is removed and the exception passes on.
void commit_atomic(const std::filesystem::path& target, bool directory,
                   const std::function<void(const std::filesystem::path&)>& fill);

}  // namespace qlora::io
